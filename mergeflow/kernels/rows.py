"""Row stages the kernels share: DARE's drop and rescale, per-task scaling, the sum over tasks.

Each works on whole rows of float32 scratch (one row per task), so LLVM vectorises its loops.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergeflow.kernels.storage import is_finite, load


@njit(nogil=True, cache=True, error_model="numpy")
def drop_rows(raw, draws, threshold, keep_scale, scratch):
    """scratch[i] = (theta_i - theta_0) * keep_i / keep_scale, as dare.drop_and_rescale does it
    (a dropped negative entry is -0.0); keep_scale = 0 means p = 0: the deltas as they are."""
    base = raw[0]
    for i in range(raw.shape[0] - 1):
        row, t_row, row_draws = raw[i + 1], scratch[i], draws[i]
        if keep_scale == 0:
            for j in range(row.shape[0]):
                t_row[j] = load(row[j]) - load(base[j])
        else:
            for j in range(row.shape[0]):
                keep = np.float32(row_draws[j] >= threshold)
                t_row[j] = (load(row[j]) - load(base[j])) * keep / keep_scale


@njit(nogil=True, cache=True, error_model="numpy")
def scale_rows(scratch, n, lams):
    """scratch[i] *= lams[i]: per-task lam, after the trim (or drop) and before the election."""
    for i in range(n):
        row, scale = scratch[i], lams[i]
        for j in range(row.shape[0]):
            row[j] = row[j] * scale


@njit(nogil=True, cache=True, error_model="numpy")
def sum_rows(scratch, n, into):
    """into = scratch[0] + scratch[1] + ... + scratch[n - 1], added in task order like
    sum_over_tasks (scratch[0] as it is when n = 1)."""
    first = scratch[0]
    if n == 1:
        for j in range(into.shape[0]):
            into[j] = first[j]
        return
    second = scratch[1]
    for j in range(into.shape[0]):
        into[j] = first[j] + second[j]
    for i in range(2, n):
        row = scratch[i]
        for j in range(into.shape[0]):
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
