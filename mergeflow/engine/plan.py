"""Everything the engine checks and decides before it reads a single tensor.

`plan_merge` validates the method and hyperparameters (pydantic: errors name the field), the
model count, per-task coefficient lists, the device, the output location and free disk space,
and the checkpoints' tensor names, shapes, dtypes and vocabulary sizes (from safetensors headers
and config.json only). It splits the work into units: whole tensors, or row chunks of large
tensors for elementwise methods, so peak memory is a few chunks whatever the model size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from mergeflow.checkpoint import TensorInfo
from mergeflow.compatibility import (
    BaseOnlyTensors,
    check_compatible,
    is_mergeable,
    precision_notes,
)
from mergeflow.engine.reader import TensorSource
from mergeflow.methods import Hyperparams, MergeMethod, get_method
from mergeflow.methods.base import check_lam_count

# Entries per model in one unit of work. A unit's float32 copy of the inputs is then 2 MiB a row,
# below the 32 MiB mmap threshold `memory.tune_malloc` sets, so temporaries are reused from malloc's arenas.
# Python and dispatch overhead per unit is what smaller units pay for: at 0.5B (base + 3, bf16)
# TIES/global took 9.6-9.8 s at 512 Ki entries, 10.7-12.4 s at 256 Ki and 1 Mi, 15 s at 128 Ki
# and 21 s at 64 Ki (one session, one 2-CPU machine, same code).
DEFAULT_CHUNK_ELEMS = 1 << 19
MANIFEST_FILE = "mergeflow_manifest.json"


class MergeConfigError(ValueError):
    """The merge cannot run as asked; the message says what to change. Raised before any work."""


@dataclass(frozen=True)
class Unit:
    """One piece of work: tensor `name`, rows [row_start, row_end) (None: the whole tensor)."""

    name: str
    row_start: int | None
    row_end: int | None
    elems: int  # entries per model
    offset: int  # flat offset of the first entry in the tensor


@dataclass
class MergePlan:
    method: MergeMethod
    params: Hyperparams
    base: TensorSource
    models: list[TensorSource]
    device: torch.device
    names: list[str]
    float_names: set[str]
    units: list[Unit]
    elementwise: bool
    input_bytes: int = 0
    output_bytes: int = 0
    notes: list[str] = field(default_factory=list)  # printed with the estimate (e.g. mixed float precision)
    # (tensor, offset) -> packed bits of the unit's entries a stat pass marked (Reduce.marks_candidates)
    candidates: dict[tuple[str, int], object] | None = None
    cpu_kernels: bool = True  # use the methods' fused CPU kernels where the inputs allow (mergeflow.kernels)

    @property
    def n(self) -> int:
        return len(self.models)

    def sources(self, unit: Unit) -> list[TensorSource]:
        """The checkpoints a unit reads: base and every model; the base only for non-float tensors."""
        return [self.base, *self.models] if unit.name in self.float_names else [self.base]

    def unit_bytes(self, unit: Unit) -> int:
        """Bytes read for one unit."""
        return unit.elems * sum(src.checkpoint.info(unit.name).dtype.itemsize for src in self.sources(unit))

    def stored_dtypes(self, unit: Unit) -> set[torch.dtype]:
        """The dtypes a unit's inputs are stored in (one, unless models differ in float precision)."""
        return {src.checkpoint.info(unit.name).dtype for src in self.sources(unit)}

    def prefetch(self, unit: Unit) -> None:
        """Start reading a unit's inputs into the page cache, without waiting for them."""
        for src in self.sources(unit):
            src.prefetch(unit.name, unit.row_start, unit.row_end)

    def inputs_in_page_cache(self) -> bool:
        """Whether every input checkpoint looks cached (TensorSource.in_page_cache)."""
        return all(src.in_page_cache() for src in [self.base, *self.models])

    def close(self) -> None:
        for src in [self.base, *self.models]:
            src.close()


def plan_merge(method: str, base_dir: str | Path, model_dirs: list[str | Path], hparams: dict,
               *, out_dir: str | Path | None = None, device: str | torch.device = "cpu",
               allow_pickle: bool = False, trust_remote_code: bool = False,
               chunk_elems: int = DEFAULT_CHUNK_ELEMS, base_only_tensors: BaseOnlyTensors = "error",
               out_dtype: torch.dtype | None = None) -> MergePlan:
    m = get_method(method)
    try:
        params = m.params(**hparams)
    except ValidationError as err:
        raise MergeConfigError(f"invalid hyperparameters for {method!r}: {m.params_error(err)}") from None
    n = len(model_dirs)
    if not m.takes(n):
        raise MergeConfigError(f"method {method!r} needs {m.models_wanted} fine-tuned model(s), got {n}")
    try:
        check_lam_count(params, n)
    except ValueError as err:
        raise MergeConfigError(str(err)) from None
    dev = _device(device)
    _check_distinct_inputs(m, base_dir, model_dirs)
    _check_remote_code([base_dir, *model_dirs], trust_remote_code)
    base = TensorSource(base_dir, allow_pickle=allow_pickle)
    models = [TensorSource(d, allow_pickle=allow_pickle) for d in model_dirs]
    labels = [str(d) for d in model_dirs]
    _check_vocab(base, models, labels)
    base_signature, signatures = base.checkpoint.signature(), [s.checkpoint.signature() for s in models]
    try:
        base_only = check_compatible(base_signature, signatures, labels, base_only_tensors=base_only_tensors)
    except ValueError as err:
        raise MergeConfigError(str(err)) from None
    if out_dir is not None:
        _check_output(Path(out_dir), [base_dir, *model_dirs])
    names = base.checkpoint.names
    float_names = {k for k in names if is_mergeable(base.checkpoint.info(k).dtype) and k not in base_only}
    if not any(math.prod(base.checkpoint.info(k).shape) for k in float_names):
        raise MergeConfigError(f"{base_dir}: no float tensor with any entries to merge "
                               f"({len(names)} tensors in all); is this the right checkpoint?")
    if m.check_inputs is not None:
        try:
            m.check_inputs(params, n, sorted(float_names))
        except ValueError as err:
            raise MergeConfigError(str(err)) from None
    elementwise = m.is_elementwise(params)
    units = [u for k in names for u in _units(base, k, k in float_names and elementwise, chunk_elems)]
    notes = precision_notes(base_signature, signatures, labels)
    if base_only:
        notes.append(f"{len(base_only)} tensor(s) that no model has are copied from the base "
                     f"(base_only_tensors: copy), e.g. {sorted(base_only)[:3]}")
    plan = MergePlan(m, params, base, models, dev, names, float_names, units, elementwise, notes=notes)
    _check_ranks(plan)
    plan.input_bytes = sum(plan.unit_bytes(u) for u in units)
    plan.output_bytes = sum(_output_bytes(base.checkpoint.info(k), out_dtype) for k in names)
    if out_dir is not None:
        _check_disk(Path(out_dir), plan.output_bytes)
    return plan


def _output_bytes(info: TensorInfo, out_dtype: torch.dtype | None) -> int:
    """Bytes one tensor takes in the output: float tensors are stored as `out_dtype` if given."""
    if out_dtype is None or not is_mergeable(info.dtype):
        return info.nbytes
    return math.prod(info.shape) * out_dtype.itemsize


def _check_ranks(plan: MergePlan) -> None:
    """Every k-th-value rank the stat passes will ask for, computed now from the model's size: a
    hyperparameter that selects nothing (PCB's ratio on a small model) fails before any read."""
    numel = {k: math.prod(plan.base.checkpoint.info(k).shape) for k in plan.float_names}
    for stat_pass in plan.method.stat_passes:
        for name, how in stat_pass.reductions(plan.params).items():
            if how.kind != "kth":
                continue
            for d in ({sum(numel.values())} if how.scope == "model" else set(numel.values())) - {0}:
                try:
                    rank = how.rank(d)
                except ValueError as err:
                    raise MergeConfigError(str(err)) from None
                if not 1 <= rank <= d + 1:
                    raise MergeConfigError(f"{plan.method.name}: statistic {name} asks for rank {rank} "
                                           f"of {d} values; check the hyperparameters")


def _units(base: TensorSource, name: str, chunked: bool, chunk_elems: int) -> list[Unit]:
    shape = base.checkpoint.info(name).shape
    numel = math.prod(shape)
    if not chunked or not shape or numel <= chunk_elems:
        return [Unit(name, None, None, numel, 0)]
    row = numel // shape[0] if shape[0] else 1
    step = max(1, chunk_elems // max(row, 1))
    return [Unit(name, r, min(r + step, shape[0]), (min(r + step, shape[0]) - r) * row, r * row)
            for r in range(0, shape[0], step)]


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists every device type it knows
        raise MergeConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise MergeConfigError(f"device {device!r} is not supported by the engine; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MergeConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _check_remote_code(dirs: list[str | Path], trust_remote_code: bool) -> None:
    """The merge runs no code from a checkpoint, but a merged model whose config needs remote code
    would: such inputs need the caller's explicit trust."""
    # imported here: sources imports hashing, which imports the engine's reader (a cycle at import)
    from mergeflow.sources import check_remote_code

    for d in dirs:
        try:
            check_remote_code(Path(d) / "config.json", str(d), trust_remote_code)
        except ValueError as err:
            raise MergeConfigError(str(err)) from None


def _check_distinct_inputs(method: MergeMethod, base_dir: str | Path, model_dirs: list[str | Path]) -> None:
    """The same checkpoint twice (ft0 and ft0/../ft0, say) is a mistake in the list, and the base
    listed as a fine-tune gives a task vector of zeros: both refused before any read."""
    seen: dict[Path, str | Path] = {}
    for d in model_dirs:
        path = Path(d).resolve()
        if path in seen:
            raise MergeConfigError(f"models: {d} and {seen[path]} are the same checkpoint; list each model once")
        seen[path] = d
    base = Path(base_dir).resolve()
    if method.task_vectors and base in seen:
        raise MergeConfigError(f"models: {seen[base]} is the base checkpoint itself; its task vector is zero "
                               f"({method.name} merges theta_i - theta_0), so drop it from the models")


def _check_vocab(base: TensorSource, models: list[TensorSource], labels: list[str]) -> None:
    """Different vocabulary sizes (added tokens, padded embeddings) are refused by name."""
    base_vocab, base_sig = _vocab_size(base), base.checkpoint.signature()
    for label, src in zip(labels, models, strict=True):
        vocab = _vocab_size(src)
        if None not in (base_vocab, vocab) and vocab != base_vocab:
            raise MergeConfigError(
                f"{label}: vocab_size {vocab} differs from the base's {base_vocab} "
                "(added tokens or padded embeddings). mergeflow never truncates embeddings silently: "
                "resize every model's embeddings to the same vocabulary first.")
        sig = src.checkpoint.signature()
        for name, (shape, _) in base_sig.items():
            other = sig.get(name, (shape, None))[0]
            if other != shape and len(other) == len(shape) >= 1 and other[1:] == shape[1:]:
                raise MergeConfigError(
                    f"{label}: {name} has {other[0]} rows, the base has {shape[0]} (a padded or "
                    "extended embedding?). mergeflow never truncates silently: resize the "
                    "embeddings of all models to the same vocabulary first.")


def _vocab_size(src: TensorSource) -> int | None:
    """config.json's vocab_size, None where it gives none."""
    vocab = (src.checkpoint.config or {}).get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool)):
        raise MergeConfigError(f"{src.checkpoint.directory / 'config.json'}: vocab_size is {vocab!r}, not a "
                               "whole number; restore the model's config.json")
    return vocab


def _check_output(out: Path, inputs: list[str | Path]) -> None:
    out = out.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise MergeConfigError(f"output {out} overlaps input {src}; choose another --out")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).exists())):
        raise MergeConfigError(
            f"{out} exists and is not an earlier mergeflow output; remove it or choose another --out")
    if out.is_dir():
        written = _files_written(out)
        foreign = sorted(p.name for p in out.iterdir() if p.name not in written)
        if foreign:  # the new output replaces the directory: they would be lost
            raise MergeConfigError(f"{out} is an earlier mergeflow output that now also holds {foreign[:3]}, "
                                   "which mergeflow did not write and replacing it would delete; move them "
                                   "or choose another --out")
    parent = _existing_ancestor(out)
    if not parent.is_dir() or not _can_create_in(parent):
        raise MergeConfigError(f"cannot create the output under {parent}: not a writable directory; "
                               "choose another --out")


def _can_create_in(parent: Path) -> bool:
    """Whether a directory can be made in `parent` (the writer makes its temp directory there),
    tried for real: os.access says yes to root on read-only or virtual file systems (/proc)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mergeflow-probe-", dir=parent))
    except OSError:
        return False
    return True


def _files_written(out: Path) -> set[str]:
    """The file names an earlier mergeflow output in `out` holds by its own manifest."""
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {MANIFEST_FILE}
    written = {MANIFEST_FILE, "README.md", *manifest.get("side_files", [])}
    return written | {p.name for p in out.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json")}


def _existing_ancestor(out: Path) -> Path:
    """The nearest existing directory above `out`: where its temp directory will be created."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _check_disk(out: Path, need: int) -> None:
    parent = _existing_ancestor(out)
    free = shutil.disk_usage(parent).free
    if free < need * 1.05 + (64 << 20):
        raise MergeConfigError(
            f"not enough disk space for the output: need {need / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free under {parent}")
