"""Weight averaging: theta = mean_i theta_i (the base is not used)."""

from __future__ import annotations

import torch

from mergeflow.methods.base import GlobalStats, Hyperparams, TensorGroup
from mergeflow.methods.registry import register


class AverageParams(Hyperparams):
    pass


@register(
    "average",
    hyperparams=AverageParams,
    paper="Wortsman et al., Model soups, ICML 2022",
    summary="mean of the fine-tuned weights",
    task_vectors=False,
)
def average(group: TensorGroup, params: AverageParams, stats: GlobalStats) -> torch.Tensor:
    return group.models.mean(dim=0)
