"""The exact selection's window counts for |task vector| values, fused over the stored inputs.

`selection._window_cpu` on the rows |theta_i - theta_0| gives, per task, the values below the
window [lo, hi], those equal to lo and to hi, and the values strictly inside. This kernel gives
the same numbers, for one window or several over the same values (PCB's clip has two), from
the stored bf16 or float32 inputs in one vectorised sweep per task, without the float32 task
vectors: TIES's trim-threshold pass spends most of its time here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit

from mergeflow.kernels import row_floats, storage_array, thread_scratch
from mergeflow.kernels.rows import count_nonfinite, flagged
from mergeflow.kernels.storage import load


def abs_delta_windows(raw: torch.Tensor, windows: Sequence[tuple[torch.Tensor, torch.Tensor]]
                      ) -> tuple[list[tuple[np.ndarray, list[torch.Tensor]]], int]:
    """`selection._window_cpu` on the rows |theta_i - theta_0| for each (lo, hi) of `windows`,
    from the stored values `raw` (n + 1, m), base first: per window the (3, n) counts below lo,
    at lo and at hi (0 at hi when lo == hi) and each row's values strictly inside; and how many
    input values are not finite.

    A sweep per window: one sweep that counts two windows (PCB's clip) measured no faster than
    two, as its loop no longer vectorises as well; the inputs' finiteness is counted once, by
    rows.count_nonfinite."""
    n, m = raw.shape[0] - 1, raw.shape[1]
    stored = storage_array(raw)
    inside, kept = thread_scratch("window_inside", (n, m), np.bool_), thread_scratch("window_kept", (n, m))
    positions = thread_scratch("window_positions", (m,), np.int64)
    results = []
    for lo, hi in windows:
        bounds = [row_floats(b, n) for b in (lo, hi)]
        counts, kept_n = np.zeros((3, n), dtype=np.int64), np.zeros(n, dtype=np.int64)
        _loops(stored, *bounds, counts, inside, kept, kept_n, positions)
        results.append((counts, [torch.from_numpy(kept[i, :kept_n[i]].copy()) for i in range(n)]))
    return results, int(count_nonfinite(stored))


@njit(nogil=True, cache=True, error_model="numpy")
def _loops(raw, lo, hi, counts, inside, kept, kept_n, positions):
    """raw: (n + 1, m) stored values, base first; lo, hi: (n,) float32 window bounds.

    Fills counts (3, n) int64 with the values |theta_i - theta_0| below lo, equal to lo and
    equal to hi, and kept[i, :kept_n[i]] with those strictly inside (lo, hi), in order; inside
    (n, m) bool and positions (m,) are scratch: the sweep that counts only flags the few inside,
    so it stays vectorised, and a scan then gathers them.
    """
    n1, m = raw.shape
    base = raw[0]
    for i in range(n1 - 1):
        row, low, high, row_inside = raw[i + 1], lo[i], hi[i], inside[i]
        below = at_low = at_high = np.int32(0)
        for j in range(m):
            a = abs(load(row[j]) - load(base[j]))
            below += np.int32(a < low)
            at_low += np.int32(a == low)
            at_high += np.int32(a == high)
            row_inside[j] = (a > low) & (a < high)
        counts[0, i], counts[1, i] = below, at_low
        counts[2, i] = at_high if low != high else 0  # lo == hi: the window's values count at lo
        c = flagged(row_inside, positions)
        row_kept = kept[i]
        for q in range(c):
            j = positions[q]
            row_kept[q] = abs(load(row[j]) - load(base[j]))
        kept_n[i] = c
