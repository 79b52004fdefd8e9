"""The method's StatPasses over every float tensor: exact global (or per-tensor) statistics.

Each pass reads every unit once in the usual case. A k-th value first gets a window from a
small sample of evenly spread rows (`_set_windows`); the pass then counts the values below the window and
keeps those inside it, which fixes the k-th value exactly (see selection.py). A window that
missed costs more rounds, over the units still open. The first pass also checks the inputs for
NaN/inf. A method's fused last pass (TIES's majority sign) is not run here but inside the merge.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergeflow.engine.plan import MergePlan, Unit
from mergeflow.engine.selection import DEFAULT_CAP, SAMPLE_TARGET, PassReduction
from mergeflow.engine.units import kernel_input, read_group, run_units
from mergeflow.methods import GlobalStats, StatPass
from mergeflow.methods.base import tensor_stat

# Per-tensor k-th values (Reduce scope "tensor"): tensors up to TENSOR_KEEP_ALL values per row keep
# them all (exact in one pass); larger ones get a window from a TENSOR_SAMPLE-value sample, so the
# pass keeps a few percent of their values, at most TENSOR_CAP per row.
TENSOR_CAP = 4 << 20
TENSOR_KEEP_ALL = 256 << 10
TENSOR_SAMPLE = 64 << 10
MAX_SAMPLE = 8 << 20  # sampled values per row, at most (the sort that places a window holds them)


def compute_global_stats(plan: MergePlan, *, workers: int = 2, progress: bool = False,
                         kth_cap: int = DEFAULT_CAP, kth_sample: int = SAMPLE_TARGET) -> dict[str, torch.Tensor]:
    """Run the method's StatPasses over all float tensors; exact, bounded memory."""
    stats: dict[str, torch.Tensor] = {}
    float_units = [u for u in plan.units if u.name in plan.float_names]
    checked = False  # the first pass that reads the inputs also checks them for NaN/inf
    for i, stat_pass in enumerate(separate_passes(plan)):
        if stat_pass.reductions(plan.params):
            stats.update(_run_stat_pass(plan, stat_pass, stats, float_units, check_finite=not checked,
                                        workers=workers, progress=progress, label=f"stat pass {i + 1}",
                                        kth_cap=kth_cap, kth_sample=kth_sample))
            checked = True
    return stats


def _run_stat_pass(plan: MergePlan, stat_pass: StatPass, stats: GlobalStats, units: list[Unit], *,
                   check_finite: bool, workers: int, progress: bool, label: str, kth_cap: int,
                   kth_sample: int) -> dict[str, torch.Tensor]:
    """One StatPass: its reductions over the whole model, or per tensor (Reduce scope "tensor").

    Usually one read of every unit. A k-th value whose sampled window missed needs more rounds,
    over the units of the tensors (or the model) still open.
    """
    how = stat_pass.reductions(plan.params)
    scopes = {h.scope for h in how.values()}
    if len(scopes) > 1:
        raise ValueError(f"{plan.method.name}: a StatPass mixes model- and tensor-scoped reductions; split it")
    per_tensor = scopes == {"tensor"}

    def key(unit: Unit) -> str | None:
        return unit.name if per_tensor else None
    members: dict[str | None, list[Unit]] = {}
    for u in units:
        members.setdefault(key(u), []).append(u)
    cap = min(kth_cap, TENSOR_CAP) if per_tensor else kth_cap
    reductions = {k: PassReduction(how, cap=cap) for k in members}
    if plan.elementwise:
        totals = {k: sum(u.elems for u in us) for k, us in members.items()}  # values per row
        samples = {k: _sample_rows(plan, reduction, members[k], totals[k],
                                   min(kth_sample, TENSOR_SAMPLE) if per_tensor else kth_sample,
                                   keep_all_below=TENSOR_KEEP_ALL if per_tensor else None)
                   for k, reduction in reductions.items() if reduction.wants_sample()}
        _set_windows(plan, stat_pass, stats, reductions, samples, totals, key)
    results: dict[str, torch.Tensor] = {}
    todo, round_no = units, 0
    while todo:
        def work(unit: Unit, check: bool = check_finite and round_no == 0) -> dict[str, object]:
            fused = _fused_window(plan, stat_pass, stats, reductions[key(unit)], unit, check)
            if fused is not None:
                return fused
            values = None if check else _values_by_kernel(plan, stat_pass, stats, unit)
            if values is None:
                values = stat_pass.values(read_group(plan, unit, check_finite=check), plan.params, stats)
            return reductions[key(unit)].summarize(values)

        last = {key(u): u for u in todo}
        for unit, partial in zip(todo, run_units(plan, todo, work, workers, progress, f"{label}.{round_no + 1}"),
                                 strict=True):
            k = key(unit)
            reductions[k].absorb(partial)
            if unit is last[k] and reductions[k].finish_round():  # done: free its kept values
                finished = reductions.pop(k)
                results.update({(tensor_stat(name, k) if per_tensor else name): v
                                for name, v in finished.results.items()})
                marks = None if per_tensor else finished.candidate_marks()
                if marks is not None and len(marks) == len(units):
                    plan.candidates = {(u.name, u.offset): m for u, m in zip(units, marks, strict=True)}
        todo, round_no = [u for u in todo if key(u) in reductions], round_no + 1
    return results


def _fused_window(plan: MergePlan, stat_pass: StatPass, stats: GlobalStats, reduction: PassReduction,
                  unit: Unit, check: bool) -> dict[str, object] | None:
    """The unit's partial results from the pass's fused CPU window kernel (StatPass.cpu_window),
    or None where it does not apply: pending k-th values in window mode (one kernel call for all
    of them: PCB's clip has two), marking their candidates only if the kernel can, and pending
    maxima only if the kernel gives them."""
    kernel = stat_pass.cpu_window
    pending = reduction.pending()
    if kernel is None or not pending or not kernel.applies(plan.params):
        return None
    kth = [name for name in pending if name in reduction.kth]
    maxima = [name for name in pending if name not in reduction.kth]
    selections = [reduction.kth[name] for name in kth]
    if not kth or any(sel.mode != "window" for sel in selections):
        return None
    if maxima and (not kernel.maxima or any(reduction.reductions[name].kind != "max" for name in maxima)):
        return None
    marked = next((i for i, sel in enumerate(selections) if sel.marking), None)
    if marked is not None and not kernel.marks:
        return None
    raw = kernel_input(plan, unit)
    if raw is None:
        return None
    result = kernel.counts(raw, plan.params, stats, [(sel.lo, sel.hi) for sel in selections], marked)
    if result.nonfinite and check:
        read_group(plan, unit, check_finite=True)  # raises, naming the tensor and the model
    partials: dict[str, object] = {name: result.maxima for name in maxima}
    for i, (name, (counts, kept)) in enumerate(zip(kth, result.windows, strict=True)):
        partials[name] = (unit.elems, counts, kept, result.reach if i == marked else None)
    return partials


def _values_by_kernel(plan: MergePlan, stat_pass: StatPass, stats: GlobalStats,
                      unit: Unit) -> dict[str, torch.Tensor] | None:
    """The pass's values from its fused CPU kernel (StatPass.cpu_values), or None where it does
    not apply (no kernel or not for these hyperparameters, kernels not loaded, inputs on another
    device or in mixed dtypes)."""
    kernel = stat_pass.cpu_values
    if kernel is None or not kernel.applies(plan.params):
        return None
    raw = kernel_input(plan, unit)
    return None if raw is None else kernel.values(raw, plan.params, stats)


def separate_passes(plan: MergePlan) -> tuple[StatPass, ...]:
    """The StatPasses that need a pass of their own: a fused last pass runs inside the merge."""
    passes = plan.method.stat_passes
    return passes[:-1] if plan.method.fused_last_pass is not None else passes


def _sample_rows(plan: MergePlan, reduction: PassReduction, units: list[Unit], total: int, sample_target: int,
                 keep_all_below: int | None = None) -> list[Unit]:
    """The evenly spread rows of `units` (`total` values a row) to sample to place `reduction`'s
    k-th value windows; none (and the reduction keeps every value) when there are few values."""
    if total <= min(reduction.cap, keep_all_below or reduction.cap):
        reduction.keep_all()
        return []
    # The window must hold at most ~0.8 cap values: its width is ~8 sqrt(q (1 - q) / s) of the
    # total, so a model with many more values than `cap` needs a larger sample (7B: ~5M values
    # a row, 0.1 % of a read) or its k-th values fall back to two more radix passes.
    sample_target = max(sample_target, min(MAX_SAMPLE, int((8 * total / reduction.cap) ** 2)))
    return _systematic_rows(plan, units, min(1.0, sample_target / max(1, total)))


def _set_windows(plan: MergePlan, stat_pass: StatPass, stats: GlobalStats,
                 reductions: dict[str | None, PassReduction], samples: dict[str | None, list[Unit]],
                 totals: dict[str | None, int], key: Callable[[Unit], str | None]) -> None:
    """Read the sampled rows of every reduction (per-tensor thresholds have a reduction per
    tensor) and place their windows.

    On the calling thread: the sampled pieces are many and small (629 of ~1,700 values at 0.5B),
    and handing them to the thread pool one by one cost more than the work: PCB's score-pass
    sample took 0.30 s on two workers, 0.17 s here. (Global TIES's is 0.04 s of work, but the
    first pass's sample waits ~0.5 s on numba, which holds the GIL while it loads the kernels.)
    Inputs not in the page cache are all asked for at once first, so their reads overlap."""
    wanted = {k: {h.source for h in reductions[k].reductions.values() if h.kind == "kth"} for k in samples}
    subs = [sub for k in samples for sub in samples[k]]
    if subs and not plan.inputs_in_page_cache():
        for sub in subs:
            plan.prefetch(sub)
    collected: dict[str | None, dict[str, list[torch.Tensor]]] = {k: {s: [] for s in wanted[k]} for k in samples}
    for sub in subs:
        values = stat_pass.values(read_group(plan, sub, check_finite=False), plan.params, stats)
        for s in wanted[key(sub)] & values.keys():
            collected[key(sub)][s].append(values[s].reshape(values[s].shape[0], -1).to(torch.float32).cpu())
    for k, parts in collected.items():
        if samples[k]:
            reductions[k].set_windows({s: torch.cat(p, dim=1) for s, p in parts.items() if p},
                                      {s: totals[k] for s in wanted[k]})


def _systematic_rows(plan: MergePlan, units: list[Unit], fraction: float) -> list[Unit]:
    """A `fraction` of every tensor's rows, evenly spread: unit by unit, the leading rows its share
    adds up to (the remainder carries on to the next unit), so every value of the model has the
    same weight in the sample and units whose share is below a row are not read at all. A share
    under one row overall still takes one row (an empty sample would cost radix passes)."""
    units = [u for u in units if u.elems]
    subs, carry = [], 0.0
    for unit in units:
        carry += fraction * _rows(plan, unit)
        take = int(carry)
        carry -= take
        if take:
            subs.append(_leading_rows(plan, unit, take))
    return subs or [_leading_rows(plan, u, 1) for u in units[:1]]


def _rows(plan: MergePlan, unit: Unit) -> int:
    shape = plan.base.checkpoint.info(unit.name).shape
    if unit.row_start is not None:
        return unit.row_end - unit.row_start
    return shape[0] if shape else 1


def _leading_rows(plan: MergePlan, unit: Unit, take: int) -> Unit:
    """The unit's first `take` rows (at most all of them); a scalar unit whole."""
    if not plan.base.checkpoint.info(unit.name).shape:
        return unit
    rows, start = _rows(plan, unit), unit.row_start or 0
    take = min(take, rows)
    return Unit(unit.name, start, start + take, take * (unit.elems // rows), unit.offset)
