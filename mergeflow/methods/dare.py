"""DARE (Yu et al., ICML 2024): drop delta entries at random, rescale the rest by 1 / (1 - p).

tau~_i = (1 - m_i) * tau_i / (1 - p), m_i ~ Bernoulli(p) per entry, a fresh mask per task.
- `dare(p, lam, seed)`: DARE + Task Arithmetic, theta = theta_0 + lam * sum_i tau~_i
  (lam may be a list: theta = theta_0 + sum_i lam_i tau~_i).
- `dare_ties(p, lam, agg, seed)`: DARE replaces TIES' magnitude trim (mergekit `dare_ties`), then
  the TIES election (sign of the sum; exact zeros take the whole model's majority sign) and the
  disjoint aggregation (`agg`, default "sum" as in mergekit / FusionBench), then lam (a list
  applies per task before the election, as in `ties`).

Masks never depend on scheduling: the mask of task i in tensor `name` is drawn in fixed blocks of
MASK_BLOCK entries of the flattened tensor, block b from a PCG64 stream seeded by
sha256(seed, name, i, b) (`keep_mask`). The streaming engine may process any row range of a tensor
(`TensorGroup.offset`) and gets the same mask as the in-memory path. Masks are drawn on the CPU
(the same bits on every device) and moved to the group's device.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

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
MASK_BLOCK = 1 << 16  # entries per independently seeded block of a mask


class DareParams(Hyperparams):
    p: float = Field(0.9, ge=0.0, lt=1.0, description="drop probability of each delta entry")
    lam: float | list[float] = Field(1.0, description="scale of the summed task vectors, or one per task")
    seed: int = Field(0, description="random seed of the drop masks")

    @field_validator("lam")
    @classmethod
    def _non_empty(cls, v: float | list[float]) -> float | list[float]:
        if isinstance(v, list) and not v:
            raise ValueError("lam as a list needs one value per fine-tuned model")
        return v


class DareTiesParams(DareParams):
    agg: Agg = Field("sum", description="disjoint aggregation after the drop (weighted_mean: see ties)")

    @model_validator(mode="after")
    def _weighted_mean_needs_lams(self) -> DareTiesParams:
        check_weighted_mean(self.agg, self.lam)
        return self


def _block_seed(seed: int, name: str, task: int, block: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{task}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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


def draws(seed: int, name: str, task: int, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
    """The uniform 32-bit draws (uint32) of entries [start, start + count) of task `task`'s
    flattened tensor: entry j of a block of MASK_BLOCK entries takes the j-th little-endian half
    of the block's PCG64 stream. Raw PCG64 words are ~3x faster to draw than torch.rand, and a
    block's stream can be advanced to any entry, so a range starting mid-block draws only the
    numbers it uses."""
    out = np.empty(count, dtype=np.uint32) if out is None else out
    pos = start
    while pos < start + count:
        block, within = divmod(pos, MASK_BLOCK)
        take = min(MASK_BLOCK - within, start + count - pos)
        words = np.random.PCG64(_block_seed(seed, name, task, block))
        words.advance(within // 2)  # two draws per 64-bit word
        skip = within % 2
        raw = words.random_raw((skip + take + 1) // 2).astype("<u8", copy=False)
        out[pos - start: pos - start + take] = raw.view("<u4")[skip: skip + take]
        pos += take
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


def _unit_draws(name: str, offset: int, n: int, m: int, params: DareParams) -> np.ndarray:
    """The draws of a unit's m entries from flat `offset`, one row per task (a reused buffer)."""
    from mergeflow.kernels import thread_scratch

    words = thread_scratch("dare_draws", (n, m), np.uint32)
    if params.p > 0.0:  # p = 0 keeps everything: no draws needed
        for i in range(n):
            draws(params.seed, name, i, offset, m, out=words[i])
    return words


def _dare_fused_cpu(name: str, offset: int, raw: torch.Tensor, out: torch.Tensor, params: DareParams,
                    stats: GlobalStats, candidates: torch.Tensor | None) -> tuple[int, None]:
    """`dare` in one kernel (mergeflow.kernels.dare), with the same draws as `keep_mask`."""
    from mergeflow.kernels import dare as kernel

    words = _unit_draws(name, offset, raw.shape[0] - 1, raw.shape[1], params)
    return kernel.merge(raw, out, words, keep_threshold(params.p), params.p, params.lam), None


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
    draws as `keep_mask`; open entries included. It is dare_ties's only pass, so it also counts
    the non-finite inputs."""
    from mergeflow.kernels import storage_array
    from mergeflow.kernels import ties as kernel
    from mergeflow.kernels.rows import count_nonfinite

    words = _unit_draws(name, offset, raw.shape[0] - 1, raw.shape[1], params)
    result = kernel.dare_ties_merge(raw, out, words, keep_threshold(params.p), params.p, params.lam, params.agg)
    return kernel_provisional(int(count_nonfinite(storage_array(raw))), *result)


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
