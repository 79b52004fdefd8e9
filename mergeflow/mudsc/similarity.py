"""Unit similarities: Pearson correlation in activation space and in weight space, and their mix.

S = alpha * S_weight + (1 - alpha) * S_act (alpha = MuDSC's `fix_rate`, the weight-space share).
"""

from __future__ import annotations

import torch

from mergeflow.mudsc.activations import Moments


def activation_correlation(m: Moments) -> torch.Tensor:
    """C = (E[ff^T] - mu mu^T) / max(sigma sigma^T, 1e-7), float64, (M*O, M*O)."""
    return _correlation(m.mean, m.second_moment)


def weight_correlation(unit_vectors: torch.Tensor) -> torch.Tensor:
    """The same Pearson correlation between rows (one row per unit of every model, its entries
    the samples), as the official code's _correlation: a near-constant row's correlations are
    damped by the 1e-7 floor, not blown up to +-1."""
    v = unit_vectors.double()
    return _correlation(v.mean(dim=1), v @ v.T / v.shape[1])


def _correlation(mean: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    cov = second_moment - torch.outer(mean, mean)
    std = torch.diagonal(cov).clamp_min(0).sqrt()
    return cov / torch.outer(std, std).clamp_min(1e-7)


def mix(s_weight: torch.Tensor | None, s_act: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """alpha * S_weight + (1 - alpha) * S_act; a missing side must have zero share."""
    if alpha == 0:
        return s_act
    if alpha == 1:
        return s_weight
    return alpha * s_weight + (1 - alpha) * s_act
