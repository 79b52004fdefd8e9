"""DARE with Task Arithmetic fused over the stored inputs (the method `dare`).

Exactly the float32 operations of `mergeflow.methods.dare.dare`, in the same order:
  tau~_i = (theta_i - theta_0) * keep_i / (1 - p)      (the deltas as they are for p = 0)
  out    = theta_0 + lam * sum_i tau~_i                (scalar lam)
           theta_0 + sum_i lam_i * tau~_i              (per-task lam)
with keep_i from the same random draws as `dare.keep_mask` (computed inline: kernels/draws.py).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from mergeflow.kernels import storage_array, thread_scratch
from mergeflow.kernels.draws import drop_arguments
from mergeflow.kernels.rows import drop_rows, scale_rows, sum_rows, tile_columns
from mergeflow.kernels.storage import load, store


def merge(raw: torch.Tensor, out: torch.Tensor, keys: np.ndarray, start: int, threshold: int, p: float,
          lam: float | list[float]) -> int:
    """DARE into `out` from the stacked stored values raw (n + 1, m), base first; entry j of
    task i (flat position start + j in its tensor) is kept where its draw from the stream keyed
    keys[i] is >= threshold. Returns how many input values are not finite."""
    n, m = raw.shape[0] - 1, raw.shape[1]
    per_task = isinstance(lam, list)
    lams = np.asarray(lam if per_task else [1.0] * n, dtype=np.float32)
    scratch = thread_scratch("dare_scratch", (n + 1, tile_columns(m)))
    drop = drop_arguments(keys, start, threshold, p, scratch.shape[1])
    return int(_loops(storage_array(raw), drop, lams, per_task, np.float32(0.0 if per_task else lam),
                      storage_array(out), scratch))


@njit(nogil=True, cache=True, error_model="numpy")
def _loops(raw, drop, lams, per_task, lam, out, scratch):
    """A tile of columns at a time (see rows.TILE); drop: rows.drop_rows' tuple. Returns how
    many of the stored values raw are not finite."""
    n, m, tile = raw.shape[0] - 1, raw.shape[1], scratch.shape[1]
    finite = np.int64(0)
    for j0 in range(0, m, tile):
        j1 = min(m, j0 + tile)
        w = j1 - j0
        finite += drop_rows(raw, j0, j1, drop, scratch)
        if per_task:
            scale_rows(scratch, n, w, lams)
        total = scratch[n, :w]
        sum_rows(scratch, n, w, total)
        base, tile_out = raw[0, j0:j1], out[j0:j1]
        if per_task:
            for j in range(w):
                merged = load(base[j]) + total[j]
                store(tile_out, j, merged)
        else:
            for j in range(w):
                merged = load(base[j]) + lam * total[j]
                store(tile_out, j, merged)
    return raw.shape[0] * m - finite
