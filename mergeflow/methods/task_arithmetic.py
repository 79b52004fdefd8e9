"""Task Arithmetic: theta = theta_0 + lam * sum_i tau_i (a sum, not a mean; lam = 1/n is averaging)."""

from __future__ import annotations

import torch
from pydantic import Field

from mergeflow.methods.base import GlobalStats, Hyperparams, TensorGroup
from mergeflow.methods.registry import register


class TaskArithmeticParams(Hyperparams):
    lam: float = Field(0.3, description="scale of the summed task vectors")


@register(
    "task_arithmetic",
    hyperparams=TaskArithmeticParams,
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
    summary="base + lam * sum of task vectors",
)
def task_arithmetic(
    group: TensorGroup, params: TaskArithmeticParams, stats: GlobalStats
) -> torch.Tensor:
    return group.base + params.lam * group.deltas.sum(dim=0)
