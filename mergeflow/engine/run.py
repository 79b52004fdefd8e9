"""The streaming merge: K checkpoints in, one merged checkpoint out, in bounded memory.

    from mergeflow.engine import merge_checkpoints
    result = merge_checkpoints("ties", "base/", ["ft_a/", "ft_b/"], "out/", {"k": 0.2, "lam": 1.0})
    result.out_dir, result.output_hash, result.manifest

Order of work:
1. `plan_merge` checks everything from headers and configs; an estimate of time, memory and
   disk is printed. Nothing is read or written before this succeeds.
2. Each StatPass of the method runs over every float tensor, a unit (tensor or row chunk) at a
   time; `selection.PassReduction` turns the values into exact global statistics (one pass in
   the usual case; the first pass also checks the inputs for NaN/inf).
3. The merge pass computes every unit with the method's `merge_tensor` and writes it where it
   belongs in the output shards; the output content hash (`hash_checkpoint`'s definition) is
   computed on the way, in name order; side files, the model card and the manifest are added
   and the directory appears atomically. Any error leaves no output.
Units run on a thread pool (reads, math and writes of different units overlap; torch and file
I/O release the GIL) with a bounded number in flight; results are folded in unit order, so the
output never depends on scheduling. The math runs on `device` in float32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mergeflow.compatibility import check_finite
from mergeflow.engine.manifest import copy_side_files, model_card
from mergeflow.engine.plan import DEFAULT_CHUNK_ELEMS, MANIFEST_FILE, MergePlan, Unit, plan_merge
from mergeflow.engine.selection import DEFAULT_CAP, SAMPLE_TARGET, PassReduction
from mergeflow.engine.writer import StreamingCheckpointWriter
from mergeflow.methods import GlobalStats, StatPass, TensorGroup
from mergeflow.methods.base import Provisional, tensor_stat

DEFAULT_SHARD_BYTES = 2 * 2**30
ASSUMED_BYTES_PER_SECOND = 0.5e9  # per pass over the inputs, a conservative CPU figure
MAX_DEFAULT_WORKERS = 4
TRIM_EVERY_BYTES = 512 << 20  # input bytes between malloc_trim calls (see _trim_freed_memory)
# Per-tensor k-th values (Reduce scope "tensor"): tensors up to TENSOR_KEEP_ALL values per row keep
# them all (exact in one pass); larger ones get a window from a TENSOR_SAMPLE-value sample, so the
# pass keeps a few percent of their values, at most TENSOR_CAP per row.
TENSOR_CAP = 4 << 20
TENSOR_KEEP_ALL = 256 << 10
TENSOR_SAMPLE = 64 << 10


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    output_hash: str
    manifest: dict
    seconds: float
    stats: dict[str, list]


def merge_checkpoints(
    method: str,
    base_dir: str | Path,
    model_dirs: Sequence[str | Path],
    out_dir: str | Path,
    hparams: dict | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    allow_pickle: bool = False,
    workers: int | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    input_hashes: Sequence[str] | None = None,
    out_dtype: torch.dtype | None = None,
    recipe: dict | None = None,
    dry_run: bool = False,
    kth_cap: int = DEFAULT_CAP,
    kth_sample: int = SAMPLE_TARGET,
) -> MergeResult | MergePlan:
    """Merge checkpoint directories (or .safetensors files) of one base into `out_dir`.

    `hparams` are the method's hyperparameters (`mergeflow methods` lists them). `input_hashes`
    (base first, then the models) are recorded in the manifest; when None they come from
    `mergeflow.sources.resolve_checkpoint` (content hashes, cached on disk by file stat).
    `out_dtype` sets the stored dtype of merged float tensors (default: the base's dtype).
    `recipe` (the recipe as a dict) is recorded in the manifest. With `dry_run`, only the checks
    and the estimate run, and the plan is returned. `kth_cap` (values kept per task by the
    exact quantile selection) and `kth_sample` (values sampled to place its window) trade
    memory for passes; results never depend on them.
    """
    t0 = time.perf_counter()
    plan = plan_merge(method, base_dir, list(model_dirs), dict(hparams or {}), out_dir=out_dir,
                      device=device, allow_pickle=allow_pickle, chunk_elems=chunk_elems)
    # More threads stop paying off early: the units' Python work serialises on the GIL and the
    # elementwise math is bound by memory bandwidth (16 threads on a 16-CPU machine ran global
    # TIES at 0.5B in 30 s, 2 threads in 18 s).
    workers = workers or min(MAX_DEFAULT_WORKERS, _usable_cpus())
    _return_freed_memory()
    try:
        if progress or dry_run:
            print(estimate(plan, workers), file=sys.stderr)
        if dry_run:
            return plan
        hashes = list(input_hashes) if input_hashes is not None else _content_hashes(
            [base_dir, *model_dirs], allow_pickle)
        with _torch_threads(1 if (workers > 1 and plan.device.type == "cpu") else None):
            stats = compute_global_stats(plan, workers=workers, progress=progress, kth_cap=kth_cap,
                                         kth_sample=kth_sample)
            result = _merge_pass(plan, stats, Path(out_dir), hashes, recipe, out_dtype, workers=workers,
                                 progress=progress, max_shard_bytes=max_shard_bytes, t0=t0)
    finally:
        plan.close()
    return result


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS reports one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


def estimate(plan: MergePlan, workers: int) -> str:
    """One paragraph: what will be read and written, how long, how much memory and disk."""
    passes = 1 + sum(1 for sp in _separate_passes(plan) if sp.reductions(plan.params))
    largest_unit = max((plan.unit_bytes(u) for u in plan.units), default=0)
    per_unit = largest_unit * 4 * 6 // max(1, plan.base.checkpoint.info(plan.units[0].name).dtype.itemsize) if plan.units else 0
    peak = (workers + 2) * per_unit + (128 << 20)
    seconds = passes * plan.input_bytes / ASSUMED_BYTES_PER_SECOND
    return (
        f"mergeflow: {plan.method.name} of {plan.n} model(s) onto {plan.base.path} "
        f"({len(plan.names)} tensors, {len(plan.units)} units, device {plan.device}); "
        f"reads {plan.input_bytes / 2**30:.2f} GiB x ~{passes} pass(es), writes "
        f"{plan.output_bytes / 2**30:.2f} GiB (disk); estimated time ~{max(1, math.ceil(seconds))} s, "
        f"peak memory ~{peak / 2**20:.0f} MiB"
    )


# ---- global statistics ------------------------------------------------------------------------

def compute_global_stats(plan: MergePlan, *, workers: int = 2, progress: bool = False,
                         kth_cap: int = DEFAULT_CAP, kth_sample: int = SAMPLE_TARGET) -> dict[str, torch.Tensor]:
    """Run the method's StatPasses over all float tensors; exact, bounded memory."""
    stats: dict[str, torch.Tensor] = {}
    float_units = [u for u in plan.units if u.name in plan.float_names]
    checked = False  # the first pass that reads the inputs also checks them for NaN/inf
    for i, stat_pass in enumerate(_separate_passes(plan)):
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
    for k, reduction in reductions.items():
        if reduction.wants_sample() and plan.elementwise:
            _set_windows(plan, stat_pass, reduction, stats, members[k], workers,
                         min(kth_sample, TENSOR_SAMPLE) if per_tensor else kth_sample,
                         keep_all_below=TENSOR_KEEP_ALL if per_tensor else None)
    results: dict[str, torch.Tensor] = {}
    todo, round_no = units, 0
    while todo:
        def work(unit: Unit, check: bool = check_finite and round_no == 0) -> dict[str, object]:
            group = _read_group(plan, unit, check_finite=check)
            return reductions[key(unit)].summarize(stat_pass.values(group, plan.params, stats))

        last = {key(u): u for u in todo}
        for unit, partial in zip(todo, _run_units(plan, todo, work, workers, progress, f"{label}.{round_no + 1}"),
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


def _separate_passes(plan: MergePlan) -> tuple[StatPass, ...]:
    """The StatPasses that need a pass of their own: a fused last pass runs inside the merge."""
    passes = plan.method.stat_passes
    return passes[:-1] if plan.method.fused_last_pass is not None else passes


def _set_windows(plan: MergePlan, stat_pass: StatPass, reduction: PassReduction, stats: GlobalStats,
                 units: list[Unit], workers: int, sample_target: int, keep_all_below: int | None = None) -> None:
    """Sample a few rows of every unit to place the k-th value windows (one cheap pass)."""
    total = sum(u.elems for u in units)
    sources = {h.source for h in reduction.reductions.values() if h.kind == "kth"}
    if total <= min(reduction.cap, keep_all_below or reduction.cap):  # few values: keep them all
        empty = {s: torch.zeros(plan.n, 1) for s in sources}
        reduction.set_windows(empty, {s: total for s in sources})
        return
    fraction = min(1.0, sample_target / max(1, total))
    subs = [_sub_unit(plan, u, fraction) for u in units]
    # each sampled value stands for unit.elems / sub.elems values of the model
    weight_of = {id(sub): u.elems / max(1, sub.elems) for u, sub in zip(units, subs, strict=True)}

    def work(sub: Unit):
        values = stat_pass.values(_read_group(plan, sub, check_finite=False), plan.params, stats)
        return {s: (values[s].reshape(values[s].shape[0], -1).to(torch.float32).cpu(), weight_of[id(sub)])
                for s in sources if s in values}

    collected: dict[str, list[tuple[torch.Tensor, float]]] = {s: [] for s in sources}
    for part in _run_units(plan, subs, work, workers, False, "sample"):
        for s, vw in part.items():
            collected[s].append(vw)
    for s, parts in collected.items():
        if parts:
            values = torch.cat([v for v, _ in parts], dim=1)
            weights = torch.cat([torch.full((v.shape[1],), w, dtype=torch.float64) for v, w in parts])
            reduction.set_windows({s: values}, {s: round(float(weights.sum()))}, weights)


def _sub_unit(plan: MergePlan, unit: Unit, fraction: float) -> Unit:
    shape = plan.base.checkpoint.info(unit.name).shape
    if not shape or unit.elems == 0:  # a scalar, or a tensor with no entries: take it whole
        return unit
    start = unit.row_start or 0
    end = unit.row_end if unit.row_end is not None else shape[0]
    take = max(1, round((end - start) * fraction))
    row = unit.elems // max(1, end - start)
    return Unit(unit.name, start, start + take, take * row, unit.offset)


# ---- the merge pass ---------------------------------------------------------------------------

def _merge_pass(plan: MergePlan, stats: GlobalStats, out_dir: Path, hashes: list[str], recipe: dict | None,
                out_dtype: torch.dtype | None, *, workers: int, progress: bool, max_shard_bytes: int,
                t0: float) -> MergeResult:
    def dtype(name: str) -> torch.dtype:
        stored = plan.base.checkpoint.info(name).dtype
        return out_dtype if (out_dtype is not None and name in plan.float_names) else stored

    def shape(name: str) -> tuple[int, ...]:
        return plan.base.checkpoint.info(name).shape
    first_pass = not any(True for sp in _separate_passes(plan) if sp.reductions(plan.params))
    fused = plan.method.fused_last_pass

    def work(unit: Unit) -> tuple[torch.Tensor, Provisional | None]:
        if unit.name not in plan.float_names:
            return plan.base.read(unit.name, unit.row_start, unit.row_end), None
        group = _read_group(plan, unit, check_finite=first_pass)
        provisional = fused.merge(group, plan.params, stats) if fused else None
        merged = provisional.merged if provisional else plan.method.merge_tensor(group, plan.params, stats)
        if merged.shape != group.base.shape:
            raise ValueError(f"{plan.method.name} returned shape {list(merged.shape)} for {unit.name}, "
                             f"expected {list(group.base.shape)}")
        if provisional is not None:  # keep only the small parts: the unit's tensor is written now
            provisional = Provisional(torch.empty(0), provisional.partial.cpu(), provisional.positions,
                                      provisional.resolve)
        return merged.to(dtype(unit.name)).cpu(), provisional

    digest = hashlib.sha256()
    stats = dict(stats)
    with StreamingCheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes) as writer:
        writer.plan([(k, shape(k), dtype(k)) for k in plan.names])
        partial_sum, pending = None, []
        for unit, (out, provisional) in zip(plan.units, _run_units(plan, plan.units, work, workers, progress, "merge"),
                                            strict=True):
            byte_offset = unit.offset * out.element_size()
            if unit.offset == 0:  # first piece of a tensor: hash_checkpoint's per-tensor header
                digest.update(json.dumps([unit.name, str(dtype(unit.name)), list(shape(unit.name))]).encode())
            if out.numel():
                data = out.contiguous().reshape(-1).view(torch.uint8)
                digest.update(memoryview(data.numpy()))
                writer.write(unit.name, byte_offset, out)
            if provisional is not None:
                partial_sum = provisional.partial if partial_sum is None else partial_sum + provisional.partial
                if provisional.positions is not None:
                    pending.append((unit, provisional))
        output_hash = digest.hexdigest()
        if fused is not None:
            stats[fused.stat] = partial_sum if partial_sum is not None else torch.zeros(1, dtype=torch.int64)
            if _resolve_pending(writer, pending, partial_sum, dtype):
                output_hash = _hash_written(writer, plan.names, dtype, shape)
        base_dir = plan.base.path if plan.base.path.is_dir() else plan.base.path.parent
        copied = copy_side_files(writer, base_dir)
        manifest = _manifest(plan, stats, hashes, output_hash, recipe, copied)
        writer.write_json(MANIFEST_FILE, manifest)
        writer.write_text("README.md", model_card(manifest))
    return MergeResult(out_dir, output_hash, manifest, time.perf_counter() - t0,
                       {k: v.tolist() for k, v in stats.items()})


def _resolve_pending(writer: StreamingCheckpointWriter, pending: list[tuple[Unit, Provisional]],
                     stat: torch.Tensor, dtype: Callable[[str], torch.dtype]) -> bool:
    """Write the final values of the entries a fused last pass left open; True if any changed."""
    changed = False
    for unit, provisional in pending:
        values = provisional.resolve(stat)
        if values is None:
            continue
        values = values.to(dtype(unit.name)).reshape(-1)
        positions = provisional.positions.to(torch.int64) + unit.offset
        # one write per run of consecutive positions
        breaks = (positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1
        bounds = [0, *breaks.tolist(), positions.numel()]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            writer.write(unit.name, int(positions[a]) * values.element_size(), values[a:b])
        changed = True
    return changed


def _hash_written(writer: StreamingCheckpointWriter, names: list[str], dtype: Callable[[str], torch.dtype],
                  shape: Callable[[str], tuple[int, ...]]) -> str:
    """hash_checkpoint's digest of what the writer holds (after entries were rewritten)."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(json.dumps([name, str(dtype(name)), list(shape(name))]).encode())
        for block in writer.read_blocks(name):
            digest.update(block)
    return digest.hexdigest()


def _manifest(plan: MergePlan, stats: GlobalStats, hashes: list[str], output_hash: str,
              recipe: dict | None, side_files: list[str]) -> dict:
    from mergeflow import __version__

    paths = [plan.base.path, *[m.path for m in plan.models]]
    inputs = [{"path": str(p), "content_hash": h} for p, h in zip(paths, hashes, strict=True)]
    return {
        "mergeflow_version": __version__,
        "method": plan.method.name,
        "paper": plan.method.paper,
        "hyperparameters": plan.params.model_dump(mode="json"),
        "base": inputs[0],
        "models": inputs[1:],
        "output_hash": output_hash,
        "tensors": len(plan.names),
        "merged_tensors": len(plan.float_names),
        "global_stats": {k: v.tolist() for k, v in stats.items()},
        "side_files": side_files,
        "recipe": recipe,
    }


# ---- shared machinery -------------------------------------------------------------------------

def _read_group(plan: MergePlan, unit: Unit, *, check_finite: bool) -> TensorGroup:
    # Read base and models into one stacked buffer, then convert to float32 once.
    info = plan.base.checkpoint.info(unit.name)
    shape = info.shape if unit.row_start is None else (unit.row_end - unit.row_start, *info.shape[1:])
    raw = torch.empty((plan.n + 1, unit.elems), dtype=info.dtype)
    for i, src in enumerate([plan.base, *plan.models]):
        src.read(unit.name, unit.row_start, unit.row_end, out=raw[i])
    full = raw.to(device=plan.device, dtype=torch.float32)
    base, models = full[0].reshape(shape), full[1:].reshape((plan.n, *shape))
    if check_finite:
        _check_finite(plan, unit, base, models)
    return TensorGroup(unit.name, base, models, unit.offset, _candidates(plan, unit))


def _candidates(plan: MergePlan, unit: Unit) -> torch.Tensor | None:
    """The unit's entries marked by a stat pass (Reduce.marks_candidates), as flat indices."""
    bits = plan.candidates.get((unit.name, unit.offset)) if plan.candidates else None
    if bits is None:
        return None
    return torch.from_numpy(np.flatnonzero(np.unpackbits(bits, count=unit.elems))).to(plan.device)


def _check_finite(plan: MergePlan, unit: Unit, base: torch.Tensor, models: torch.Tensor) -> None:
    # A sum is one cheap read; only a non-finite sum needs the exact (costlier) check.
    if math.isfinite(float(base.sum()) + float(models.sum())):
        return
    labels = [str(plan.base.path), *(str(m.path) for m in plan.models)]
    check_finite(unit.name, [base, *models.unbind(0)], labels)


def _run_units(plan: MergePlan, units: Sequence[Unit], work: Callable[[Unit], object], workers: int,
               progress: bool, label: str) -> Iterable:
    """work(unit) on a thread pool; yields results in unit order, few in flight."""
    bar = _bar(sum(plan.unit_bytes(u) for u in units), label) if progress else None
    since_trim = 0
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergeflow") as pool:
            pending: deque = deque()
            it = iter(units)
            for unit in it:
                pending.append((unit, pool.submit(work, unit)))
                if len(pending) >= workers + 1:
                    break
            while pending:
                unit, fut = pending.popleft()
                try:
                    result = fut.result()
                except BaseException:
                    for _, f in pending:
                        f.cancel()
                    raise
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(work, nxt)))
                if bar is not None:
                    bar.update(plan.unit_bytes(unit))
                since_trim += plan.unit_bytes(unit)
                if since_trim >= TRIM_EVERY_BYTES:
                    since_trim = 0
                    _trim_freed_memory()
                yield result
    finally:
        if bar is not None:
            bar.close()


def _bar(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                file=sys.stderr)


def _content_hashes(paths: list[str | Path], allow_pickle: bool) -> list[str]:
    from mergeflow.sources import resolve_checkpoint

    return [resolve_checkpoint(str(Path(p).resolve()), allow_pickle=allow_pickle).content_hash for p in paths]


def _return_freed_memory() -> None:
    """Tune glibc malloc for the engine's many chunk-sized temporaries (Linux only; else a no-op).

    - A fixed 32 MiB mmap threshold (glibc's maximum): by default glibc raises it after each
      large free, and the chunk buffers then live in per-thread arenas that never shrink. Below
      it, a unit's buffers come from the arenas and are reused; at 4 MiB the (n + 1, 256 Ki)
      float32 copy of a unit (4 MiB for 3 models) was a fresh mapping every time, and its page
      faults made the bf16 -> float32 conversion 25x slower (8 ms instead of 0.3 ms per unit).
    - A 256 MiB trim threshold: with the default (128 KiB once the mmap threshold is fixed) every
      free at the top of the heap hands the pages back, and the next temporary faults them in
      again: an (n, 256Ki) float32 result cost 1.8 ms instead of 0.1 ms measured here (18x),
      which made TIES's merge pass 3-4x slower. `_trim_freed_memory` bounds the heap instead.
    - Two shared arenas, so resident memory does not grow with the number of threads.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
        libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):
        pass


def _trim_freed_memory() -> None:
    """Give free arena memory back to the OS (glibc malloc_trim; elsewhere a no-op).

    Unit temporaries live in malloc's arenas (below the mmap threshold), where long-lived small
    buffers (TIES's kept candidate values) fragment them and resident memory grows. Trimming
    every TRIM_EVERY_BYTES of input bounds it: at 0.5B TIES/global peaked at 2.9 GiB without,
    1.3 GiB with, for a few seconds of page faults.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def _torch_threads(n: int | None):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
