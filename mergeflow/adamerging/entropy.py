"""The AdaMerging objective: Shannon entropy of the predictions (Tent's `softmax_entropy`)."""

from __future__ import annotations

import torch


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy -sum_c p_c log p_c of softmax(logits) over the last dim, shape (B,)."""
    logits = logits.to(torch.float32)
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Batch mean of the per-sample entropy: one task's term of the AdaMerging loss."""
    return softmax_entropy(logits).mean(0)
