"""The streaming merge: K checkpoints in, one merged checkpoint out, in bounded memory.

    from mergeflow.engine import merge_checkpoints
    result = merge_checkpoints("ties", "base/", ["ft_a/", "ft_b/"], "out/", {"k": 0.2, "lam": 1.0})
    result.out_dir, result.output_hash, result.manifest

Order of work:
1. `plan_merge` checks everything from headers and configs; an estimate of time, memory and
   disk is printed. Nothing is read or written before this succeeds.
2. Each StatPass of the method runs over every float tensor, a unit (tensor or row chunk) at a
   time (stat_passes.py): exact global statistics, one pass each in the usual case.
3. The merge pass computes every unit with the method's `merge_tensor` and writes it where it
   belongs in the output shards; the output content hash (`hash_checkpoint`'s definition) is
   computed on the way, in name order; side files, the model card and the manifest are added
   and the directory appears atomically. Any error leaves no output. A method with a fused
   last pass (TIES's majority sign) merges with a provisional value of that statistic and
   rewrites the few entries that depend on it once the pass is complete.
Units run on a thread pool (units.py); results are folded in unit order, so the output never
depends on scheduling. The math runs on `device` in float32.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mergeflow.compatibility import BaseOnlyTensors, check_finite_output, is_mergeable
from mergeflow.engine.manifest import copy_side_files, model_card
from mergeflow.engine.memory import resident_bytes, tune_malloc
from mergeflow.engine.plan import (
    DEFAULT_CHUNK_ELEMS,
    MANIFEST_FILE,
    MergeConfigError,
    MergePlan,
    Unit,
    plan_merge,
)
from mergeflow.engine.selection import DEFAULT_CAP, SAMPLE_TARGET
from mergeflow.engine.stat_passes import compute_global_stats, separate_passes
from mergeflow.engine.units import (
    candidates,
    kernel_input,
    prepare_kernels,
    read_group,
    run_units,
    torch_threads,
    usable_cpus,
)
from mergeflow.engine.writer import StreamingCheckpointWriter
from mergeflow.methods import GlobalStats
from mergeflow.methods.base import Provisional

DEFAULT_SHARD_BYTES = 2 * 2**30
# The estimate's rates, conservative: a worker thread merged 0.8-1.1e9 input bytes a second per
# pass with the inputs cached (TA, TIES, PCB nlp at 0.5B on a 2-CPU machine; PCB vision_es 0.35e9);
# inputs not in the page cache are read from the disk once more (1.4e9 bytes a second there).
ASSUMED_BYTES_PER_SECOND_PER_WORKER = 0.5e9
ASSUMED_DISK_BYTES_PER_SECOND = 0.5e9
MAX_DEFAULT_WORKERS = 4


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
    trust_remote_code: bool = False,
    workers: int | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    input_hashes: Sequence[str] | None = None,
    out_dtype: torch.dtype | None = None,
    recipe: dict | None = None,
    dry_run: bool = False,
    kth_cap: int = DEFAULT_CAP,
    kth_sample: int = SAMPLE_TARGET,
    cpu_kernels: bool = True,
    base_only_tensors: BaseOnlyTensors = "error",
) -> MergeResult | MergePlan:
    """Merge checkpoint directories (or .safetensors files) of one base into `out_dir`.

    `hparams` are the method's hyperparameters (`mergeflow methods` lists them). `input_hashes`
    (base first, then the models) are recorded in the manifest; when None they come from
    `mergeflow.sources.resolve_checkpoint` (content hashes, cached on disk by file stat).
    `out_dtype` sets the stored dtype of float tensors (default: the base's dtype).
    `base_only_tensors="copy"` copies the base's tensors that no model has (vision-only experts of
    a full CLIP base) instead of refusing the checkpoints (`compatibility.check_compatible`).
    `recipe` (the recipe as a dict) is recorded in the manifest. With `dry_run`, only the checks
    and the estimate run, and the plan is returned. `kth_cap` (values kept per task by the
    exact quantile selection) and `kth_sample` (values sampled to place its window) trade
    memory for passes; results never depend on them. `trust_remote_code` accepts inputs whose
    config.json needs remote code (auto_map): the merge runs none, but the merged model would.
    `cpu_kernels=False` runs every step with the methods' torch code instead of their fused CPU
    kernels (same output bytes, slower).
    """
    t0 = time.perf_counter()
    _check_call(out_dir, model_dirs, input_hashes, out_dtype)
    plan = plan_merge(method, base_dir, list(model_dirs), dict(hparams or {}), out_dir=out_dir,
                      device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                      chunk_elems=chunk_elems, base_only_tensors=base_only_tensors, out_dtype=out_dtype)
    plan.cpu_kernels = cpu_kernels
    # More threads stop paying off early: the units' Python work serialises on the GIL and the
    # elementwise math is bound by memory bandwidth (16 threads on a 16-CPU machine ran global
    # TIES at 0.5B in 30 s, 2 threads in 18 s).
    workers = workers or min(MAX_DEFAULT_WORKERS, usable_cpus())
    tune_malloc()
    try:
        if progress or dry_run:
            print(estimate(plan, workers), file=sys.stderr)
            for note in plan.notes:
                print(f"mergeflow: note: {note}", file=sys.stderr)
        if dry_run:
            return plan
        prepare_kernels(plan, out_dtype)  # in the background; the torch code runs until they are loaded
        hashes = list(input_hashes) if input_hashes is not None else _content_hashes(
            [base_dir, *model_dirs], allow_pickle, workers=workers, progress=progress)
        if input_hashes is None:  # given ones are the caller's labels, not necessarily contents
            _check_distinct_contents(plan, hashes)
        with torch_threads(1 if (workers > 1 and plan.device.type == "cpu") else None):
            stats = compute_global_stats(plan, workers=workers, progress=progress, kth_cap=kth_cap,
                                         kth_sample=kth_sample)
            result = _merge_pass(plan, stats, Path(out_dir), hashes, recipe, out_dtype, workers=workers,
                                 progress=progress, max_shard_bytes=max_shard_bytes, t0=t0)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise OSError(errno.ENOSPC, f"the disk filled up while writing {out_dir} (the output takes "
                      f"{plan.output_bytes / 2**20:,.0f} MiB, and that much was free when the merge "
                      "started); free some space and run it again. Nothing was written") from None
    finally:
        plan.close()
    return result


def _check_call(out_dir: str | Path, model_dirs: Sequence[str | Path], input_hashes: Sequence[str] | None,
                out_dtype: torch.dtype | None) -> None:
    """The API arguments plan_merge does not see, checked before any work."""
    if not str(out_dir).strip():  # Path("") is the current directory
        raise MergeConfigError("the output directory is empty ('' given); name the directory to write (--out DIR)")
    if isinstance(model_dirs, (str, Path)):  # list() would split a path into characters
        raise MergeConfigError(f"model_dirs must be a list of checkpoint paths, got the single path "
                               f"{str(model_dirs)!r}; wrap it in a list")
    if input_hashes is not None and len(input_hashes) != len(model_dirs) + 1:
        raise MergeConfigError(f"input_hashes has {len(input_hashes)} entries; give one for the base and one "
                               f"per model ({len(model_dirs) + 1})")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise MergeConfigError(f"out_dtype {out_dtype!r} is not a float dtype; use torch.bfloat16, "
                               "torch.float16 or torch.float32")


def _check_distinct_contents(plan: MergePlan, hashes: list[str]) -> None:
    """What plan_merge checks for paths, for contents (a copy of the base saved elsewhere, say),
    from the input content hashes the manifest records: known before any pass."""
    labels = [str(plan.base.path), *(str(m.path) for m in plan.models)]
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h in first and (first[h] > 0 or plan.method.task_vectors):
            what = "the base" if first[h] == 0 else labels[first[h]]
            raise MergeConfigError(f"models: {labels[i]} has the same content as {what} ({h[:12]}...)"
                                   + ("; its task vector is zero, so drop it" if first[h] == 0 else "; list it once"))
        first.setdefault(h, i)


def estimate(plan: MergePlan, workers: int) -> str:
    """One paragraph: what will be read and written, how long, how much memory and disk."""
    passes = 1 + sum(1 for sp in separate_passes(plan) if sp.reductions(plan.params))
    largest_unit = max((plan.unit_bytes(u) for u in plan.units), default=0)
    per_unit = largest_unit * 4 * 6 // max(1, plan.base.checkpoint.info(plan.units[0].name).dtype.itemsize) if plan.units else 0
    peak = resident_bytes() + (workers + 2) * per_unit + (128 << 20)  # what the process holds already, too
    seconds = passes * plan.input_bytes / (ASSUMED_BYTES_PER_SECOND_PER_WORKER * workers)
    if not plan.inputs_in_page_cache():
        seconds += plan.input_bytes / ASSUMED_DISK_BYTES_PER_SECOND
    return (
        f"mergeflow: {plan.method.name} of {plan.n} model(s) onto {plan.base.path} "
        f"({len(plan.names)} tensors, {len(plan.units)} units, device {plan.device}); "
        f"reads {plan.input_bytes / 2**30:.2f} GiB x ~{passes} pass(es), writes "
        f"{plan.output_bytes / 2**30:.2f} GiB (disk); estimated time ~{max(1, math.ceil(seconds))} s, "
        f"peak memory ~{peak / 2**20:.0f} MiB"
    )


# ---- the merge pass ---------------------------------------------------------------------------

def _merge_pass(plan: MergePlan, stats: GlobalStats, out_dir: Path, hashes: list[str], recipe: dict | None,
                out_dtype: torch.dtype | None, *, workers: int, progress: bool, max_shard_bytes: int,
                t0: float) -> MergeResult:
    def dtype(name: str) -> torch.dtype:
        stored = plan.base.checkpoint.info(name).dtype
        return out_dtype if (out_dtype is not None and is_mergeable(stored)) else stored

    def shape(name: str) -> tuple[int, ...]:
        return plan.base.checkpoint.info(name).shape
    first_pass = not any(True for sp in separate_passes(plan) if sp.reductions(plan.params))
    fused = plan.method.fused_last_pass

    def merged_unit(unit: Unit) -> tuple[torch.Tensor, Provisional | None]:
        if unit.name not in plan.float_names:  # integer buffers, and base_only_tensors="copy"'s
            return plan.base.read(unit.name, unit.row_start, unit.row_end).to(dtype(unit.name)), None
        kernel = plan.method.cpu_kernel
        raw = kernel_input(plan, unit, dtype(unit.name)) if kernel and kernel.applies(plan.params) else None
        if raw is not None:
            return _merged_by_kernel(plan, unit, raw, dtype(unit.name), stats, check_finite=first_pass)
        group = read_group(plan, unit, check_finite=first_pass)
        provisional = fused.merge(group, plan.params, stats) if fused else None
        merged = provisional.merged if provisional else plan.method.merge_tensor(group, plan.params, stats)
        if merged.shape != group.base.shape:
            raise ValueError(f"{plan.method.name} returned shape {list(merged.shape)} for {unit.name}, "
                             f"expected {list(group.base.shape)}")
        if provisional is not None:  # keep only the small parts: the unit's tensor is written now
            provisional = replace(provisional, merged=torch.empty(0), partial=provisional.partial.cpu())
        return merged.to(dtype(unit.name)).cpu(), provisional

    def work(unit: Unit) -> tuple[torch.Tensor, Provisional | None]:
        out, provisional = merged_unit(unit)
        if unit.name in plan.float_names:
            check_finite_output(plan.method.name, unit.name, out)
        if out.numel():  # positioned writes: each worker writes its own unit (GIL released)
            writer.write(unit.name, unit.offset * out.element_size(), out)
        return out, provisional

    stats = dict(stats)
    with StreamingCheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes) as writer, \
            BackgroundDigest() as digest:
        writer.plan([(k, shape(k), dtype(k)) for k in plan.names])
        partial_sum, pending = torch.zeros(1, dtype=torch.int64), []
        for unit, (out, provisional) in zip(plan.units, run_units(plan, plan.units, work, workers, progress, "merge"),
                                            strict=True):
            if unit.offset == 0:  # first piece of a tensor: hash_checkpoint's per-tensor header
                digest.update(json.dumps([unit.name, str(dtype(unit.name)), list(shape(unit.name))]).encode())
            if out.numel():
                digest.update(memoryview(out.contiguous().reshape(-1).view(torch.uint8).numpy()))
            if provisional is not None:
                partial_sum = partial_sum + provisional.partial
                if provisional.positions is not None:
                    pending.append((unit, provisional))
        output_hash = digest.hexdigest()
        if fused is not None:
            stats[fused.stat] = partial_sum
            if _resolve_pending(writer, pending, partial_sum, dtype, plan.method.name):
                output_hash = _hash_written(writer, plan.names, dtype, shape)
        base_dir = plan.base.path if plan.base.path.is_dir() else plan.base.path.parent
        copied = copy_side_files(writer, base_dir)
        manifest = _manifest(plan, stats, hashes, output_hash, recipe, copied)
        writer.write_json(MANIFEST_FILE, manifest)
        writer.write_text("README.md", model_card(manifest))
    return MergeResult(out_dir, output_hash, manifest, time.perf_counter() - t0,
                       {k: v.tolist() for k, v in stats.items()})


def _merged_by_kernel(plan: MergePlan, unit: Unit, raw: torch.Tensor, dtype: torch.dtype, stats: GlobalStats,
                      *, check_finite: bool) -> tuple[torch.Tensor, Provisional | None]:
    """The unit merged by the method's fused CPU kernel from its stacked stored values `raw`."""
    out = torch.empty(unit.elems, dtype=dtype)
    nonfinite, provisional = plan.method.cpu_kernel.merge(unit.name, unit.offset, raw, out, plan.params, stats,
                                                          candidates(plan, unit))
    if nonfinite and check_finite:
        read_group(plan, unit, check_finite=True)  # raises, naming the tensor and the model
    return out, provisional


class BackgroundDigest:
    """sha256 fed in order on a thread of its own (hashlib releases the GIL for large buffers).

    Hashing a 0.5B bf16 output takes ~0.6 s here; done in the loop that hands units to the
    workers it held that loop up, and with it the workers. At most `depth` buffers wait.
    """

    def __init__(self, depth: int = 8) -> None:
        self._digest = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-hash")
        self._waiting: deque = deque()
        self._depth = depth

    def update(self, data: bytes | memoryview) -> None:
        self._waiting.append(self._pool.submit(self._digest.update, data))
        while len(self._waiting) > self._depth:
            self._waiting.popleft().result()

    def hexdigest(self) -> str:
        while self._waiting:
            self._waiting.popleft().result()
        return self._digest.hexdigest()

    def __enter__(self) -> BackgroundDigest:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _resolve_pending(writer: StreamingCheckpointWriter, pending: list[tuple[Unit, Provisional]],
                     stat: torch.Tensor, dtype: Callable[[str], torch.dtype], method: str) -> bool:
    """Write the final values of the entries a fused last pass left open; True if any changed."""
    changed = False
    for unit, provisional in pending:
        values = provisional.resolve(stat)
        if values is None:
            continue
        values = values.to(dtype(unit.name)).reshape(-1)
        check_finite_output(method, unit.name, values)
        writer.patch(unit.name, provisional.positions.to(torch.int64) + unit.offset, values)
        changed = True
    return changed


def _hash_written(writer: StreamingCheckpointWriter, names: list[str], dtype: Callable[[str], torch.dtype],
                  shape: Callable[[str], tuple[int, ...]]) -> str:
    """hash_checkpoint's digest of what the writer holds (after entries were rewritten); the
    next block is read while the last one is hashed."""
    with BackgroundDigest(depth=2) as digest:
        for name in names:
            digest.update(json.dumps([name, str(dtype(name)), list(shape(name))]).encode())
            for block in writer.read_blocks(name, block_bytes=16 << 20):
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
        # A transformers model (its config names an architecture): the card says so for the hub.
        "transformers": "architectures" in (plan.base.checkpoint.config or {}),
        "notes": plan.notes,
        "recipe": recipe,
    }


def _content_hashes(paths: list[str | Path], allow_pickle: bool, *, workers: int, progress: bool) -> list[str]:
    """The inputs' content hashes for the manifest, a thread per checkpoint (sha256 releases the
    GIL). Cached on disk by file stat, so only the first merge of a checkpoint version reads it
    for this: about 0.8 s per GB and CPU here."""
    from mergeflow.sources import content_hash_is_cached, resolve_checkpoint

    paths = [Path(p).resolve() for p in paths]
    if progress and not all(content_hash_is_cached(p) for p in paths):
        print("mergeflow: hashing the inputs for the manifest (once per checkpoint version; cached "
              "by file stat)", file=sys.stderr)

    def content_hash(path: Path) -> str:  # plan_merge has checked for remote code already
        return resolve_checkpoint(str(path), allow_pickle=allow_pickle, trust_remote_code=True).content_hash
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        return list(pool.map(content_hash, paths))
