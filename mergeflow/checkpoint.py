"""Lazy, memory-mapped reading of checkpoints.

A checkpoint is one of:
- a Hugging Face model directory with `model.safetensors`, or shards listed in
  `model.safetensors.index.json` (plus `config.json` and tokenizer files);
- a single `.safetensors` file;
- a pickle file (`.bin`, `.pt`, `.pth`, or a directory with `pytorch_model.bin`), refused unless
  the caller opts in with `allow_pickle=True`, and then loaded with `torch.load(weights_only=True)`.

Names, shapes and dtypes come from the safetensors headers without reading any tensor data, so
checks run before any work. `get(name)` reads one tensor (memory-mapped).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read; the message says why and what to do."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


class Checkpoint:
    """A read-only view of one checkpoint's tensors; tensors are read only on `get`."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        self._pickled: dict[str, torch.Tensor] | None = None
        self._handles: dict[Path, object] = {}
        index = self.path / INDEX_FILE
        weight_map = _weight_map(index) if self.path.is_dir() and index.exists() else None
        files = _safetensors_files(self.path, weight_map)
        if files is None:
            self._pickled = _load_pickle(self.path, allow_pickle)
            self._info = {
                k: TensorInfo(tuple(v.shape), v.dtype, self.path) for k, v in self._pickled.items()
            }
        else:
            self._info = _read_headers(files)
            if weight_map is not None:
                _check_index_matches_shards(index, weight_map, self._info)

    # ---- metadata (no tensor data read) ----
    @property
    def names(self) -> list[str]:
        return sorted(self._info)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def signature(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (i.shape, i.dtype) for k, i in self._info.items()}

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._info.values())

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @cached_property
    def config(self) -> dict | None:
        """The HF `config.json` next to the weights, if any (read once: the plan's checks and the
        manifest all ask)."""
        cfg = self.directory / "config.json"
        if not (self.path.is_dir() and cfg.exists()):
            return None
        try:
            config = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{cfg}: not valid JSON ({err}); restore the model's config.json") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg}: holds a JSON {type(config).__name__}, not an object of settings; "
                                  "restore the model's config.json")
        return config

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def __len__(self) -> int:
        return len(self._info)

    # ---- data ----
    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped from its safetensors file)."""
        if self._pickled is not None:
            return self._pickled[name]
        info = self._info[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return handle.get_tensor(name)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.get(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors, {self.nbytes / 2**20:.1f} MiB)"


def load_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint into memory."""
    return Checkpoint(path, allow_pickle=allow_pickle).state_dict()


def _safetensors_files(path: Path, weight_map: dict[str, str] | None) -> list[Path] | None:
    """The safetensors files of a checkpoint (the shards `weight_map` names, where the directory
    has an index), or None if it is a pickle checkpoint."""
    if path.is_file():
        if path.suffix == ".safetensors":
            return [path]
        if path.suffix in PICKLE_SUFFIXES:
            return None
        raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors)")
    if weight_map is not None:
        shards = sorted({path / shard for shard in weight_map.values()})
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise CheckpointError(f"{path}: index lists shards that are missing: {missing[:3]}")
        return shards
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    loose = sorted(path.glob("*.safetensors"))
    if loose:
        return loose
    if any(any(path.glob(f"*{s}")) for s in PICKLE_SUFFIXES):  # a glob is a generator: always truthy
        return None
    raise CheckpointError(
        f"{path}: no model.safetensors, {INDEX_FILE} or *.safetensors found; "
        "is this a model directory?"
    )


def _read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    info: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name in info:
                        raise CheckpointError(f"tensor {name!r} appears in two shards: {info[name].file.name}, {file.name}")
                    sl = f.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
                    info[name] = TensorInfo(tuple(sl.get_shape()), dtype, file)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"{file}: not a readable safetensors file ({err}); it may be truncated or corrupt"
            ) from None
    return info


def _check_index_matches_shards(index: Path, weight_map: dict[str, str], info: dict[str, TensorInfo]) -> None:
    """The index's weight_map must say where each tensor is, as loaders (transformers) trust it:
    a tensor it lists that no shard holds, one it places in the wrong shard, or one it leaves out
    means an incomplete download or a hand-edited checkpoint."""
    problems = []
    for name, shard in sorted(weight_map.items()):
        if name not in info:
            problems.append(f"it lists {name!r} in {shard}, which does not hold it")
        elif info[name].file.name != shard:
            problems.append(f"it places {name!r} in {shard}, but {info[name].file.name} holds it")
    problems += [f"{info[name].file.name} holds {name!r}, which it does not list"
                 for name in sorted(set(info) - set(weight_map))]
    if problems:
        raise CheckpointError(f"{index} does not match its shards: {'; '.join(problems[:3])}"
                              + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
                              + ". Download the checkpoint again, or rebuild its index")


def _weight_map(index: Path) -> dict[str, str]:
    """A safetensors index's weight_map, checked: a mapping of tensor names to plain file names
    in the checkpoint's own directory."""
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    outside = sorted({v for v in weight_map.values() if Path(v).name != v})
    if outside:  # a shard elsewhere would read another model's weights without a word
        raise CheckpointError(f"{index}: weight_map names shards outside the checkpoint's directory "
                              f"({outside[0]!r}); list plain file names")
    return weight_map


_TORCH_LOAD_ADVICE = ("weights_only", "weights only", "documentation", "safe_globals", "trust")


def _unpickler_diagnosis(message: str) -> str | None:
    """What torch.load(weights_only=True) refused, without torch's advice around it: to retry
    with weights_only=False, or to allowlist the global, both of which would run the pickle."""
    refused = re.search(r"GLOBAL ([\w.]+)", message)
    if refused:
        return f"it calls {refused.group(1)}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines if not any(a in line.lower() for a in _TORCH_LOAD_ADVICE)), None)


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.is_dir():
        candidates = [p for s in PICKLE_SUFFIXES for p in sorted(path.glob(f"*{s}"))]
        path = candidates[0]
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickle checkpoint; pickles can run code when loaded. Convert it to "
            "safetensors, or pass allow_pickle=True (--allow-pickle) to load it with "
            "torch.load(weights_only=True)."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses arbitrary objects: say so plainly
        # torch's message suggests weights_only=False, which would run the pickle's code: only
        # its diagnosis (the refused global, say) is kept, never that advice.
        detail = _unpickler_diagnosis(str(err)) or type(err).__name__
        raise CheckpointError(f"{path}: refused to unpickle: it holds more than tensors ({detail}). mergeflow "
                              "never runs a pickle's code; convert the checkpoint to safetensors") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return dict(obj)
