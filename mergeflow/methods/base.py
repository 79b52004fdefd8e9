"""What a merge method is: a pure per-tensor function plus the exact global statistics it needs.

Global methods (TIES, PCB) need statistics over each task's *whole-model* vector (a quantile
threshold, a min/max, a majority sign). They declare them as `StatPass`es: a function giving
per-task values for one tensor, and the reductions to take over all tensors. The in-memory path
(`mergeflow.merge`) reduces concatenated values; the streaming engine reduces them in bounded
memory with exact selection. Both then call the same `merge_tensor`, so they agree bitwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

GlobalStats = Mapping[str, torch.Tensor]


class Hyperparams(BaseModel):
    """Base class of every method's hyperparameters: unknown names are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class TensorGroup:
    """One tensor name across all models, in float32.

    `models` stacks the fine-tuned tensors along dim 0: shape (n, *base.shape).
    """

    name: str
    base: torch.Tensor
    models: torch.Tensor

    @property
    def n(self) -> int:
        return self.models.shape[0]

    @property
    def deltas(self) -> torch.Tensor:
        """Task vectors tau_i = theta_i - theta_0, shape (n, *shape)."""
        return self.models - self.base


@dataclass(frozen=True)
class Reduce:
    """An exact reduction, per row, of the values one StatPass emits under `source`.

    kind "kth": the rank(d)-th smallest value (1-based, d = row length over the whole model),
    as `torch.kthvalue` would give on the flattened row. "min", "max": exact. "sum": only on
    integer-valued inputs (counted in int64), so it is exact and order-independent.
    """

    source: str
    kind: Literal["kth", "min", "max", "sum"]
    rank: Callable[[int], int] | None = None


@dataclass(frozen=True)
class StatPass:
    """One pass over every float tensor of the model.

    `values(group, params, stats_so_far)` returns {source: Tensor(rows, m)} for this tensor;
    `reductions(params)` names each statistic and how to reduce it. Results are Tensor(rows).
    """

    values: Callable[[TensorGroup, Hyperparams, GlobalStats], dict[str, torch.Tensor]]
    reductions: Callable[[Hyperparams], dict[str, Reduce]]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge_tensor: Callable[[TensorGroup, Hyperparams, GlobalStats], torch.Tensor]
    hyperparams: type[Hyperparams]
    paper: str
    summary: str
    stat_passes: tuple[StatPass, ...] = field(default=())
    min_models: int = 1
    max_models: int | None = None

    def params(self, **values: object) -> Hyperparams:
        """Validate hyperparameters (pydantic); errors name the field."""
        return self.hyperparams(**values)
