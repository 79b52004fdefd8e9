"""Task Arithmetic fused over the stored inputs: out = base + lam * sum_i (theta_i - base).

The same float32 operations in the same order as `mergeflow.methods.task_arithmetic` (so the
results are bitwise equal), but in one sweep per row over bf16 or float32 storage, without the
float32 copies of every model. Each loop runs over one row of a tile of columns (see
rows.TILE), so LLVM vectorises it.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from mergeflow.kernels import storage_array, thread_scratch
from mergeflow.kernels.rows import tile_columns
from mergeflow.kernels.storage import is_finite, load, store


def merge(raw: torch.Tensor, out: torch.Tensor, lam: float | list[float]) -> int:
    """out = base + lam * sum_i tau_i (or base + sum_i lam_i * tau_i) from the stacked stored
    values `raw` (n + 1, m), base first. Returns how many input values are not finite."""
    stored, acc = storage_array(raw), thread_scratch("task_arithmetic_acc", (tile_columns(raw.shape[1]),))
    lams = np.asarray(lam if isinstance(lam, list) else [], dtype=np.float32)
    return _loops(stored, np.float32(0.0 if lams.size else lam), lams, storage_array(out), acc)


@njit(nogil=True, cache=True, error_model="numpy")
def _loops(raw, lam, lams, out, acc):
    """raw: (n + 1, m) stored values, base first; lam: float32 scalar, used when lams (one
    float32 per task) is empty; out: (m,) storage; acc: (tile,) float32 scratch. A tile of
    columns at a time (see rows.TILE). Returns how many stored values are not finite."""
    m, tile = raw.shape[1], acc.shape[0]
    finite = 0
    for j0 in range(0, m, tile):
        j1 = min(m, j0 + tile)
        if lams.size:
            finite += _per_task_tile(raw, j0, j1, lams, out, acc[:j1 - j0])
        else:
            finite += _tile(raw, j0, j1, lam, out, acc[:j1 - j0])
    return raw.shape[0] * m - finite


@njit(nogil=True, cache=True, error_model="numpy")
def _tile(raw, j0, j1, lam, out, acc):
    """out[j0:j1] = base + lam * sum_i tau_i; returns how many stored values are finite."""
    base, first = raw[0, j0:j1], raw[1, j0:j1]
    finite = 0
    for j in range(acc.shape[0]):
        b = load(base[j])
        x = load(first[j])
        acc[j] = x - b
        finite += is_finite(b) + is_finite(x)
    for i in range(2, raw.shape[0]):
        row = raw[i, j0:j1]
        for j in range(acc.shape[0]):
            x = load(row[j])
            acc[j] += x - load(base[j])
            finite += is_finite(x)
    tile_out = out[j0:j1]
    for j in range(acc.shape[0]):
        store(tile_out, j, acc[j] * lam + load(base[j]))
    return finite


@njit(nogil=True, cache=True, error_model="numpy")
def _per_task_tile(raw, j0, j1, lams, out, acc):
    """As `_tile` with one coefficient per task: base + sum_i lams[i] * tau_i."""
    base = raw[0, j0:j1]
    finite = 0
    for j in range(acc.shape[0]):
        b = load(base[j])
        acc[j] = b
        finite += is_finite(b)
    for i in range(1, raw.shape[0]):
        row, lam = raw[i, j0:j1], lams[i - 1]
        for j in range(acc.shape[0]):
            x = load(row[j])
            acc[j] += lam * (x - load(base[j]))
            finite += is_finite(x)
    tile_out = out[j0:j1]
    for j in range(acc.shape[0]):
        store(tile_out, j, acc[j])
    return finite
