"""Activation statistics per merge point, accumulated in one streaming pass over images.

Every model sees the same batch; forward hooks read each point's units at its capture sites
(spatial positions and tokens become samples). The M models' features are concatenated along
the unit axis, F = [F_1, ..., F_M] of shape (samples, M*O), and the pass keeps only
sum(F), sum(F^T F) and the sample count, in float64, so memory does not grow with the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergeflow.mudsc.graph import Capture, MergeGraph


@dataclass
class Moments:
    """Streaming first and second moments of one point's concatenated features."""

    sum: torch.Tensor  # (M*O,) float64
    outer: torch.Tensor  # (M*O, M*O) float64
    count: int

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        return self.outer / self.count


def _units(t: torch.Tensor, cap: Capture) -> list[torch.Tensor]:
    """The captured tensor as (samples, units) matrices, one per unit range of the capture."""
    t = t.detach().movedim(cap.feature_axis, -1)
    return [t[..., a:b].reshape(-1, b - a) for a, b in cap.slices]


def _register(model: nn.Module, graph: MergeGraph, store: dict) -> list:
    modules = dict(model.named_modules())
    handles = []
    for p, point in enumerate(graph.points):
        for c, cap in enumerate(point.captures):
            def hook(_m, inputs, output=None, p=p, c=c, cap=cap):
                store[(p, c)] = _units(inputs[0] if cap.where == "input" else output, cap)

            m = modules[cap.module]
            if cap.where == "input":
                handles.append(m.register_forward_pre_hook(hook))
            else:
                handles.append(m.register_forward_hook(hook))
    return handles


@torch.no_grad()
def collect_moments(backbones: Sequence[nn.Module], graph: MergeGraph, images: torch.Tensor,
                    batch_size: int = 256, progress: bool = False) -> list[Moments]:
    """Moments of every merge point's concatenated features over `images` (eval mode)."""
    sizes = [len(backbones) * p.size for p in graph.points]
    moments = [Moments(torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64), 0) for n in sizes]
    stores: list[dict] = [{} for _ in backbones]
    modes = [m.training for m in backbones]
    handles = [h for m, s in zip(backbones, stores, strict=True) for h in _register(m, graph, s)]
    batches = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="activations", leave=False)
    try:
        for m in backbones:
            m.eval()
        for start in batches:
            x = images[start:start + batch_size]
            for m in backbones:
                m(x)
            for p, c in sorted(stores[0]):
                for parts in zip(*(s[(p, c)] for s in stores), strict=True):
                    f = torch.cat(parts, dim=1).double()
                    moments[p].sum += f.sum(0)
                    moments[p].outer += f.T @ f
                    moments[p].count += f.shape[0]
            for s in stores:
                s.clear()
    finally:
        for h in handles:
            h.remove()
        for m, mode in zip(backbones, modes, strict=True):
            m.train(mode)
    return moments
