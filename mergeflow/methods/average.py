"""Weight averaging: theta = mean_i theta_i (the base is not used).

With `weights`, the weighted mean sum_i w_i theta_i / sum_i w_i: mergekit's `linear` (its default
normalize: true), computed with mergekit's operations (bitwise equal to it in float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, field_validator

from mergeflow.methods.base import GlobalStats, Hyperparams, TensorGroup
from mergeflow.methods.registry import register


class AverageParams(Hyperparams):
    weights: list[float] | None = Field(
        None, description="one weight per model for a weighted mean (mergekit's linear); none: the plain mean")

    @field_validator("weights")
    @classmethod
    def _weights_do_not_cancel(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and sum(weights) == 0:  # 0/0 in every entry (mergekit: a NaN model)
            raise ValueError(f"{weights} sum to {sum(weights)}: the weighted mean divides by that sum; "
                             "give weights whose sum is not 0")
        return weights


def _check_inputs(params: AverageParams, n: int, float_names: Sequence[str]) -> None:
    if params.weights is not None and len(params.weights) != n:
        raise ValueError(f"got {len(params.weights)} weights for {n} models; give one per model")


@register(
    "average",
    hyperparams=AverageParams,
    paper="Wortsman et al., Model soups, ICML 2022",
    summary="mean of the fine-tuned weights (or a weighted mean)",
    task_vectors=False,
    check_inputs=_check_inputs,
)
def average(group: TensorGroup, params: AverageParams, stats: GlobalStats) -> torch.Tensor:
    if params.weights is None:
        return group.models.mean(dim=0)
    weights = torch.tensor(params.weights, dtype=torch.float32, device=group.models.device)
    merged = torch.zeros_like(group.models[0])
    for model, weight in zip(group.models, weights, strict=True):
        merged.addcmul_(model, weight)  # fused multiply-add, as mergekit's linear: the same bits
    return merged.div_(weights.sum())
