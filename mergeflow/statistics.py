"""Exact reductions of StatPass values, in memory (the reference the streaming engine must match)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergeflow.methods.base import Reduce


def reduce_rows(values: torch.Tensor, how: Reduce) -> torch.Tensor:
    """Reduce a (rows, d) tensor per row as `how` says; returns Tensor(rows)."""
    d = values.shape[1]
    if how.kind == "kth":
        rank = how.rank(d)
        if rank == d + 1:  # above every value
            return torch.full((values.shape[0],), torch.inf, dtype=values.dtype)
        if not 1 <= rank <= d:
            raise ValueError(f"kth rank {rank} is outside 1..{d}")
        return values.kthvalue(rank, dim=1).values
    if how.kind == "min":
        return values.amin(dim=1)
    if how.kind == "max":
        return values.amax(dim=1)
    if how.kind == "sum":
        return values.to(torch.int64).sum(dim=1)
    raise ValueError(f"unknown reduction {how.kind!r}")


def reduce_all(
    collected: Mapping[str, list[torch.Tensor]], reductions: Mapping[str, Reduce]
) -> dict[str, torch.Tensor]:
    """Reduce each source's per-tensor values as if concatenated along dim 1 (the whole model).

    One row (task) at a time: only that row's concatenation is in memory, not all of them.
    """
    out = {}
    for name, how in reductions.items():
        values = [v.reshape(v.shape[0], -1) for v in collected[how.source]]
        rows = [reduce_rows(torch.cat([v[r] for v in values]).unsqueeze(0), how) for r in range(values[0].shape[0])]
        out[name] = torch.cat(rows)
    return out
