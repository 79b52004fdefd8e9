"""Choose MuDSC's alpha (weight-space share) on labelled training data, as the paper's scripts
do (`_train` suffix): merge at every alpha, keep the best joint accuracy on a training sample."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mergeflow.datasets import Split
from mergeflow.mudsc.activations import Moments
from mergeflow.mudsc.evaluation import evaluate
from mergeflow.mudsc.merge import MergeResult, merge_models

ALPHAS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # the official scripts' grid, in their order


def sweep_alpha(models: Sequence[nn.Module], images: torch.Tensor, train: Split, *, matcher: str = "zip",
                alphas: Sequence[float] = ALPHAS, stats: Sequence[Moments] | None = None,
                **kwargs) -> tuple[float, MergeResult, dict[float, float]]:
    """(best alpha, its merge, {alpha: joint training accuracy}); ties go to the first alpha."""
    tasks = [m.classes for m in models]
    scores, best = {}, None
    for alpha in alphas:
        result = merge_models(models, images, matcher=matcher, alpha=alpha, stats=stats, **kwargs)
        scores[alpha] = evaluate(result.model, train, tasks)["joint"]
        if best is None or scores[alpha] > scores[best[0]]:
            best = (alpha, result)
    return best[0], best[1], scores
