"""DARE (Yu et al., ICML 2024): drop delta entries at random, rescale the rest by 1 / (1 - p).

tau~_i = (1 - m_i) * tau_i / (1 - p), m_i ~ Bernoulli(p) per entry, a fresh mask per task.
- `dare(p, lam, seed)`: DARE + Task Arithmetic, theta = theta_0 + lam * sum_i tau~_i
  (lam may be a list: theta = theta_0 + sum_i lam_i tau~_i).
- `dare_ties(p, lam, agg, seed)`: DARE replaces TIES' magnitude trim (mergekit `dare_ties`), then
  the TIES election (sign of the sum; exact zeros take the whole model's majority sign) and the
  disjoint aggregation (`agg`, default "sum" as in mergekit / FusionBench), then lam (a list
  applies per task before the election, as in `ties`).

Masks never depend on scheduling: entry j of task i's flattened tensor `name` draws the j-th
32-bit half (low half first) of a SplitMix64 stream keyed by sha256(seed, name, i) (`draws`,
`keep_mask`). SplitMix64's k-th word is a pure function of the key and k, so any range of entries
is drawn directly, with no stream to advance: the streaming engine may process any row range of a
tensor (`TensorGroup.offset`) and gets the same mask as the in-memory path, and its fused kernels
(mergeflow.kernels.draws) compute the same words inline. Masks are drawn on the CPU (the same bits
on every device) and moved to the group's device.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from pydantic import Field, model_validator

from mergeflow.methods.base import (
    CpuKernel,
    FusedLastPass,
    GlobalStats,
    Hyperparams,
    Provisional,
    Reduce,
    StatPass,
    TensorGroup,
    sum_over_tasks,
)
from mergeflow.methods.registry import register
from mergeflow.methods.ties import (
    Agg,
    check_weighted_mean,
    kernel_provisional,
    majority_sign,
    merge_elected,
    merge_elected_provisional,
    scale_per_task,
    sign_count_values,
)

PAPER = "Yu et al., Language Models are Super Mario (DARE), ICML 2024"
# SplitMix64 (Steele, Lea & Flood, 2014): word k of the stream keyed `key` is
# mix(key + (k + 1) * GOLDEN); mix is its output function (Stafford's variant 13).
SPLITMIX_GOLDEN = 0x9E3779B97F4A7C15
SPLITMIX_MUL1 = 0xBF58476D1CE4E5B9
SPLITMIX_MUL2 = 0x94D049BB133111EB
WORDS_PER_BLOCK = 1 << 15  # words drawn at a time by `draws` (256 KiB of uint64: stays in cache)


class DareParams(Hyperparams):
    p: float = Field(0.9, ge=0.0, lt=1.0, description="drop probability of each delta entry")
    lam: float | list[float] = Field(1.0, description="scale of the summed task vectors, or one per task")
    seed: int = Field(0, description="random seed of the drop masks")


class DareTiesParams(DareParams):
    agg: Agg = Field("sum", description="disjoint aggregation after the drop (weighted_mean: see ties)")

    @model_validator(mode="after")
    def _weighted_mean_needs_lams(self) -> DareTiesParams:
        check_weighted_mean(self.agg, self.lam)
        return self


def mask_key(seed: int, name: str, task: int) -> int:
    """The 64-bit SplitMix64 key of task `task`'s mask of tensor `name`."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def keep_mask(seed: int, name: str, task: int, numel_total: int, start: int, count: int, p: float,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask (float32, 1.0 = kept) for entries [start, start + count) of task `task`'s
    flattened tensor. Float, not bool: torch's CPU kernels are several times slower on bool.

    Entry j is kept when its uniform 32-bit draw u_j (`draws`) has u_j / 2**32 >= p, so
    P(keep) = 1 - p (to 2**-32). `out`: a contiguous float32 CPU tensor of `count` entries to
    fill (returned)."""
    del numel_total  # the mask of an entry depends only on its position, not on the tensor size
    out = torch.empty(count, dtype=torch.float32) if out is None else out
    words = draws(seed, name, task, start, count)
    np.greater_equal(words, keep_threshold(p), out=out.numpy(), casting="unsafe")
    return out


def keep_threshold(p: float) -> int:
    """The smallest 32-bit draw that keeps its entry."""
    return min(math.ceil(p * 2**32), 2**32 - 1)


def draws(seed: int, name: str, task: int, start: int, count: int) -> np.ndarray:
    """The uniform 32-bit draws (uint32) of entries [start, start + count) of task `task`'s
    flattened tensor: entry j takes half j % 2 (low half first) of word j // 2 of the SplitMix64
    stream keyed mask_key(seed, name, task). Drawn WORDS_PER_BLOCK words at a time, in place."""
    out = np.empty(count, dtype=np.uint32)
    key = np.uint64(mask_key(seed, name, task))
    first, end = start // 2, (start + count + 1) // 2  # the words that hold the range
    for w0 in range(first, end, WORDS_PER_BLOCK):
        z = np.arange(w0 + 1, min(end, w0 + WORDS_PER_BLOCK) + 1, dtype=np.uint64)  # k + 1
        z *= np.uint64(SPLITMIX_GOLDEN)
        z += key
        z ^= z >> np.uint64(30)
        z *= np.uint64(SPLITMIX_MUL1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(SPLITMIX_MUL2)
        z ^= z >> np.uint64(31)
        halves = z.astype("<u8", copy=False).view("<u4")  # entries 2 * w0, 2 * w0 + 1, ...
        lo, hi = max(start, 2 * w0), min(start + count, 2 * w0 + halves.size)
        out[lo - start: hi - start] = halves[lo - 2 * w0: hi - 2 * w0]
    return out


def drop_and_rescale(group: TensorGroup, p: float, seed: int) -> torch.Tensor:
    """tau~ for every task, shape (n, *shape), in float32 on the group's device."""
    deltas = group.deltas
    if p == 0.0:
        return deltas
    per_task = deltas[0].numel()
    masks = torch.empty((group.n, per_task), dtype=torch.float32)
    for i in range(group.n):
        keep_mask(seed, group.name, i, per_task, group.offset, per_task, p, out=masks[i])
    return deltas.mul_(masks.reshape(deltas.shape).to(deltas.device)).div_(1.0 - p)  # deltas is fresh


def _mask_keys(name: str, n: int, params: DareParams) -> np.ndarray:
    """The draw keys of tensor `name`'s n task masks, for the kernels (which draw inline)."""
    return np.array([mask_key(params.seed, name, i) for i in range(n)], dtype=np.uint64)


def _dare_fused_cpu(name: str, offset: int, raw: torch.Tensor, out: torch.Tensor, params: DareParams,
                    stats: GlobalStats, candidates: torch.Tensor | None) -> tuple[int, None]:
    """`dare` in one kernel (mergeflow.kernels.dare), with the same draws as `keep_mask`."""
    from mergeflow.kernels import dare as kernel

    keys = _mask_keys(name, raw.shape[0] - 1, params)
    return kernel.merge(raw, out, keys, offset, keep_threshold(params.p), params.p, params.lam), None


@register(
    "dare",
    hyperparams=DareParams,
    paper=PAPER,
    summary="random drop (p) and 1/(1-p) rescale of task vectors, then task arithmetic",
    elementwise=True,
    cpu_kernel=CpuKernel(_dare_fused_cpu),
)
def dare(group: TensorGroup, params: DareParams, stats: GlobalStats) -> torch.Tensor:
    tau = drop_and_rescale(group, params.p, params.seed)
    if isinstance(params.lam, list):
        return group.base + sum_over_tasks(scale_per_task(tau, params.lam))
    return group.base + params.lam * sum_over_tasks(tau)


def _dropped(group: TensorGroup, params: DareTiesParams) -> torch.Tensor:
    return scale_per_task(drop_and_rescale(group, params.p, params.seed), params.lam)


MAJORITY_PASS = StatPass(
    values=lambda g, p, s: {"dare_ties_sign": sign_count_values(_dropped(g, p))},
    reductions=lambda p: {"dare_ties_majority": Reduce("dare_ties_sign", "sum")},
)


def _dare_ties_fused_cpu(name: str, offset: int, raw: torch.Tensor, out: torch.Tensor, params: DareTiesParams,
                         stats: GlobalStats, candidates: torch.Tensor | None) -> tuple[int, Provisional]:
    """The fused last pass of dare_ties in one kernel (mergeflow.kernels.ties), with the same
    draws as `keep_mask`; open entries included. It is dare_ties's only pass, so the kernel
    also counts the non-finite inputs."""
    from mergeflow.kernels import ties as kernel

    keys = _mask_keys(name, raw.shape[0] - 1, params)
    return kernel_provisional(*kernel.dare_ties_merge(raw, out, keys, offset, keep_threshold(params.p), params.p,
                                                      params.lam, params.agg))


@register(
    "dare_ties",
    hyperparams=DareTiesParams,
    paper=PAPER,
    summary="DARE drop + rescale instead of the TIES trim, then TIES sign election and disjoint merge",
    stat_passes=(MAJORITY_PASS,),
    elementwise=True,
    fused_last_pass=FusedLastPass(
        "dare_ties_majority",
        lambda g, p, s: merge_elected_provisional(g.base, _dropped(g, p), p.agg, p.lam)),
    cpu_kernel=CpuKernel(_dare_ties_fused_cpu),
)
def dare_ties(group: TensorGroup, params: DareTiesParams, stats: GlobalStats) -> torch.Tensor:
    return merge_elected(group.base, _dropped(group, params), params.agg, params.lam,
                         majority_sign(stats["dare_ties_majority"]))
