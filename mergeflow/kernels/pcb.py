"""PCB-Merging (the nlp variant) fused over the stored inputs: the score pass's arguments of exp
and tanh (`score_arguments`) and its window counts from the two factors of the scores
(`ScoreWindow`), and the merge at the candidates (`merge_nlp`). The method
(`mergeflow.methods.pcb`) chooses the positions and passes the statistics.

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

import math
from collections.abc import Callable

import numpy as np
import torch
from numba import njit

from mergeflow.kernels import row_floats, storage_array, thread_scratch
from mergeflow.kernels.rows import flagged, sum_rows
from mergeflow.kernels.storage import f32_bits, load, store


def score_arguments(raw: torch.Tensor, low: torch.Tensor, high: torch.Tensor, tanh_identity_below: float,
                    columns: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(inter, intra, large): inter and intra (n, w) float32 on this thread's scratch (valid until
    its next call), from the stacked stored values raw (n + 1, m) (its `columns` [j0, j1), w wide;
    all by default) and each task's clip bounds low, high (n,); `large` counts the inter entries
    at or above `tanh_identity_below` in magnitude (where tanh is not the identity: when there
    are none, tanh has nothing to do)."""
    n = raw.shape[0] - 1
    j0, j1 = columns or (0, raw.shape[1])
    lo, hi = row_floats(low, n), row_floats(high, n)
    inter, intra = thread_scratch("pcb_inter", (n, j1 - j0)), thread_scratch("pcb_intra", (n, j1 - j0))
    total = thread_scratch("pcb_total", (1, j1 - j0))
    large = _arguments(storage_array(raw), j0, j1, lo, hi, _span(lo, hi), np.float32(n),
                       np.float32(tanh_identity_below), inter, intra, total)
    return torch.from_numpy(inter), torch.from_numpy(intra), int(large)


@njit(inline="always")
def _entry(t, total, low, high, span, n_tasks):
    """One entry of task tau = t, summed tau = total: (A, exp's argument, tanh's argument) with
    A = clamp(|t|, low, high), as torch's clamp_. No loop inside, so inlining keeps the callers'
    loops vectorised."""
    a = abs(t)
    a = low if a < low else a
    a = high if a > high else a
    normalized = (a - low) / span
    return a, normalized * normalized * n_tasks, t * total


@njit(nogil=True, cache=True, error_model="numpy")
def _arguments(raw, j0, j1, lo, hi, width, n_tasks, identity_below, inter, intra, total):
    base = raw[0, j0:j1]  # slices indexed from 0 (see kernels.rows): the loops vectorise
    n = raw.shape[0] - 1
    for i in range(n):
        row, tau = raw[i + 1, j0:j1], inter[i]
        for j in range(row.shape[0]):
            tau[j] = load(row[j]) - load(base[j])
    sum_rows(inter, n, inter.shape[1], total[0])
    s = total[0]
    large = np.int64(0)
    for i in range(n):
        tau, arg = inter[i], intra[i]
        low, high, span = lo[i], hi[i], width[i]
        row_large = np.int32(0)
        for j in range(tau.shape[0]):
            _, arg[j], x = _entry(tau[j], s[j], low, high, span, n_tasks)
            tau[j] = x
            row_large += np.int32(abs(x) >= identity_below)  # int32 counters vectorise best
        large += row_large
    return large


def merge_nlp(raw: torch.Tensor, out: torch.Tensor, positions: torch.Tensor,
              bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], lam: float,
              tanh_: Callable[[torch.Tensor], torch.Tensor], tanh_identity_below: float) -> None:
    """PCB's nlp merge of one unit into `out` (its output storage), as `methods.pcb._merge_at`:
    the base everywhere, and at the flat `positions` (the candidates and the base's -0.0
    entries) theta_0 + lam * sum_i scale_i T_c,i / max(sum_i scale_i, 1e-12). `bounds`: per task,
    the clip's low and high and the scores' cut and max. exp and tanh run in torch (`tanh_`:
    pcb's tanh that skips the identity), at the positions only."""
    stored = storage_array(raw)
    n = stored.shape[0] - 1
    idx = positions.numpy().astype(np.int64, copy=False)
    lo, hi, cut, top = (row_floats(b, n) for b in bounds)
    clipped, inter, intra = (thread_scratch(f"pcb_merge_{s}", (n, idx.size)) for s in ("clipped", "inter", "intra"))
    total = thread_scratch("pcb_merge_total", (1, idx.size))
    large = _candidate_arguments(stored, idx, lo, hi, _span(lo, hi), np.float32(n), np.float32(tanh_identity_below),
                                 clipped, inter, intra, total)
    scores = torch.from_numpy(intra).exp_()
    scores.mul_(tanh_(torch.from_numpy(inter)) if large else torch.from_numpy(inter))
    sums = thread_scratch("pcb_merge_sums", (2, idx.size))
    _weighted_mean_into(stored[0], idx, intra, clipped, cut, top, _span(cut, top), np.float32(lam), sums,
                        storage_array(out))


def _span(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """high - low in float32: as torch's (high - low) column."""
    return (high - low).astype(np.float32)


@njit(nogil=True, cache=True, error_model="numpy")
def _candidate_arguments(raw, idx, lo, hi, width, n_tasks, identity_below, clipped, inter, intra, total):
    """At the positions idx: T_c = sign(tau) * clamp(|tau|, lo, hi), and exp's and tanh's
    arguments as `_arguments`; returns how many tanh arguments reach identity_below."""
    base = raw[0]
    n = raw.shape[0] - 1
    for i in range(n):
        row, tau = raw[i + 1], inter[i]
        for q in range(idx.shape[0]):
            j = idx[q]
            tau[q] = load(row[j]) - load(base[j])
    sum_rows(inter, n, inter.shape[1], total[0])
    s = total[0]
    large = np.int64(0)
    for i in range(n):
        tau, arg, kept = inter[i], intra[i], clipped[i]
        low, high, span = lo[i], hi[i], width[i]
        row_large = np.int32(0)
        for q in range(tau.shape[0]):
            t = tau[q]
            a, arg[q], x = _entry(t, s[q], low, high, span, n_tasks)
            kept[q] = np.float32((t > 0) - (t < 0)) * a  # torch.sign(tau) * A (sign(+-0) is +0)
            tau[q] = x
            row_large += np.int32(abs(x) >= identity_below)
        large += row_large
    return large


@njit(nogil=True, cache=True, error_model="numpy")
def _weighted_mean_into(base, idx, scores, clipped, cut, top, span, lam, sums, out):
    """out = the base, then at idx: theta_0 + lam * sum_i scale_i T_c,i / max(sum_i scale_i, 1e-12)
    with scale_i = (clamp(score_i, cut_i, top_i) - cut_i) / (top_i - cut_i), sums in task order.
    Task by task over contiguous rows (sums: (2, len(idx)) scratch for the two sums), so the
    loops vectorise; each entry gets the same float32 operations in the same order."""
    for j in range(out.shape[0]):
        store(out, j, load(base[j]))
    den, num = sums[0], sums[1]
    for i in range(scores.shape[0]):
        row, kept = scores[i], clipped[i]
        low, high, width = cut[i], top[i], span[i]
        for q in range(row.shape[0]):
            x = row[q]
            x = low if x < low else x
            x = high if x > high else x
            scale = (x - low) / width
            if i == 0:
                den[q], num[q] = scale, kept[q] * scale
            else:
                den[q], num[q] = den[q] + scale, num[q] + kept[q] * scale
    eps = np.float32(1e-12)
    for q in range(idx.shape[0]):
        d = eps if den[q] < eps else den[q]
        j = idx[q]
        merged = num[q] / d * lam + load(base[j])
        store(out, j, merged)


# Columns of a unit the score pass works at a time: the float32 rows of its steps (the kernel's
# arguments, exp and tanh in torch, the window counts) stay in the cache between them instead of
# going through memory (3 MiB for 3 tasks).
SCORE_TILE = 1 << 17

# Flips the magnitude bits of a negative float32's bits: the integers then order as the floats
# (engine.selection.order_keys, here inside a kernel).
_MAGNITUDE_BITS = np.int32(0x7FFFFFFF)


class ScoreWindow:
    """`selection._window_cpu` and the rows' max on the scores exp(intra) * tanh(inter), gathered
    tile by tile from the two factors, without making the scores: one sweep over them instead of
    the product's pass, the window's half dozen and the max's.

    `counts` (3, n): below lo, at lo and at hi; `kept`: each row's values strictly inside;
    `reach`: packed bits of the columns where some row reaches lo; `maxima`: each row's max, as
    torch.amax gives it."""

    def __init__(self, n: int, m: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lows, self.highs = row_floats(lo, n), row_floats(hi, n)
        self.counts = np.zeros((3, n), dtype=np.int64)
        self._top_keys, self._nans = np.full(n, -(2**31), dtype=np.int32), np.zeros(n, dtype=np.int32)
        self._reach = thread_scratch("pcb_reach", (m,), np.bool_)
        self._kept: list[list[np.ndarray]] = [[] for _ in range(n)]
        self._empty = m == 0  # the tiles `add` gets cover the m columns

    def add(self, exp_intra: torch.Tensor, tanh_inter: torch.Tensor, j0: int) -> None:
        """The scores of columns [j0, j0 + w), given as their two factors (n, w)."""
        e, t = exp_intra.numpy(), tanh_inter.numpy()
        n, w = e.shape
        counts, keys, nans = np.zeros((3, n), dtype=np.int64), np.empty(n, dtype=np.int32), np.empty(n, dtype=np.int32)
        inside, kept = thread_scratch("pcb_inside", (n, w), np.bool_), thread_scratch("pcb_kept", (n, w))
        kept_n, positions = np.empty(n, dtype=np.int64), thread_scratch("pcb_positions", (w,), np.int64)
        _score_window_counts(e, t, self.lows, self.highs, counts, inside, self._reach[j0:j0 + w], keys, nans,
                             kept, kept_n, positions)
        self.counts += counts
        np.maximum(self._top_keys, keys, out=self._top_keys)
        self._nans += nans
        for i in range(n):
            self._kept[i].append(kept[i, :kept_n[i]].copy())

    @property
    def kept(self) -> list[torch.Tensor]:
        return [torch.from_numpy(np.concatenate(parts) if parts else np.empty(0, np.float32)) for parts in self._kept]

    @property
    def reach(self) -> np.ndarray:
        return np.packbits(self._reach)

    @property
    def maxima(self) -> torch.Tensor:
        if self._empty:  # an empty unit: the max over nothing, which every value exceeds
            return torch.full(self._top_keys.shape, -math.inf)
        keys = self._top_keys
        maxima = torch.from_numpy(keys ^ ((keys >> 31) & _MAGNITUDE_BITS)).view(torch.float32)
        maxima[torch.from_numpy(self._nans > 0)] = math.nan  # torch.amax: NaN wins
        return maxima



@njit(nogil=True, cache=True, error_model="numpy")
def _score_window_counts(e, t, lo, hi, counts, inside, reach, top_keys, nans, kept, kept_n, positions):
    """Per row i of the scores s = e[i] * t[i]: counts[:, i] (below lo, equal to lo, equal to hi;
    0 at hi when lo == hi), the NaN count, the max's order key (the float's bits with the
    magnitude flipped below 0: their integer order is the float order, and an integer max
    vectorises where a float one does not), and the kept_n[i] values strictly inside the window,
    in order, in kept[i]; reach = some row has s >= lo (or NaN: not below lo), as _window_cpu's ~lt.
    inside (n, w) bool and positions (w,) are scratch."""
    n, w = e.shape
    for j in range(w):
        reach[j] = False
    for i in range(n):
        er, tr, row_inside = e[i], t[i], inside[i]
        low, high = lo[i], hi[i]
        below = at_low = at_high = nan = np.int32(0)
        top = np.int32(-(2**31))
        for j in range(w):
            s = er[j] * tr[j]
            under = s < low
            below += np.int32(under)
            at_low += np.int32(s == low)
            at_high += np.int32(s == high)
            row_inside[j] = (s > low) & (s < high)
            reach[j] = reach[j] | (not under)
            bits = np.int32(f32_bits(s))
            top = max(top, bits ^ ((bits >> 31) & _MAGNITUDE_BITS))
            nan += np.int32(s != s)
        counts[0, i], counts[1, i] = below, at_low
        counts[2, i] = at_high if low != high else 0  # lo == hi: the window's values count at lo
        top_keys[i], nans[i] = top, nan
        c = flagged(row_inside, positions)
        row_kept = kept[i]
        for q in range(c):
            j = positions[q]
            row_kept[q] = er[j] * tr[j]
        kept_n[i] = c
