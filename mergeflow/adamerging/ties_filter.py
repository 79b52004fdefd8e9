"""AdaMerging++'s task vectors: each task keeps only its TIES-selected entries.

Exactly TIES' first two steps (reference/algorithms.md section 2), computed by the TIES method's
own building blocks (`mergeflow.methods.ties`): trim every task vector to its top-k fraction by
magnitude over the WHOLE model (ties at the threshold kept), elect each entry's sign by mass
(sign of the summed trimmed values; zeros take the model-wide majority sign), then keep, per
task, only the trimmed entries whose sign agrees with the elected one (`ties_merging_split`'s
`selected_entries`). Their sum scaled by 0.3 is TIES with `dis-sum` at lambda 0.3, which is
AdaMerging++'s starting point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mergeflow.methods.base import GlobalStats, TensorGroup
from mergeflow.methods.ties import (
    TiesParams,
    elected_sign,
    resolve_zero_signs,
    trim_global,
)


def ties_selection_params(k: float) -> TiesParams:
    """The TIES settings whose global statistics (trim thresholds, majority sign) ++ needs."""
    return TiesParams(k=k, lam=1.0, agg="sum", trim_scope="global", elect="mass")


def selected_entries(deltas: torch.Tensor, stats: GlobalStats) -> torch.Tensor:
    """(n, *shape) task vectors -> each task's trimmed entries agreeing with the elected sign.

    `stats` holds TIES' `ties_threshold` and `ties_majority` for the whole model."""
    trimmed = trim_global(deltas, stats["ties_threshold"].to(deltas.device))
    gamma = resolve_zero_signs(elected_sign(trimmed), stats["ties_majority"])
    # The same agreement rule as TIES' disjoint merge: gamma > 0 keeps positives, else negatives.
    return trimmed * torch.where(gamma > 0, trimmed > 0, trimmed < 0)


def ties_selected_task_vectors(
    task_vectors: Sequence[Mapping[str, torch.Tensor]], k: float = 0.2
) -> list[dict[str, torch.Tensor]]:
    """Per task {name: selected entries} (float32), same names as the input."""
    from mergeflow.merging import global_stats
    from mergeflow.methods import get_method

    if not 0.0 < k <= 1.0:
        raise ValueError(f"k is the kept fraction and must be in (0, 1], got {k}")
    names = list(task_vectors[0])

    def group(name: str) -> TensorGroup:
        # base 0, models = tau: the group's deltas are the task vectors exactly.
        stack = torch.stack([tv[name].detach().to(torch.float32) for tv in task_vectors])
        return TensorGroup(name=name, base=torch.zeros_like(stack[0]), models=stack)

    stats = global_stats(get_method("ties"), ties_selection_params(k), lambda: (group(n) for n in names))
    out: list[dict[str, torch.Tensor]] = [{} for _ in task_vectors]
    for name in names:
        selected = selected_entries(group(name).deltas, stats)
        for i in range(len(task_vectors)):
            out[i][name] = selected[i]
    return out
