"""AdaMerging++'s task vectors: each task keeps only its TIES-selected entries.

Exactly TIES' first two steps (reference/algorithms.md section 2): trim every task vector to its
top-k fraction by magnitude over the WHOLE model (ties at the threshold kept), elect each entry's
sign by mass (sign of the sum of the trimmed values; zeros get the model-wide majority sign),
then keep, per task, only the trimmed entries whose sign agrees with the elected one
(`ties_merging_split`'s `selected_entries`). Summing them and scaling by 0.3 is TIES with
`dis-sum` at lambda 0.3, AdaMerging++'s starting point.

The per-tensor functions here are shared by tuning (`ties_selected_task_vectors`) and by the
registered `adamerging` merge method, so both select exactly the same entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def trim_rank(d: int, k: float) -> int:
    """1-based rank of the trim threshold in a task's |tau| over d entries: d - int(d * k)."""
    return d - int(d * k)


def trimmed(stack: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry of the (n, *shape) stack below its task's threshold (>= is kept)."""
    return stack * (stack.abs() >= thresholds.view(-1, *([1] * (stack.dim() - 1))))


def elected_sign(trimmed_stack: torch.Tensor) -> torch.Tensor:
    """Sign of the summed trimmed values (0 where they cancel or are all zero)."""
    return torch.sign(trimmed_stack.sum(0))


def selected_entries(trimmed_stack: torch.Tensor, majority_sign: torch.Tensor) -> torch.Tensor:
    """Per task, the trimmed entries agreeing with the elected sign (zero-sign -> majority)."""
    sign = elected_sign(trimmed_stack)
    sign = torch.where(sign == 0, majority_sign.to(sign.dtype), sign)
    return trimmed_stack * torch.where(sign > 0, trimmed_stack > 0, trimmed_stack < 0)


def ties_selected_task_vectors(
    task_vectors: Sequence[Mapping[str, torch.Tensor]], k: float = 0.2
) -> list[dict[str, torch.Tensor]]:
    """Per task {name: selected entries} (float32), same names as the input."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k is the kept fraction and must be in (0, 1], got {k}")
    names = list(task_vectors[0])

    def stack(name: str) -> torch.Tensor:
        return torch.stack([tv[name].detach().to(torch.float32) for tv in task_vectors])

    thresholds = trim_thresholds([stack(n) for n in names], k)
    sign_total = torch.zeros((), dtype=torch.int64)
    for name in names:
        sign_total += elected_sign(trimmed(stack(name), thresholds)).to(torch.int64).sum()
    majority = torch.sign(sign_total).to(torch.float32)
    out: list[dict[str, torch.Tensor]] = [{} for _ in task_vectors]
    for name in names:
        selected = selected_entries(trimmed(stack(name), thresholds), majority)
        for i in range(len(task_vectors)):
            out[i][name] = selected[i]
    return out


def trim_thresholds(stacks: Sequence[torch.Tensor], k: float) -> torch.Tensor:
    """Per task, the trim_rank-th smallest |tau| over the whole model (all tensors), shape (n,)."""
    n = stacks[0].shape[0]
    flat = torch.cat([s.abs().reshape(n, -1) for s in stacks], dim=1)
    rank = trim_rank(flat.shape[1], k)
    if rank < 1:  # k = 1 keeps everything
        return torch.full((n,), float("-inf"))
    return flat.kthvalue(rank, dim=1).values
