"""Task Arithmetic: theta = theta_0 + lam * sum_i tau_i (a sum, not a mean; lam = 1/n is averaging).

Per-task coefficients (what a coefficient search tunes): `lam` may be a list with one value per
fine-tuned model, then theta = theta_0 + sum_i lam_i * tau_i.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergeflow.methods.base import CpuKernel, GlobalStats, Hyperparams, TensorGroup
from mergeflow.methods.registry import register


class TaskArithmeticParams(Hyperparams):
    lam: float | list[float] = Field(
        0.3, description="scale of the summed task vectors, or one coefficient per task")


def _fused_cpu(name: str, offset: int, raw: torch.Tensor, out: torch.Tensor, params: TaskArithmeticParams,
               stats: GlobalStats, candidates: torch.Tensor | None) -> tuple[int, None]:
    from mergeflow.kernels import task_arithmetic as kernel

    return kernel.merge(raw, out, params.lam), None  # plan_merge checked a lam list's length


@register(
    "task_arithmetic",
    hyperparams=TaskArithmeticParams,
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
    summary="base + lam * sum of task vectors",
    elementwise=True,
    cpu_kernel=CpuKernel(_fused_cpu),
)
def task_arithmetic(
    group: TensorGroup, params: TaskArithmeticParams, stats: GlobalStats
) -> torch.Tensor:
    if not isinstance(params.lam, list):
        # Summed in task order so every entry rounds the same way in whole tensors and in the
        # streaming engine's row chunks (torch.sum(dim=0) vectorises a tensor's tail differently).
        # In place on one running sum: (sum * lam) + base rounds exactly like base + lam * sum.
        return _sum_of_deltas(group).mul_(params.lam).add_(group.base)
    if len(params.lam) != group.n:
        raise ValueError(f"task_arithmetic got {len(params.lam)} lam values for {group.n} fine-tuned models")
    # Added into the base one task at a time, ((theta_0 + lam_1 tau_1) + lam_2 tau_2) + ..., the
    # order of the official AdaMerging code's sum over [theta_0, tau_1, ...] with coefficients
    # [1, lam_1, ...], whose task-wise coefficients are what a lam list usually holds. Summing the
    # lam_i tau_i first (mergekit) differs from it in the last bit of some entries.
    deltas = group.deltas
    merged = group.base.clone()
    for lam_i, tau_i in zip(params.lam, deltas, strict=True):
        merged += lam_i * tau_i
    return merged


def _sum_of_deltas(group: TensorGroup) -> torch.Tensor:
    """sum_over_tasks(group.deltas), bitwise, with one row of scratch instead of all n deltas."""
    models, base = group.models, group.base
    total = models[0] - base
    scratch = torch.empty_like(total)
    for model in models[1:]:
        total += torch.sub(model, base, out=scratch)
    return total
