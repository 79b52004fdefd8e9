"""TIES-Merging's merge step fused over the stored inputs, with a provisional majority of +1.

Exactly the float32 operations of `mergeflow.methods.ties.merge_elected_provisional`, in the
same order, so the results are bitwise equal:
  trimmed_i = hardshrink(theta_i - theta_0, below_i)       (|tau| >= the task's threshold)
              * lam_i                                      (per-task lam only)
  gamma     = sign(trimmed_0 + trimmed_1 + ...)            (summed in task order)
  vote      = sign(gamma + 0.5)                            (gamma, and +1 where gamma = 0)
  agreeing_i = clamp_min(trimmed_i * vote, 0)
  tau       = mean: sum_i agreeing_i / max(count_i(agreeing_i > 0), 1) * vote
              sum:  sum_i agreeing_i * vote
              max:  |max_i agreeing_i| * vote
              weighted_mean: sum_i agreeing_i / (sum_i lam_i [agreeing_i > 0], 1 if 0) * vote
  out       = tau * lam + theta_0   (scalar lam)   or   tau + theta_0   (per-task lam)
Entries whose summed sign is exactly 0, where tau is not 0 or the base is -0.0, depend on the
whole model's majority sign; their positions are returned with their values for a majority of -1 and of 0.
DARE-TIES (`dare_ties_merge`) is the same with DARE's drop and rescale in place of the trim.
Each loop runs over one row of a tile of scratch (see rows.TILE), with its branches outside, so
LLVM vectorises it.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from mergeflow.kernels import storage_array, thread_scratch
from mergeflow.kernels.draws import NO_DROP, drop_arguments
from mergeflow.kernels.rows import drop_rows, scale_rows, sum_rows, tile_columns
from mergeflow.kernels.storage import is_negative_zero, load, store

AGG_CODES = {"mean": 0, "sum": 1, "max": 2, "weighted_mean": 3}
OPEN_BLOCK = 256  # entries counted at once before a scan for open ones


@njit(inline="always")
def _sign(x):
    return np.float32((x > 0) - (x < 0))


@njit(inline="always")
def _clamp_min_zero(x):
    return np.float32(0.0) if x < 0 else x  # keeps -0.0, as torch's clamp_min does


def merge(raw: torch.Tensor, out: torch.Tensor, thresholds: torch.Tensor, lam: float | list[float],
          agg: str) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """TIES's trim, election (provisional majority +1) and disjoint aggregation into `out`.

    `thresholds`: one |tau| threshold per task (entries at or above it are kept). Returns 0 (the
    trim does not count non-finite inputs: the threshold pass before it checked them), the sum
    of the elected signs, the positions whose value depends on the whole model's majority sign,
    and their merged float32 values for a majority of -1 and of 0.
    """
    t = thresholds.to(torch.float32).reshape(-1).numpy()
    below = np.nextafter(t, np.float32(-np.inf)).astype(np.float32)  # |d| >= t is |d| > below
    return _merged(raw, out, lam, agg, False, below, NO_DROP)


def dare_ties_merge(raw: torch.Tensor, out: torch.Tensor, keys: np.ndarray, start: int, threshold: int, p: float,
                    lam: float | list[float], agg: str) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """`merge` with DARE's drop instead of the trim: entry j of task i (flat position start + j
    in its tensor) is kept where its draw from the stream keyed keys[i] is >= threshold
    (dare.keep_mask's rule), then rescaled by 1 / (1 - p). The first number returned is how
    many input values are not finite (this is dare_ties's only read of them)."""
    drop = drop_arguments(keys, start, threshold, p, tile_columns(raw.shape[1]))
    return _merged(raw, out, lam, agg, True, _NO_BELOW, drop)


_NO_BELOW = np.empty(0, dtype=np.float32)  # the trim's argument, where the kernel drops instead


def _merged(raw: torch.Tensor, out: torch.Tensor, lam: float | list[float], agg: str, dare: bool,
            below: np.ndarray, drop: tuple):
    """Run `_loops` (TIES's trim, or DARE's drop with `dare`); return its non-finite count, signs
    and open entries."""
    n, m = raw.shape[0] - 1, raw.shape[1]
    per_task = isinstance(lam, list)
    lams = np.asarray(lam if per_task else [1.0] * n, dtype=np.float32)
    # what each agreeing entry adds to the divisor: its task's lam for "weighted_mean", else 1
    weights = lams if agg == "weighted_mean" else np.ones(n, dtype=np.float32)
    scratch = thread_scratch("ties_scratch", (n + 3, tile_columns(m)))
    positions = thread_scratch("ties_open_positions", (m,), np.int64)
    if_negative, if_zero = thread_scratch("ties_open_negative", (m,)), thread_scratch("ties_open_zero", (m,))
    stored, scale, code = storage_array(raw), np.float32(0.0 if per_task else lam), AGG_CODES[agg]
    nonfinite, signs, opened = _loops(stored, dare, below, drop, lams, per_task, scale, code, weights,
                                      storage_array(out), scratch, positions, if_negative, if_zero)
    return (int(nonfinite), int(signs), positions[:opened].copy(), if_negative[:opened].copy(),
            if_zero[:opened].copy())


@njit(nogil=True, cache=True, error_model="numpy")
def _loops(raw, dare, below, drop, lams, per_task, lam, agg, weights, out, scratch, positions, if_negative,
           if_zero):
    """raw: (n + 1, m) stored values, base first. The first stage is TIES's trim, or with `dare`
    DARE's drop:
    - trim: below (n,) float32, the largest float32 under each task's threshold;
    - drop: `drop`, rows.drop_rows' tuple (the tasks' draw keys, the unit's first flat entry,
      the keep threshold, keep_scale = 1 - p, scratch); the task vectors are multiplied by the
      0/1 keep mask and divided by keep_scale (not at all for p = 0).
    lams: (n,) float32 per-task coefficients (used if per_task); lam: float32 scale (used if not
    per_task); agg: AGG_CODES; weights: (n,) float32, each task's share of the agreeing count;
    out: (m,) storage; scratch: (n + 3, tile) float32; positions, if_negative, if_zero: (m,),
    filled with the open entries (see `_open_entries`).

    Returns how many input values are not finite (counted by the drop only: 0 with the trim),
    the sum of the elected signs and the number of open entries. Works a tile of columns at a
    time (see rows.TILE).
    """
    m, tile = raw.shape[1], scratch.shape[1]
    finite, signs, opened = np.int64(0), np.int64(0), 0
    for j0 in range(0, m, tile):
        j1 = min(m, j0 + tile)
        if dare:
            finite += drop_rows(raw, j0, j1, drop, scratch)
        else:
            _trim(raw, j0, j1, below, scratch)
        if per_task:
            scale_rows(scratch, raw.shape[0] - 1, j1 - j0, lams)
        signs += _elect_and_merge(raw, j0, j1, scratch, weights, per_task, lam, agg, out)
        opened = _open_entries(raw, j0, j1, scratch, weights, per_task, lam, agg, positions, if_negative, if_zero,
                               opened)
    return (raw.shape[0] * m - finite if dare else 0), signs, opened


@njit(nogil=True, cache=True, error_model="numpy")
def _elect_and_merge(raw, j0, j1, scratch, weights, per_task, lam, agg, out):
    """From the tile's task vectors in scratch[:n]: elected signs, disjoint aggregate, merged
    output out[j0:j1]. Leaves the signs in scratch[n] and tau in scratch[n + 1]."""
    n, w = scratch.shape[0] - 3, j1 - j0
    gamma, total, count = scratch[n, :w], scratch[n + 1, :w], scratch[n + 2, :w]
    sum_rows(scratch, n, w, gamma)  # summed in task order, like sum_over_tasks
    signs = np.int32(0)  # int32 vectorises; a tile has far fewer than 2**31 entries
    for j in range(w):
        g = _sign(gamma[j])
        gamma[j] = g
        signs += np.int32(g)
    if agg == 2:
        _agreeing_max(scratch, n, w, gamma, total)
    else:
        _agreeing_sum_and_count(scratch, n, w, gamma, weights, total, count)
    _write(raw[0, j0:j1], gamma, total, count, per_task, lam, agg, out[j0:j1])
    return np.int64(signs)


@njit(nogil=True, cache=True, error_model="numpy")
def _trim(raw, j0, j1, below, scratch):
    """scratch[i, :j1 - j0] = hardshrink(theta_i - theta_0, below_i) over the columns [j0, j1)."""
    base = raw[0, j0:j1]
    for i in range(raw.shape[0] - 1):
        row, t_row, shrink = raw[i + 1, j0:j1], scratch[i, :j1 - j0], below[i]
        for j in range(row.shape[0]):
            d = load(row[j]) - load(base[j])
            inside = (d >= -shrink) & (d <= shrink)  # `&`, not `and`: no branch in the loop
            t_row[j] = np.float32(0.0) if inside else d


@njit(nogil=True, cache=True, error_model="numpy")
def _agreeing_sum_and_count(scratch, n, w, gamma, weights, total, count):
    """The agreeing values' sum and weighted count (sum of their tasks' weights), added in task
    order like sum_over_tasks. A weight of 1 multiplies exactly."""
    first, weight = scratch[0, :w], weights[0]
    for j in range(w):
        a = _clamp_min_zero(first[j] * _vote(gamma[j]))
        total[j] = a
        count[j] = _sign(a) * weight
    for i in range(1, n):
        row, weight = scratch[i, :w], weights[i]
        for j in range(w):
            a = _clamp_min_zero(row[j] * _vote(gamma[j]))
            total[j] += a
            count[j] += _sign(a) * weight


@njit(nogil=True, cache=True, error_model="numpy")
def _agreeing_max(scratch, n, w, gamma, best):
    """The largest agreeing magnitude; torch's vectorised maximum keeps the later of equal zeros."""
    for j in range(w):
        best[j] = -np.inf
    for i in range(n):
        row = scratch[i, :w]
        for j in range(w):
            a = _clamp_min_zero(row[j] * _vote(gamma[j]))
            best[j] = best[j] if best[j] > a else a
    for j in range(w):
        best[j] = abs(best[j])  # as the torch code's abs_: +0.0 where nothing agrees


@njit(nogil=True, cache=True, error_model="numpy")
def _write(base, gamma, total, count, per_task, lam, agg, out):
    """tau, kept in `total`, and out = tau * lam + theta_0 (tau + theta_0 with per-task lam).
    One loop per case, so no loop has a branch LLVM would have to take out first."""
    if agg == 0 or agg == 3:  # (weighted) mean: divide by the agreeing weights' sum, 1 where it is 0
        for j in range(gamma.shape[0]):
            total[j] = total[j] / _divisor(count[j]) * _vote(gamma[j])
    else:
        for j in range(gamma.shape[0]):
            total[j] = total[j] * _vote(gamma[j])
    if per_task:
        for j in range(gamma.shape[0]):
            merged = total[j] + load(base[j])
            store(out, j, merged)
    else:
        for j in range(gamma.shape[0]):
            merged = total[j] * lam + load(base[j])
            store(out, j, merged)


@njit(inline="always")
def _is_open(g, tau, base_value):
    """Whether an entry's value depends on the whole model's majority sign: its summed sign is 0
    and tau > 0 (so the vote matters) or the base is -0.0 (so even tau = 0 shows the vote)."""
    return (g == 0) & ((tau > 0) | is_negative_zero(base_value))


@njit(nogil=True, cache=True, error_model="numpy")
def _open_entries(raw, j0, j1, scratch, weights, per_task, lam, agg, positions, if_negative, if_zero, opened):
    """Append the tile's open entries (see `_is_open`) after the first `opened`: their positions
    and merged float32 values for a whole-model majority of -1 and of 0, as `merge_elected`
    gives them. Returns the new count. Open entries are rare (~1 in 6,000 entries of random
    bf16 fine-tunes), so each block of OPEN_BLOCK entries is counted first, vectorised, and
    only a block that has one is scanned."""
    n, w = scratch.shape[0] - 3, j1 - j0
    gamma, total, base = scratch[n, :w], scratch[n + 1, :w], raw[0, j0:j1]
    for b0 in range(0, w, OPEN_BLOCK):
        b1 = min(w, b0 + OPEN_BLOCK)
        # slices, so indices start at 0 and LLVM sees no negative index to wrap: it vectorises
        block_gamma, block_total, block_base = gamma[b0:b1], total[b0:b1], base[b0:b1]
        count = np.int32(0)
        for j in range(b1 - b0):
            count += np.int32(_is_open(block_gamma[j], block_total[j], block_base[j]))
        if count == 0:
            continue
        for p in range(b0, b1):
            if _is_open(gamma[p], total[p], base[p]):
                positions[opened] = j0 + p
                if_negative[opened], if_zero[opened] = _open_values(scratch, n, p, load(base[p]), weights,
                                                                    per_task, lam, agg)
                opened += 1
    return opened


@njit(inline="always")
def _open_values(scratch, n, p, b, weights, per_task, lam, agg):
    """Entry p's merged values for a majority of -1 and of 0: both vote -1 there, and with "max"
    a majority of 0 scales by gamma (0) instead of the vote."""
    a = _clamp_min_zero(scratch[0, p] * np.float32(-1.0))
    tau, agreeing, best = a, _sign(a) * weights[0], a  # max(-inf, a) is a
    for i in range(1, n):
        a = _clamp_min_zero(scratch[i, p] * np.float32(-1.0))
        tau += a
        agreeing += _sign(a) * weights[i]
        best = best if best > a else a
    if agg == 0 or agg == 3:
        negative = tau / _divisor(agreeing) * np.float32(-1.0)
        zero = negative
    elif agg == 1:
        negative = tau * np.float32(-1.0)
        zero = negative
    else:
        negative = abs(best) * np.float32(-1.0)
        zero = abs(best) * np.float32(0.0)
    if per_task:
        return negative + b, zero + b
    return negative * lam + b, zero * lam + b


@njit(inline="always")
def _divisor(count):
    """The (weighted) mean's divisor: the agreeing entries' summed weights, 1 where that is 0.
    For "mean" the weights are 1, so this is torch's clamp of the count to at least 1."""
    return count if count != 0 else np.float32(1.0)


@njit(inline="always")
def _vote(g):
    """sign(gamma + 0.5): gamma, and +1 where it is 0 (the provisional majority)."""
    return _sign(g + np.float32(0.5))
