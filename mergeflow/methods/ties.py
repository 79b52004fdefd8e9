"""TIES-Merging (Yadav et al., NeurIPS 2023), with the official code's exact semantics.

For each task vector tau_i (float tensors only, computed in float32):
1. Trim. `trim_scope="global"` (official, default): over task i's whole-model flattened vector
   (length d), with kk = d - int(d * k), keep every entry with |tau_ij| >= the kk-th smallest
   |tau_i| (entries tied at the threshold are all kept; kk = 0, i.e. k = 1, keeps everything).
   As in the official code this keeps int(d * k) + 1 entries when there are no ties.
   `trim_scope="tensor"` (mergekit's per-tensor variant): the same rule inside each tensor with
   max(1, int(k * numel)) kept for k > 0, as mergekit 0.1.5 (ties at the threshold kept too).
   mergekit keeps exactly int(k * numel) entries by a descending argsort,
   whose order among equal magnitudes torch does not define (its CPU sort is not stable there),
   so no rule can reproduce which tied entries it keeps; keeping them all is deterministic and
   is the global rule's choice (bf16 task vectors tie often: ~1 % more entries kept at k 0.2).
   Its thresholds are per-tensor statistics (Reduce scope "tensor"), so the streaming engine
   splits large tensors into row chunks for both scopes.
2. Elect. gamma_j = sign(sum_i trimmed_ij) ("mass"); entries where gamma_j = 0 take the majority
   sign sign(sum_j gamma_j) over the whole model (all float tensors).
3. Disjoint aggregation over the entries that agree with gamma_j and are non-zero:
   "mean" divides by their count (clamped to 1), "sum" adds them, "max" takes the largest
   magnitude times gamma_j, "weighted_mean" (per-task lam only: mergekit's `normalize` with
   unequal weights) divides by the sum of the agreeing entries' lam_i (1 where that is 0).
4. theta = theta_0 + lam * tau_m.

Per-task coefficients: `lam` may be a list with one value per fine-tuned model. Then task i's
trimmed vector is multiplied by lam[i] *after the trim and before the sign election*
(mergekit applies its per-model `weight` at the same point), and the aggregate is not scaled
again: theta = theta_0 + disjoint_agg(lam_i * trimmed_i). Trimming is unaffected by lam (a
positive scale does not change a task's ranking). With equal positive lam_i = c this equals the
scalar form c * disjoint_agg(trimmed) up to float rounding.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from mergeflow.methods.base import (
    ABS_DELTA_WINDOWS,
    CpuKernel,
    FusedLastPass,
    GlobalStats,
    Hyperparams,
    Provisional,
    Reduce,
    StatPass,
    TensorGroup,
    negative_zeros,
    nonzero_positions,
    sum_over_tasks,
    tensor_stat,
)
from mergeflow.methods.registry import register

PAPER = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023"

Agg = Literal["mean", "sum", "max", "weighted_mean"]


class TiesParams(Hyperparams):
    k: float = Field(0.2, ge=0.0, le=1.0, description="fraction of each task vector kept by the trim")
    lam: float | list[float] = Field(
        1.0, description="scale of the merged task vector, or one coefficient per task (applied "
        "to the trimmed task vectors before sign election)")
    agg: Agg = Field("mean", description="disjoint aggregation: mean, sum, max, or weighted_mean "
                     "(divides by the agreeing entries' per-task lams; needs lam as a list)")
    trim_scope: Literal["global", "tensor"] = Field(
        "global", description="global: top-k over each task's whole model (official); "
        "tensor: top max(1, int(k*numel)) per tensor for k > 0 (mergekit)")
    elect: Literal["mass"] = Field("mass", description="sign election: sign of the summed trimmed values")

    @model_validator(mode="after")
    def _weighted_mean_needs_lams(self) -> TiesParams:
        check_weighted_mean(self.agg, self.lam)
        return self


def check_weighted_mean(agg: str, lam: float | list[float]) -> None:
    """agg="weighted_mean" divides by the agreeing entries' per-task lams: it needs a list."""
    if agg == "weighted_mean" and not isinstance(lam, list):
        raise ValueError("agg='weighted_mean' divides by the per-task lams of the agreeing entries; give lam "
                         "as a list (one per model), or use agg='mean' with a single lam")


# ---- shared building blocks (DARE-TIES reuses the election and aggregation) ----

def kept_rank(d: int, k: float) -> int:
    """1-based rank of the trim threshold among d magnitudes: kk = d - int(d * k), at least 1.

    kk = 0 (keep everything) is served by rank 1: every magnitude is >= the smallest one.
    """
    return max(1, d - int(d * k))


def trim_global(deltas: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Keep entries with |tau| >= the task's threshold; thresholds has one value per task.

    One pass per task: hardshrink keeps |x| > lambd, and for float32 values |x| >= t is
    |x| > the largest float32 below t (t = 0 keeps everything, t = +inf nothing). Trimmed
    entries are +0.0 (the official `M * mask` gives -0.0 for negative ones; no result differs but
    the sign of a zero)."""
    out = torch.empty_like(deltas)
    for i, t in enumerate(thresholds.reshape(-1).tolist()):
        below = float(np.nextafter(np.float32(t), np.float32(-np.inf)))
        torch.hardshrink(deltas[i], below, out=out[i])
    return out


def scale_per_task(trimmed: torch.Tensor, lam: float | list[float]) -> torch.Tensor:
    """Multiply task i by lam[i] (list form only); checks the list length."""
    if not isinstance(lam, list):
        return trimmed
    if len(lam) != trimmed.shape[0]:
        raise ValueError(f"lam has {len(lam)} values but there are {trimmed.shape[0]} fine-tuned models")
    return trimmed * _task_column(lam, trimmed)


def _task_column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """One value per task, shaped to broadcast over `like` (tasks first), in its dtype and device."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape((-1,) + (1,) * (like.dim() - 1))


def elected_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """gamma = sign of the sum over tasks (0 where it is exactly zero)."""
    return sum_over_tasks(trimmed).sign_()  # in place on the fresh sum: one temporary less


def sign_count_values(trimmed: torch.Tensor) -> torch.Tensor:
    """This tensor's contribution to sum_j gamma_j, as a (1, 1) int64 (exact, order-free)."""
    return elected_sign(trimmed).to(torch.int32).sum(dtype=torch.int64).reshape(1, 1)


def resolve_zero_signs(gamma: torch.Tensor, majority: torch.Tensor) -> torch.Tensor:
    """Entries with gamma = 0 take the whole model's majority sign (in place on a fresh gamma)."""
    majority_sign = float(torch.sign(majority.to(torch.float32)).reshape(()))
    return gamma.masked_fill_(gamma == 0, majority_sign)


def _vote(gamma: torch.Tensor, majority_sign: float) -> torch.Tensor:
    """The sign each entry keeps: gamma, and where gamma = 0 the majority sign (+1 or -1).

    A majority of 0 votes -1 there, as the official `where(gamma > 0, T > 0, T < 0)` does.
    sign(gamma +- 0.5) does it in two float passes (gamma is -1, 0 or +1)."""
    return gamma.add(0.5 if majority_sign > 0 else -0.5).sign_()


def elect_and_aggregate(trimmed: torch.Tensor, agg: str, majority_sign: float,
                        lam: float | list[float] = 1.0) -> torch.Tensor:
    """Steps 2 and 3: the elected sign and the disjoint aggregate tau_m, shape trimmed.shape[1:].

    `majority_sign` (+1, 0 or -1) is sign(sum_j gamma_j) over the whole model. The official rule,
    gamma resolved to the majority then `where(gamma > 0, T > 0, T < 0)`, keeps the entries that
    agree with the vote (`_vote`). An agreeing entry has T * vote > 0, so `relu(T * vote)` is |T|
    where it agrees and 0 elsewhere, and the official sum of selected entries is
    vote * sum_i relu(T_i * vote) exactly (multiplying by +-1 and negating a rounded sum are
    exact). Only float ops: torch's CPU kernels are 5-10x slower on bool masks (compare, where,
    masked_fill) than on float arithmetic.
    """
    gamma = elected_sign(trimmed)
    return _aggregate(trimmed, gamma, _vote(gamma, majority_sign), agg, majority_sign, lam)


def _aggregate(trimmed: torch.Tensor, gamma: torch.Tensor, vote: torch.Tensor, agg: str,
               majority_sign: float, lam: float | list[float]) -> torch.Tensor:
    agreeing = (trimmed * vote).clamp_min_(0.0)
    if agg == "mean":
        total = sum_over_tasks(agreeing)
        count = sum_over_tasks(agreeing.sign_())  # agreeing entries are non-zero by construction
        return total.div_(count.clamp_(min=1.0)).mul_(vote)
    if agg == "weighted_mean":  # mergekit: sum(w * t * mask) / sum(w * mask), a zero divisor as 1
        total = sum_over_tasks(agreeing)  # lam is a list: TiesParams / DareTiesParams check it
        divisor = sum_over_tasks(agreeing.sign_().mul_(_task_column(lam, agreeing)))
        return total.div_(divisor.masked_fill_(divisor == 0, 1.0)).mul_(vote)
    if agg == "sum":
        return sum_over_tasks(agreeing).mul_(vote)
    if agg == "max":  # the largest agreeing magnitude times gamma (0 stays 0 if the majority is 0)
        # abs_: the official |selected|.max() is +0.0 where nothing agrees (agreeing may hold -0.0)
        return agreeing.amax(dim=0).abs_().mul_(vote if majority_sign != 0 else gamma)
    raise ValueError(f"unknown agg {agg!r}; use mean, sum, max or weighted_mean")


def majority_sign(sign_sum: torch.Tensor) -> float:
    """sign(sum_j gamma_j) from the summed-sign statistic, as +1.0, 0.0 or -1.0."""
    return float(torch.sign(sign_sum.to(torch.float64)).reshape(()))


def merge_elected(base: torch.Tensor, trimmed: torch.Tensor, agg: str, lam: float | list[float],
                  majority: float) -> torch.Tensor:
    """theta = theta_0 + lam * tau_m, given the whole model's majority sign."""
    return combine(base, elect_and_aggregate(trimmed, agg, majority, lam), lam)


def merge_elected_provisional(base: torch.Tensor, trimmed: torch.Tensor, agg: str,
                              lam: float | list[float]) -> Provisional:
    """`merge_elected` before the majority sign is known (the engine's fused last pass).

    Merged with a provisional majority of +1. Only entries whose summed sign is exactly 0 can
    change with the real majority, and only where their provisional tau is non-zero (some
    entries cancel exactly) or their base is -0.0 (where the sign of a zero tau shows in
    theta_0 + tau). They are gathered here (usually a few), with their values for a majority of
    -1 and of 0, and `resolve` picks the right ones (None for +1: the provisional values stand).
    """
    n = trimmed.shape[0]
    gamma = elected_sign(trimmed)
    partial = gamma.sum(dtype=torch.float64).to(torch.int64).reshape(1)
    vote = _vote(gamma, 1.0)
    tau = _aggregate(trimmed, gamma, vote, agg, 1.0, lam)
    # vote - gamma is 1 where gamma = 0, else 0; there tau >= 0 (a vote of +1), so the dot
    # product is positive exactly when some entry is open (a sum of non-negative values).
    zero = vote.sub_(gamma).reshape(-1)
    sensitive = tau.reshape(-1).abs() + negative_zeros(base.reshape(-1)).to(tau.device, tau.dtype)
    if not float(torch.dot(zero, sensitive)) > 0.0:
        return Provisional(combine(base, tau, lam), partial)
    positions = nonzero_positions(zero.mul_(sensitive))
    sub_trimmed = trimmed.reshape(n, -1).index_select(1, positions)
    sub_base = base.reshape(-1).index_select(0, positions)
    return Provisional(combine(base, tau, lam), partial, positions.to(torch.int32).cpu(),
                       _resolver(sub_base, sub_trimmed, agg, lam))


def _resolver(sub_base: torch.Tensor, sub_trimmed: torch.Tensor, agg: str, lam: float | list[float]):
    """Provisional.resolve for the open entries: their values for a majority of -1 and of 0,
    computed now so nothing large is kept (None for +1: the provisional values stand)."""
    return resolve_with({m: merge_elected(sub_base, sub_trimmed, agg, lam, m).cpu() for m in (-1.0, 0.0)})


def resolve_with(other: dict[float, torch.Tensor]):
    """Provisional.resolve from the open entries' values for a majority of -1 and of 0."""
    return lambda sign_sum: other.get(majority_sign(sign_sum))


def kernel_provisional(nonfinite: int, signs: int, positions: np.ndarray, if_negative: np.ndarray,
                       if_zero: np.ndarray) -> tuple[int, Provisional]:
    """A CpuKernel's result from what mergeflow.kernels.ties returns for a unit."""
    partial = torch.tensor([signs], dtype=torch.int64)
    if not positions.size:
        return nonfinite, Provisional(torch.empty(0), partial)
    resolve = resolve_with({-1.0: torch.from_numpy(if_negative), 0.0: torch.from_numpy(if_zero)})
    return nonfinite, Provisional(torch.empty(0), partial, torch.from_numpy(positions).to(torch.int32), resolve)


def combine(base: torch.Tensor, tau_m: torch.Tensor, lam: float | list[float]) -> torch.Tensor:
    """theta_0 + lam * tau_m (scalar lam); per-task lam was applied before the election.

    Works in place on `tau_m` (callers pass a fresh aggregate): lam * tau_m + theta_0 rounds
    exactly like theta_0 + lam * tau_m (IEEE addition is commutative), without two temporaries.
    """
    if isinstance(lam, list):
        return tau_m.add_(base)
    return tau_m.mul_(lam).add_(base)


# ---- the method ----

def tensor_kept_rank(numel: int, k: float) -> int:
    """mergekit's per-tensor trim: max(1, int(k * numel)) kept for k > 0 (mergekit's
    `sparsify.magnitude` keeps at least one entry of a non-empty tensor), so the threshold is the
    (numel - kept + 1)-th smallest |tau|; keeping none (k = 0) is rank numel + 1 (threshold +inf)."""
    kept = max(1, int(k * numel)) if k > 0 and numel > 0 else 0
    return numel - kept + 1


def _trimmed(group: TensorGroup, params: TiesParams, stats: GlobalStats) -> torch.Tensor:
    deltas = group.deltas
    thresholds = (stats["ties_threshold"] if params.trim_scope == "global"
                  else stats[tensor_stat("ties_tensor_threshold", group.name)])
    return scale_per_task(trim_global(deltas, thresholds.to(deltas.device)), params.lam)


def _magnitudes(group: TensorGroup, params: TiesParams, stats: GlobalStats) -> dict[str, torch.Tensor]:
    return {"ties_abs_tau": group.deltas.abs_().reshape(group.n, -1)}  # deltas is a fresh tensor


def _thresholds(params: TiesParams) -> dict[str, Reduce]:
    k = params.k
    if params.trim_scope == "global":
        return {"ties_threshold": Reduce("ties_abs_tau", "kth", rank=lambda d: kept_rank(d, k))}
    return {"ties_tensor_threshold": Reduce("ties_abs_tau", "kth", rank=lambda d: tensor_kept_rank(d, k),
                                            scope="tensor")}


def _signs(group: TensorGroup, params: TiesParams, stats: GlobalStats) -> dict[str, torch.Tensor]:
    return {"ties_sign": sign_count_values(_trimmed(group, params, stats))}


TRIM_PASS = StatPass(values=_magnitudes, reductions=_thresholds, cpu_window=ABS_DELTA_WINDOWS)
MAJORITY_PASS = StatPass(values=_signs, reductions=lambda p: {"ties_majority": Reduce("ties_sign", "sum")})


def _ties_provisional(group: TensorGroup, params: TiesParams, stats: GlobalStats) -> Provisional:
    return merge_elected_provisional(group.base, _trimmed(group, params, stats), params.agg, params.lam)


def _ties_fused_cpu(name: str, offset: int, raw: torch.Tensor, out: torch.Tensor, params: TiesParams,
                    stats: GlobalStats, candidates: torch.Tensor | None) -> tuple[int, Provisional]:
    """`_ties_provisional` in one fused kernel (mergeflow.kernels.ties), open entries included."""
    from mergeflow.kernels import ties as kernel

    thresholds = (stats["ties_threshold"] if params.trim_scope == "global"
                  else stats[tensor_stat("ties_tensor_threshold", name)])
    return kernel_provisional(*kernel.merge(raw, out, thresholds, params.lam, params.agg))


@register(
    "ties",
    hyperparams=TiesParams,
    paper=PAPER,
    summary="trim each task vector to its top-k (whole model), elect signs by mass, disjoint mean",
    stat_passes=(TRIM_PASS, MAJORITY_PASS),
    elementwise=True,
    fused_last_pass=FusedLastPass("ties_majority", _ties_provisional),
    cpu_kernel=CpuKernel(_ties_fused_cpu),
)
def ties(group: TensorGroup, params: TiesParams, stats: GlobalStats) -> torch.Tensor:
    trimmed = _trimmed(group, params, stats)
    return merge_elected(group.base, trimmed, params.agg, params.lam, majority_sign(stats["ties_majority"]))
