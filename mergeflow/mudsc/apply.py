"""Apply merge/unmerge matrices to tensors, and build weight-space unit vectors.

For merge point p with merge matrix Mx_p (O, M*O) and unmerge U_p (M*O, O), model k's blocks
are Mx_p,k = Mx_p[:, kO:(k+1)O] and U_p,k = U_p[kO:(k+1)O]. A tensor's produced axis is mapped
to merged units by Mx_p,k, its consumed axis by U_p,k (the merged input, unmerged back to model
k's units): W'_k = Mx_out,k W_k U_in,k. Since Mx averages the members of each merged unit, the
merged tensor is the SUM over models of the transformed tensors; tensors that no point
produces are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mergeflow.mudsc.graph import MergeGraph, TensorAxis

_RUNNING_STATS = ("running_mean", "running_var")
Matrices = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per point: (merge, unmerge)


def block(mats: Matrices, p: int, k: int, entry: TensorAxis) -> torch.Tensor:
    """The (merged x own) matrix that maps model k's units of point p along `entry`'s axis."""
    merge, unmerge = mats[p]
    o = merge.shape[0]
    return unmerge[k * o:(k + 1) * o].T if entry.consumes else merge[:, k * o:(k + 1) * o]


def vector_block(mats: Matrices, p: int, k: int, entry: TensorAxis) -> torch.Tensor:
    """The (merged x own) matrix that maps model k's units of a neighbouring point p when unit
    vectors are built: the official code (get_weight_vectors) takes there the other matrix than
    the merge step does, M times the merge block on a consumed axis and the unmerge block on a
    produced one, so for permutations every piece of a vector keeps its scale (Git Re-Basin's
    sum over layers); `block`'s 1/M average on produced axes would halve them (M = 2)."""
    merge, unmerge = mats[p]
    o = merge.shape[0]
    m = unmerge.shape[0] // o
    return m * merge[:, k * o:(k + 1) * o] if entry.consumes else unmerge[k * o:(k + 1) * o].T


def _along(t: torch.Tensor, entry: TensorAxis, matrix: torch.Tensor) -> torch.Tensor:
    if entry.start == 0 and entry.stop == t.shape[entry.axis]:
        moved = t.movedim(entry.axis, 0)
        return (matrix @ moved.reshape(moved.shape[0], -1)).reshape(moved.shape).movedim(0, entry.axis)
    part = t.narrow(entry.axis, entry.start, entry.stop - entry.start).movedim(entry.axis, 0)
    mapped = (matrix @ part.reshape(part.shape[0], -1)).reshape(part.shape).movedim(0, entry.axis)
    out = t.clone()
    out.narrow(entry.axis, entry.start, entry.stop - entry.start).copy_(mapped)
    return out


def transform(t: torch.Tensor, entries: Sequence[tuple[int, TensorAxis]], mats: Matrices, k: int,
              skip: int | None = None, matrix=block) -> torch.Tensor:
    """Model k's tensor with every entry mapped by `matrix` (`block` or `vector_block`), except
    those of point `skip`, in float64."""
    t = t.double()
    for p, entry in entries:
        if p != skip:
            t = _along(t, entry, matrix(mats, p, k, entry))
    return t


def merge_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]], graph: MergeGraph,
                      mats: Matrices) -> dict[str, torch.Tensor]:
    """The merged backbone: sum of transformed tensors (average where no point produces them)."""
    merged = {}
    for name, first in state_dicts[0].items():
        if not first.is_floating_point():
            merged[name] = first.clone()  # e.g. BatchNorm's num_batches_tracked
            continue
        entries = graph.tensor_entries.get(name, [])
        parts = [transform(sd[name], entries, mats, k) for k, sd in enumerate(state_dicts)]
        total = torch.stack(parts).sum(0)
        produced = any(not e.consumes for _, e in entries)
        merged[name] = (total if produced else total / len(parts)).to(first.dtype)
    return merged


def unmerge_head(weight: torch.Tensor, graph: MergeGraph, mats: Matrices, k: int) -> torch.Tensor:
    """Model k's head weight (classes, O) reading the merged features: W U_out,k."""
    p = graph.output_point
    entry = TensorAxis("head.weight", 1, 0, weight.shape[1], consumes=True)
    return _along(weight.double(), entry, block(mats, p, k, entry)).to(weight.dtype)


def unit_vectors(state_dicts: Sequence[Mapping[str, torch.Tensor]], graph: MergeGraph,
                 mats: Matrices, p: int) -> torch.Tensor:
    """(M*O, L): each unit's slices of every tensor touching point p, in the merged basis of all
    neighbouring points (their current matrices applied as `vector_block` says, p's own left as
    is)."""
    point = graph.points[p]
    rows = []
    for k, sd in enumerate(state_dicts):
        cache: dict[str, torch.Tensor] = {}
        pieces = []
        for entry in point.entries:
            if entry.tensor.endswith(_RUNNING_STATS):
                continue  # statistics of the data, not weights
            if entry.tensor not in cache:
                cache[entry.tensor] = transform(sd[entry.tensor], graph.tensor_entries[entry.tensor], mats, k, skip=p,
                                                matrix=vector_block)
            t = cache[entry.tensor].narrow(entry.axis, entry.start, entry.stop - entry.start)
            pieces.append(t.movedim(entry.axis, 0).reshape(point.size, -1))
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0)
