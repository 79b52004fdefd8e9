"""Row stages the kernels share: DARE's drop and rescale, per-task scaling, the sum over tasks.

The kernels work on a unit a tile of columns at a time: `TILE` columns of every input row, with
float32 scratch rows of `TILE` entries. Each stage makes a pass over its rows, and a unit's
rows of float32 scratch (2 MiB each at the engine's 2**19-entry units) would come from main
memory on every pass, with the other worker's passes competing for it; a tile's stay in the
core's L2 cache (1 MiB here). Two threads running TIES's kernel on 3 bf16 fine-tunes fresh
from memory spent 1.9-2.4 s of CPU per 0.5B columns over whole units, 1.5-1.6 s over tiles.
Each stage loops over whole contiguous rows of a tile (`raw[i, j0:j1]`, `scratch[i, :w]`),
indexed from 0 (a loop from j0 makes LLVM keep numba's negative-index wrap, which stops it
vectorising), so LLVM vectorises it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergeflow.kernels.draws import tile_draws
from mergeflow.kernels.storage import is_finite, load

TILE = 1 << 14  # columns; ~6 float32 rows of it (TIES over 3 tasks) and the inputs fit in L2


def tile_columns(m: int) -> int:
    """The columns of a tile for a unit of m columns (at least 1: units can be empty)."""
    return max(1, min(TILE, m))


@njit(nogil=True, cache=True, error_model="numpy")
def drop_rows(raw, j0, j1, drop, scratch):
    """scratch[i, :j1 - j0] = (theta_i - theta_0) * keep_i / keep_scale over the columns
    [j0, j1), as dare.drop_and_rescale does it (a dropped negative entry is -0.0).

    drop = (keys, start, threshold, keep_scale, words): task i's entries draw from the stream
    keyed keys[i] (uint64) at flat positions start + j (start: the unit's first entry in its
    tensor), and are kept where their draw >= threshold (uint32); words is tile_draws' scratch.
    keep_scale = 0 means p = 0: the deltas as they are, no draws.

    Returns how many of the tile's stored values (base and models) are finite: DARE's kernels
    read the inputs only here, and counting on the way saves a pass over them."""
    keys, start, threshold, keep_scale, words = drop
    base, w = raw[0, j0:j1], j1 - j0
    finite = np.int32(0)  # int32 vectorises; a tile has far fewer than 2**31 values
    for j in range(w):
        finite += np.int32(is_finite(load(base[j])))
    for i in range(raw.shape[0] - 1):
        row, t_row = raw[i + 1, j0:j1], scratch[i, :w]
        if keep_scale == 0:
            for j in range(w):
                x = load(row[j])
                t_row[j] = x - load(base[j])
                finite += np.int32(is_finite(x))
        else:
            row_draws = tile_draws(keys[i], start + j0, w, words)
            for j in range(w):
                x = load(row[j])
                keep = np.float32(row_draws[j] >= threshold)
                t_row[j] = (x - load(base[j])) * keep / keep_scale
                finite += np.int32(is_finite(x))
    return np.int64(finite)


@njit(nogil=True, cache=True, error_model="numpy")
def scale_rows(scratch, n, w, lams):
    """scratch[i, :w] *= lams[i]: per-task lam, after the trim (or drop) and before the election."""
    for i in range(n):
        row, scale = scratch[i, :w], lams[i]
        for j in range(w):
            row[j] = row[j] * scale


@njit(nogil=True, cache=True, error_model="numpy")
def sum_rows(scratch, n, w, into):
    """into[:w] = scratch[0, :w] + scratch[1, :w] + ... + scratch[n - 1, :w], added in task
    order like sum_over_tasks (scratch[0] as it is when n = 1)."""
    first = scratch[0, :w]
    if n == 1:
        for j in range(w):
            into[j] = first[j]
        return
    second = scratch[1, :w]
    for j in range(w):
        into[j] = first[j] + second[j]
    for i in range(2, n):
        row = scratch[i, :w]
        for j in range(w):
            into[j] += row[j]


@njit(nogil=True, cache=True, error_model="numpy")
def count_nonfinite(raw):
    """How many of the stored values raw (rows, m) are NaN or infinite."""
    finite = np.int64(0)
    for i in range(raw.shape[0]):
        row = raw[i]
        row_finite = np.int32(0)  # int32 counters vectorise best; a unit row is far below 2**31
        for j in range(row.shape[0]):
            row_finite += np.int32(is_finite(load(row[j])))
        finite += row_finite
    return raw.shape[0] * raw.shape[1] - finite


@njit(inline="always")
def flagged(flags, positions):
    """positions[:c] = the indices j where flags[j] (a contiguous bool row), in order; returns c.

    For sparse flags, such as the values inside a k-th value's window (well under 1 %): the
    scan reads the flags eight at a time and looks into a word only when it is not 0."""
    w = flags.shape[0]
    full = w - w % 8
    words = flags[:full].view(np.uint64)
    c = 0
    for q in range(words.shape[0]):
        if words[q] != 0:
            for j in range(8 * q, 8 * q + 8):
                if flags[j]:
                    positions[c] = j
                    c += 1
    for j in range(full, w):
        if flags[j]:
            positions[c] = j
            c += 1
    return c
