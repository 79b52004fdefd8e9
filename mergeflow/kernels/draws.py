"""DARE's random draws inside the kernels: the SplitMix64 words of `mergeflow.methods.dare.draws`.

Word k of the stream keyed `key` is a pure function of (key, k), so a kernel draws a tile's words
where it needs them, with no stream to advance and no draws array to read: 0.28 ns per draw
here, where the numpy reference (`dare.draws`) takes ~1.3 ns. tests/test_kernels.py checks that both give the
same bits for any start and length.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergeflow.kernels import thread_scratch
from mergeflow.methods.dare import SPLITMIX_GOLDEN, SPLITMIX_MUL1, SPLITMIX_MUL2

_GOLDEN, _MUL1, _MUL2 = np.uint64(SPLITMIX_GOLDEN), np.uint64(SPLITMIX_MUL1), np.uint64(SPLITMIX_MUL2)


@njit(inline="always")
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


@njit(nogil=True, cache=True, error_model="numpy")
def tile_draws(key, start, count, words):
    """The draws (uint32) of entries [start, start + count) of the stream keyed `key`, as
    `dare.draws` gives them, computed into the uint64 scratch `words` (at least count // 2 + 1
    words) and returned as a view of it."""
    first = start >> 1  # the word that holds entry `start`
    for k in range((start + count + 1) // 2 - first):
        words[k] = _mix(key + (np.uint64(first + k) + np.uint64(1)) * _GOLDEN)
    skip = start & 1  # entry `start` is the high half of its word
    return words.view(np.uint32)[skip: skip + count]


def drop_arguments(keys: np.ndarray, start: int, threshold: int, p: float, tile: int) -> tuple:
    """rows.drop_rows' `drop` tuple: the tasks' keys (uint64), the unit's first flat entry, the
    keep threshold, keep_scale = 1 - p (0 for p = 0: nothing is dropped) and this thread's
    scratch for the words of a tile of `tile` entries."""
    words = thread_scratch("dare_words", (tile // 2 + 1,), np.uint64)
    keep_scale = np.float32(0.0 if p == 0.0 else 1.0 - p)
    return np.asarray(keys, dtype=np.uint64), np.int64(start), np.uint32(threshold), keep_scale, words


# drop_rows' arguments where a kernel does not drop (TIES's trim): the same types, nothing drawn
NO_DROP = (np.empty(0, np.uint64), np.int64(0), np.uint32(0), np.float32(0.0), np.empty(0, np.uint64))
