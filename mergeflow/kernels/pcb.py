"""PCB-Merging's score arguments fused over the stored inputs (the nlp variant).

Exactly the float32 operations of `mergeflow.methods.pcb._scores_from` before its exp and tanh,
in the same order, so with torch's exp and tanh applied after, the scores are bitwise equal:
  tau_i   = theta_i - theta_0
  inter_i = tau_i * (tau_0 + tau_1 + ...)                  the argument of tanh (sum in task order)
  A_i     = clamp(|tau_i|, lo_i, hi_i)
  intra_i = ((A_i - lo_i) / (hi_i - lo_i))**2 * n          the argument of exp
exp and tanh stay with torch: their vectorised results (SLEEF) cannot be reproduced here bit for
bit. What the kernel saves is the float32 copy of the inputs and a dozen torch passes.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from mergeflow.kernels import storage_array, thread_scratch
from mergeflow.kernels.rows import sum_rows
from mergeflow.kernels.storage import load


def score_arguments(raw: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                    tanh_identity_below: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(inter, intra, large): inter and intra (n, m) float32 on this thread's scratch (valid until
    its next unit), from the stacked stored values raw (n + 1, m) and each task's clip bounds
    low, high (n,); `large` counts the inter entries at or above `tanh_identity_below` in
    magnitude (where tanh is not the identity: when there are none, tanh has nothing to do)."""
    n, m = raw.shape[0] - 1, raw.shape[1]
    lo, hi = (b.to(torch.float32).reshape(-1).numpy() for b in (low, high))
    width = (hi - lo).astype(np.float32)  # float32 - float32: as torch's (high - low) column
    inter, intra = thread_scratch("pcb_inter", (n, m)), thread_scratch("pcb_intra", (n, m))
    total = thread_scratch("pcb_total", (1, m))
    large = _arguments(storage_array(raw), lo, hi, width, np.float32(n), np.float32(tanh_identity_below),
                       inter, intra, total)
    return torch.from_numpy(inter), torch.from_numpy(intra), int(large)


@njit(nogil=True, cache=True, error_model="numpy")
def _arguments(raw, lo, hi, width, n_tasks, identity_below, inter, intra, total):
    base = raw[0]
    n = raw.shape[0] - 1
    for i in range(n):
        row, tau = raw[i + 1], inter[i]
        for j in range(row.shape[0]):
            tau[j] = load(row[j]) - load(base[j])
    sum_rows(inter, n, total[0])
    s = total[0]
    large = np.int64(0)
    for i in range(n):
        tau, arg = inter[i], intra[i]
        low, high, span = lo[i], hi[i], width[i]
        row_large = np.int32(0)
        for j in range(tau.shape[0]):
            a = abs(tau[j])
            a = low if a < low else a  # clamp(|tau|, lo, hi), as torch's clamp_
            a = high if a > high else a
            normalized = (a - low) / span
            arg[j] = normalized * normalized * n_tasks
            x = tau[j] * s[j]
            tau[j] = x
            row_large += np.int32(abs(x) >= identity_below)  # int32 counters vectorise best
        large += row_large
    return large
