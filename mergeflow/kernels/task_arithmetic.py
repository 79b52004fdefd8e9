"""Task Arithmetic fused over the stored inputs: out = base + lam * sum_i (theta_i - base).

The same float32 operations in the same order as `mergeflow.methods.task_arithmetic` (so the
results are bitwise equal), but in one sweep per row over bf16 or float32 storage, without the
float32 copies of every model. Each loop runs over one row, so LLVM vectorises it.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from mergeflow.kernels import storage_array, thread_scratch
from mergeflow.kernels.storage import is_finite, load, store


def merge(raw: torch.Tensor, out: torch.Tensor, lam: float | list[float]) -> int:
    """out = base + lam * sum_i tau_i (or base + sum_i lam_i * tau_i) from the stacked stored
    values `raw` (n + 1, m), base first. Returns how many input values are not finite."""
    stored, acc = storage_array(raw), thread_scratch("task_arithmetic_acc", (raw.shape[1],))
    if isinstance(lam, list):
        return _per_task_loops(stored, np.asarray(lam, dtype=np.float32), storage_array(out), acc)
    return _loops(stored, np.float32(lam), storage_array(out), acc)


@njit(nogil=True, cache=True, error_model="numpy")
def _loops(raw, lam, out, acc):
    """raw: (n + 1, m) stored values, base first; lam: float32 scalar; out: (m,) storage;
    acc: (m,) float32 scratch. Returns how many stored values are not finite."""
    n1, m = raw.shape
    base = raw[0]
    finite = 0
    first = raw[1]
    for j in range(m):
        b = load(base[j])
        x = load(first[j])
        acc[j] = x - b
        finite += is_finite(b) + is_finite(x)
    for i in range(2, n1):
        row = raw[i]
        for j in range(m):
            x = load(row[j])
            acc[j] += x - load(base[j])
            finite += is_finite(x)
    for j in range(m):
        store(out, j, acc[j] * lam + load(base[j]))
    return n1 * m - finite


@njit(nogil=True, cache=True, error_model="numpy")
def _per_task_loops(raw, lams, out, acc):
    """As `_loops` with one coefficient per task: base + sum_i lams[i] * tau_i."""
    n1, m = raw.shape
    base = raw[0]
    finite = 0
    for j in range(m):
        b = load(base[j])
        acc[j] = b
        finite += is_finite(b)
    for i in range(1, n1):
        row = raw[i]
        lam = lams[i - 1]
        for j in range(m):
            x = load(row[j])
            acc[j] += lam * (x - load(base[j]))
            finite += is_finite(x)
    for j in range(m):
        store(out, j, acc[j])
    return n1 * m - finite
