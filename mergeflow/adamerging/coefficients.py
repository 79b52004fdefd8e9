"""AdaMerging coefficients: one row per merged tensor (layer-wise) or a single row (task-wise).

`values` has shape (rows, n_tasks). Row j of a layer-wise table scales the task vectors of the
tensor `tensor_names[j]`; a task-wise table has one row that scales every tensor. The
pretrained model's coefficient is a fixed 1 and is not stored.

The artifact is one safetensors file: the clamped coefficients (what a merge uses) under
`coefficients`, the raw trained values under `raw`, and JSON metadata (mode, task names,
tensor names, the tuning settings) in the header under `adamerging`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

Mode = Literal["task_wise", "layer_wise"]
MODES: tuple[str, ...] = ("task_wise", "layer_wise")
FORMAT_VERSION = 1
_METADATA_KEY = "adamerging"


@dataclass(frozen=True)
class Coefficients:
    """Learned merging coefficients and what they apply to."""

    mode: Mode
    task_names: tuple[str, ...]
    tensor_names: tuple[str, ...]
    values: torch.Tensor  # (rows, n_tasks) float32, already clamped
    raw: torch.Tensor | None = None  # the unclamped trained parameter, same shape
    metadata: dict = field(default_factory=dict)  # tuning settings, variant, data provenance

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown AdaMerging mode {self.mode!r}; use one of {MODES}")
        rows = 1 if self.mode == "task_wise" else len(self.tensor_names)
        want = (rows, len(self.task_names))
        if tuple(self.values.shape) != want:
            raise ValueError(
                f"{self.mode} coefficients for {len(self.task_names)} tasks and "
                f"{len(self.tensor_names)} tensors must have shape {want}, got {tuple(self.values.shape)}"
            )
        if self.raw is not None and self.raw.shape != self.values.shape:
            raise ValueError(f"raw coefficients shape {tuple(self.raw.shape)} != {want}")
        if len(set(self.tensor_names)) != len(self.tensor_names):
            raise ValueError("tensor_names contains duplicates")

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def row_index(self, tensor_name: str) -> int:
        """The row that scales `tensor_name` (0 for task-wise); a clear error if it has none."""
        if self.mode == "task_wise":
            return 0
        index = self._index()
        if tensor_name not in index:
            raise KeyError(
                f"tensor {tensor_name!r} has no layer-wise AdaMerging coefficients; the file covers "
                f"{len(self.tensor_names)} tensors (e.g. {list(self.tensor_names[:3])}). "
                "Merge the same model whose parameters were tuned (names must match)."
            )
        return index[tensor_name]

    def covers(self, tensor_name: str) -> bool:
        """Whether tuning merged tensor `tensor_name` (others stay at the base)."""
        return tensor_name in self._index()

    def row(self, tensor_name: str) -> torch.Tensor:
        """Coefficients (n_tasks,) float32 for one tensor."""
        return self.values[self.row_index(tensor_name)]

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {name: i for i, name in enumerate(self.tensor_names)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def header(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "mode": self.mode,
            "task_names": list(self.task_names),
            "tensor_names": list(self.tensor_names),
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact atomically (temp file in the same directory, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"coefficients": self.values.detach().to(torch.float32).contiguous().cpu()}
        if self.raw is not None:
            tensors["raw"] = self.raw.detach().to(torch.float32).contiguous().cpu()
        meta = {_METADATA_KEY: json.dumps(self.header(), sort_keys=True)}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Coefficients:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"AdaMerging coefficients file {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if _METADATA_KEY not in meta:
                raise ValueError(f"{path} is not an AdaMerging coefficients file (no {_METADATA_KEY!r} header)")
            header = json.loads(meta[_METADATA_KEY])
            values = f.get_tensor("coefficients")
            raw = f.get_tensor("raw") if "raw" in f.keys() else None
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported coefficients format {header.get('format_version')!r}")
        return cls(
            mode=header["mode"],
            task_names=tuple(header["task_names"]),
            tensor_names=tuple(header["tensor_names"]),
            values=values,
            raw=raw,
            metadata=header.get("metadata", {}),
        )


def initial_raw(mode: Mode, n_tasks: int, n_tensors: int, prior: float = 0.3) -> torch.Tensor:
    """The official initialisation: every coefficient equals `prior` (0.3)."""
    if mode not in MODES:
        raise ValueError(f"unknown AdaMerging mode {mode!r}; use one of {MODES}")
    rows = 1 if mode == "task_wise" else n_tensors
    return torch.full((rows, n_tasks), float(prior), dtype=torch.float32)


def clamp_coefficients(raw: torch.Tensor, low: float | None = 0.0, high: float | None = 1.0) -> torch.Tensor:
    """Forward-pass clamp. Its gradient is zero where raw lies outside [low, high] (torch.clamp's
    rule), so a coefficient pushed to 0 tends to stay there, as in the official code."""
    if low is None and high is None:
        return raw
    return torch.clamp(raw, min=low, max=high)
