"""PCB-Merging (Du et al., NeurIPS 2024): parameter competition balancing, exact official semantics.

Every per-task operation runs over the task's WHOLE-model vector (all float tensors, sorted by
name, flattened), like the official code, but without flattening: the global order statistics are
two `StatPass`es, and the same per-tensor functions serve the in-memory and streaming paths.

Per task i (row of T = stacked task vectors, d = number of scalars in the model):
1. clip: A = clamp(|T_i|, lo_i, hi_i), lo_i = sorted(|T_i|)[int(d*clip)],
   hi_i = sorted(|T_i|)[int(d*(1-clip)-1)] (0-based indices, as the official `clamp`);
   T_c = sign(T) * A are the vectors that get merged.
2. intra = exp(n * ((A - lo)/(hi - lo))**2) (min-max normalisation; the min and max of the clipped
   row are exactly lo and hi), computed in float32.
3. inter: "nlp"       tanh(T_i * sum_j T_j)                  (task_para_att_merge, pcb-merging.py)
          "vision"    tanh(T_i * sum_j N_j), N = sign(T) * normalised A   (vision pcb.py)
          "vision_es" sum_j tanh(N_i * N_j)                  (vision pcb_ES.py, the searched one)
4. score = intra * inter; q_i = sorted(score_i)[int(d*(1-ratio))], m_i = max(score_i);
   scale = (clamp(score, q, m) - q) / (m - q): only the top `ratio` fraction is > 0.
5. nlp:    theta = theta_0 + lam * sum_i scale_i T_c,i / max(sum_i scale_i, 1e-12)
   vision: theta = theta_0 + sum_i scale_i (lam_i T_c,i) / max(sum_i scale_i, 1e-12)
   Entries where every scale is 0 stay at the base.

Sums over tasks use `sum_over_tasks` (task order): torch.sum(dim=0) in the official code adds
the last d mod 32 columns of the flattened model in another order, so results equal the official
code bitwise except possibly in the last bit of those few entries; and they do not depend on
tensor boundaries or on the engine's row chunks (PCB is elementwise once the stats are known).

Where the official code would divide by zero (a task whose clipped |tau| is constant, e.g. a
fine-tune equal to the base; or a score row whose kept part is all one value) it silently returns
NaN for the whole model; here that is an error that says so.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from mergeflow.methods.base import (
    ABS_DELTA_WINDOWS,
    CpuKernel,
    CpuValues,
    CpuWindow,
    GlobalStats,
    Hyperparams,
    Reduce,
    StatPass,
    TensorGroup,
    WindowCounts,
    negative_zeros,
    nonzero_positions,
    sum_over_tasks,
)
from mergeflow.methods.registry import register

# Names of the global statistics (Tensor(n) each) the stat passes produce.
CLIP_LOW, CLIP_HIGH = "pcb_clip_low", "pcb_clip_high"
SCORE_CUT, SCORE_MAX = "pcb_score_cut", "pcb_score_max"
SCALE_EPS = 1e-12


class PcbParams(Hyperparams):
    ratio: float = Field(0.1, gt=0.0, le=1.0, description="kept fraction of each task's scores (r)")
    lam: float | list[float] = Field(
        1.0,
        description="scale; nlp: after the weighted mean; vision variants: per task (a list, or "
        "one value for all) before it",
    )
    variant: Literal["nlp", "vision", "vision_es"] = Field(
        "nlp", description="inter-balancing term of the official nlp / vision / vision ES code"
    )
    clip: float = Field(0.01, ge=0.0, lt=0.5, description="per-task two-sided quantile clip of |tau|")

    @model_validator(mode="after")
    def _per_task_lam_only_for_vision(self) -> PcbParams:
        if isinstance(self.lam, list) and self.variant == "nlp":
            raise ValueError(
                "per-task lam (a list) needs variant='vision' or 'vision_es' (the nlp code scales "
                "after the weighted mean, with one lam)"
            )
        return self


# ---- ranks: the official 0-based sort index i is the 1-based kthvalue rank i + 1 ----------------


def clip_low_rank(d: int, clip: float) -> int:
    return int(d * clip) + 1


def clip_high_rank(d: int, clip: float) -> int:
    return int(d * (1 - clip) - 1) + 1


def score_cut_rank(d: int, ratio: float) -> int:
    """The cut is sorted(score)[int(d * (1 - ratio))]. At index d - 1 the cut is the maximum, and
    the official normalisation (clamp(score, cut, max) - cut) / (max - cut) is 0/0 for every
    entry, whatever the checkpoints: refused here, before any tensor is read."""
    index = int(d * (1 - ratio))
    if index >= d - 1:
        raise ValueError(f"pcb ratio={ratio} keeps {'no entry' if index >= d else 'only the largest score'} "
                         f"of a {d}-parameter model (the official scale divides by max - cut, so it "
                         f"needs two); raise ratio to at least {2 / d:.3g}")
    return index + 1


# ---- per-tensor pieces (shared by the stat passes, merge_tensor and the coefficient search) -----


def _rows(group: TensorGroup) -> torch.Tensor:
    return group.deltas.reshape(group.n, -1)


def _column(stats: GlobalStats, name: str, like: torch.Tensor) -> torch.Tensor:
    """Statistic `name` as a float32 (n, 1) column on `like`'s device."""
    return stats[name].to(device=like.device, dtype=torch.float32).unsqueeze(1)


# Most steps run in place: on a loaded machine a fresh (n, m) float32 result costs up to 25x the
# arithmetic (page faults on new memory). In-place ops round exactly as the out-of-place ones.


def clamp_rows_(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """x[i].clamp_(low[i], high[i]) for every row, in place.

    Row by row with scalar bounds: torch's CPU clamp with (n, 1) tensor bounds is ~10x slower
    (2.3 vs 0.2 ns per value measured here); the results are the same (the bounds are float32
    values, exact as scalars)."""
    for i, (lo, hi) in enumerate(zip(low.reshape(-1).tolist(), high.reshape(-1).tolist(), strict=True)):
        x[i].clamp_(lo, hi)
    return x


def clipped_magnitudes(tau: torch.Tensor, stats: GlobalStats) -> torch.Tensor:
    """A = |tau| clipped per task to [lo, hi] (a new tensor); tau is (n, m)."""
    return clamp_rows_(torch.abs(tau), stats[CLIP_LOW], stats[CLIP_HIGH])


def _scores_from(tau: torch.Tensor, magnitudes: torch.Tensor, params: PcbParams, stats: GlobalStats) -> torch.Tensor:
    """intra * inter; consumes `magnitudes` (overwritten)."""
    n = tau.shape[0]
    low, high = _column(stats, CLIP_LOW, tau), _column(stats, CLIP_HIGH, tau)
    normalized = magnitudes.sub_(low).div_(high - low)  # (A - min) / (max - min); min, max = lo, hi
    if params.variant == "nlp":
        inter = tanh_(tau * sum_over_tasks(tau))
    else:
        signed = torch.sign(tau).mul_(normalized)
        if params.variant == "vision":
            inter = tanh_(tau * sum_over_tasks(signed))
        else:
            inter = _pairwise_tanh_sums(signed)
    intra = normalized.square_().mul_(n).exp_()  # exp(n * normalized**2), float32
    return intra.mul_(inter)


# Below 2**-12 in magnitude, float32 tanh(x) is x: x - tanh(x) < |x|**3 / 3, under half an ulp
# of x. torch's own tanh returns x there too (checked on every float32 value below it), so
# skipping those entries changes no bit; it saves most of the cost where the arguments are
# products of task vectors (~1e-6 for real fine-tunes).
TANH_IS_IDENTITY_BELOW = 2.0**-12
_SKIP_WORTHWHILE = 1 / 3  # above this share of entries to compute, one torch tanh over all is faster


def tanh_(x: torch.Tensor) -> torch.Tensor:
    """x.tanh_() that computes tanh only where it differs from x (bitwise the same result)."""
    if x.device.type != "cpu" or not x.is_contiguous() or x.dtype != torch.float32:
        return x.tanh_()
    flat = x.reshape(-1).numpy()
    large = np.abs(flat) >= TANH_IS_IDENTITY_BELOW  # NaN is not: tanh(NaN) is NaN
    if np.count_nonzero(large) > _SKIP_WORTHWHILE * flat.size:
        return x.tanh_()
    where = np.flatnonzero(large)
    flat[where] = torch.from_numpy(flat[where]).tanh_().numpy()
    return x


def _pairwise_tanh_sums(signed: torch.Tensor) -> torch.Tensor:
    """Row i: sum_j tanh(N_i * N_j), added in task order j (`sum_over_tasks`), as the official
    vstack of sums. N_i * N_j == N_j * N_i bitwise, so each pair's tanh (the costly part) is
    computed once, n (n + 1) / 2 instead of n**2, and kept only until its second row uses it."""
    n = signed.shape[0]
    kept: dict[tuple[int, int], torch.Tensor] = {}
    rows = []
    for i in range(n):
        terms = [kept.pop((j, i)) for j in range(i)]
        for j in range(i, n):
            terms.append(tanh_(signed[i] * signed[j]))
            if j > i:
                kept[i, j] = terms[-1]
        rows.append(sum_over_tasks(terms))
    return torch.vstack(rows)


def scores(tau: torch.Tensor, params: PcbParams, stats: GlobalStats) -> torch.Tensor:
    """The balancing score intra * inter, (n, m), for one tensor's task vectors tau (n, m)."""
    return _scores_from(tau, clipped_magnitudes(tau, stats), params, stats)


def clipped_and_scale(
    group: TensorGroup, params: PcbParams, stats: GlobalStats
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_c, scale), both (n, m): the clipped task vectors and their kept, normalised weights.

    They do not depend on lam, so a coefficient search computes them once."""
    tau = _rows(group)
    magnitudes = clipped_magnitudes(tau, stats)
    clipped = torch.sign(tau).mul_(magnitudes)
    return clipped, _scale(tau, magnitudes, params, stats)


def _scale(tau: torch.Tensor, magnitudes: torch.Tensor, params: PcbParams, stats: GlobalStats) -> torch.Tensor:
    """(clamp(score, cut, max) - cut) / (max - cut); consumes `magnitudes`."""
    cut, top = _column(stats, SCORE_CUT, tau), _column(stats, SCORE_MAX, tau)
    scale = clamp_rows_(_scores_from(tau, magnitudes, params, stats), stats[SCORE_CUT], stats[SCORE_MAX])
    return scale.sub_(cut).div_(top - cut)


def per_task_lams(lam: float | list[float], n: int) -> torch.Tensor:
    """lam as a float32 column (n, 1), as the official vision code builds it."""
    values = lam if isinstance(lam, list) else [lam] * n
    if len(values) != n:
        raise ValueError(f"pcb got {len(values)} lam values for {n} fine-tuned models")
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1)


def weighted_mean(
    base: torch.Tensor, clipped: torch.Tensor, scale: torch.Tensor, lam: float | list[float], variant: str
) -> torch.Tensor:
    """theta_0 + the scale-weighted mean of the clipped vectors, lam placed as `variant` says."""
    n = clipped.shape[0]
    denominator = sum_over_tasks(scale).clamp_(min=SCALE_EPS)
    if variant == "nlp":
        merged = sum_over_tasks(clipped * scale).div_(denominator).mul_(lam)
    else:
        merged = sum_over_tasks((clipped * per_task_lams(lam, n).to(clipped.device)).mul_(scale)).div_(denominator)
    return merged.reshape(base.shape).add_(base)


# ---- the two stat passes -------------------------------------------------------------------------


def _clip_values(group: TensorGroup, params: PcbParams, stats: GlobalStats) -> dict[str, torch.Tensor]:
    if isinstance(params.lam, list):
        per_task_lams(params.lam, group.n)  # wrong length: fail on the first tensor, not the last
    return {"pcb_abs": _rows(group).abs_()}


def _clip_reductions(params: PcbParams) -> dict[str, Reduce]:
    return {
        CLIP_LOW: Reduce("pcb_abs", "kth", lambda d: clip_low_rank(d, params.clip)),
        CLIP_HIGH: Reduce("pcb_abs", "kth", lambda d: clip_high_rank(d, params.clip)),
    }


def _check_clip_range(stats: GlobalStats) -> None:
    constant = (stats[CLIP_HIGH] <= stats[CLIP_LOW]).nonzero().flatten().tolist()
    if constant:
        raise ValueError(
            f"pcb: the clipped |task vector| of model(s) {constant} is constant over the whole model "
            "(a fine-tune equal to the base?), so its min-max normalisation is undefined; drop it"
        )


def _score_values(group: TensorGroup, params: PcbParams, stats: GlobalStats) -> dict[str, torch.Tensor]:
    _check_clip_range(stats)
    return {"pcb_score": scores(_rows(group), params, stats)}


def _is_nlp(params: PcbParams) -> bool:
    """The fused kernels serve the nlp variant: the vision variants' inter terms need the
    normalised vectors of every task."""
    return params.variant == "nlp"


def _score_values_from_stored(raw: torch.Tensor, params: PcbParams, stats: GlobalStats) -> dict[str, torch.Tensor]:
    """`_score_values` (nlp) with the steps before exp and tanh in a fused kernel."""
    _check_clip_range(stats)
    exp_intra, tanh_inter = _score_factors(raw, stats)
    return {"pcb_score": exp_intra.mul_(tanh_inter)}  # as _scores_from: exp(intra) * tanh(inter)


def _score_windows(raw: torch.Tensor, params: PcbParams, stats: GlobalStats,
                   windows: list[tuple[torch.Tensor, torch.Tensor]], mark: int | None) -> WindowCounts:
    """The score cut's window counts, its candidates and the scores' max (nlp), from the two
    factors of the scores, a tile of columns at a time (mergeflow.kernels.pcb.ScoreWindow)."""
    from mergeflow.kernels.pcb import SCORE_TILE, ScoreWindow

    (lo, hi), = windows  # the score pass has one k-th value, the cut
    _check_clip_range(stats)
    n, m = raw.shape[0] - 1, raw.shape[1]
    window = ScoreWindow(n, m, lo, hi)
    for j0 in range(0, m, SCORE_TILE):
        window.add(*_score_factors(raw, stats, (j0, min(m, j0 + SCORE_TILE))), j0)
    return WindowCounts([(window.counts, window.kept)], reach=window.reach if mark is not None else None,
                        maxima=window.maxima)


def _score_factors(raw: torch.Tensor, stats: GlobalStats,
                   columns: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(intra) and tanh(inter) (n, w) of the nlp scores of raw's `columns` (all by default),
    the steps before exp and tanh in a fused kernel (on this thread's scratch: valid until its
    next call)."""
    from mergeflow.kernels.pcb import score_arguments

    inter, intra, large = score_arguments(raw, stats[CLIP_LOW], stats[CLIP_HIGH], TANH_IS_IDENTITY_BELOW, columns)
    if large:  # else tanh(inter) is inter itself, bit for bit
        tanh_(inter)
    return intra.exp_(), inter


def _score_reductions(params: PcbParams) -> dict[str, Reduce]:
    return {
        SCORE_CUT: Reduce("pcb_score", "kth", lambda d: score_cut_rank(d, params.ratio), marks_candidates=True),
        SCORE_MAX: Reduce("pcb_score", "max"),
    }


def check_score_stats(stats: GlobalStats) -> None:
    """Refuse score rows whose kept part is a single value (the official code returns NaN)."""
    flat = (stats[SCORE_MAX] <= stats[SCORE_CUT]).nonzero().flatten().tolist()
    if flat:
        raise ValueError(
            f"pcb: for model(s) {flat} the top-ratio scores all equal the cut value, so the "
            "normalised scale is 0/0; raise ratio"
        )


PCB_STAT_PASSES = (StatPass(_clip_values, _clip_reductions, cpu_window=ABS_DELTA_WINDOWS),
                   StatPass(_score_values, _score_reductions,
                            cpu_window=CpuWindow(_score_windows, _is_nlp, marks=True, maxima=True),
                            cpu_values=CpuValues(_score_values_from_stored, _is_nlp)))


def _pcb_fused_cpu(name: str, offset: int, raw: torch.Tensor, out: torch.Tensor, params: PcbParams,
                   stats: GlobalStats, candidates: torch.Tensor | None) -> tuple[int, None]:
    """`pcb` (nlp) of one unit in fused kernels (mergeflow.kernels.pcb), torch's exp and tanh
    between them; the passes before checked the inputs for NaN/inf."""
    from mergeflow.kernels.pcb import merge_nlp

    check_score_stats(stats)
    base = raw[0]
    positions = torch.arange(base.numel()) if candidates is None else _entries_to_compute(base, candidates)
    bounds = tuple(stats[s] for s in (CLIP_LOW, CLIP_HIGH, SCORE_CUT, SCORE_MAX))
    merge_nlp(raw, out, positions, bounds, params.lam, tanh_, TANH_IS_IDENTITY_BELOW)
    return 0, None


@register(
    "pcb",
    hyperparams=PcbParams,
    paper="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024",
    summary="intra/inter-task balancing scores over the whole model, drop, weighted mean",
    stat_passes=PCB_STAT_PASSES,
    min_models=1,
    elementwise=True,
    cpu_kernel=CpuKernel(_pcb_fused_cpu, applies=_is_nlp),
)
def pcb(group: TensorGroup, params: PcbParams, stats: GlobalStats) -> torch.Tensor:
    check_score_stats(stats)
    if group.candidates is not None:
        return _merge_at(group, _entries_to_compute(group.base, group.candidates), params, stats)
    clipped, scale = clipped_and_scale(group, params, stats)
    return weighted_mean(group.base, clipped, scale, params.lam, params.variant)


def _entries_to_compute(base: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The candidates, plus the entries whose base is -0.0.

    Everywhere else every scale is +0.0, so the formula gives base + (+-0.0), which is the base
    itself, except at a -0.0 base, where the sign of the zero sum decides the sign of the result."""
    hits = negative_zeros(base.reshape(-1))
    if not bool(hits.numpy().any() if hits.device.type == "cpu" else hits.any()):  # numpy's: 10x faster
        return candidates
    return torch.unique(torch.cat([candidates, nonzero_positions(hits).to(candidates.device)]))


def _merge_at(group: TensorGroup, idx: torch.Tensor, params: PcbParams, stats: GlobalStats) -> torch.Tensor:
    """The merge computed at the flat entries `idx` only, the base elsewhere (see _entries_to_compute).

    PCB is elementwise once the stats are known, so these entries get the values the whole
    tensor would give them, bitwise."""
    base = group.base.reshape(-1)
    part = TensorGroup(group.name, base.index_select(0, idx), group.models.reshape(group.n, -1).index_select(1, idx))
    clipped, scale = clipped_and_scale(part, params, stats)
    merged = base.clone()
    merged.index_copy_(0, idx, weighted_mean(part.base, clipped, scale, params.lam, params.variant))
    return merged.reshape(group.base.shape)
