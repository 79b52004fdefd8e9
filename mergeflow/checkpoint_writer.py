"""Atomic writing of sharded Hugging Face checkpoints.

Tensors are added one at a time and flushed into shards of at most `max_shard_bytes`. Everything
is written into a temporary sibling directory, which is renamed onto the destination only when
`commit()` succeeds: an interrupted write never leaves a half-written output behind.
Output is byte-deterministic: same tensors, same order, same bytes.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergeflow.checkpoint import INDEX_FILE, SINGLE_FILE
from mergeflow.stop_signals import track_unfinished, untrack_unfinished

DEFAULT_SHARD_BYTES = 2 * 2**30


def _host() -> str:
    """This machine's name as a temp directory's name carries it (no dashes: they separate fields)."""
    return socket.gethostname().replace("-", "_")


def _owner() -> str:
    """This process as a temp directory's owner: host and pid."""
    return f"{_host()}-{os.getpid()}"


_TEMP_DIR = re.compile(r"\.tmp-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Delete the temp directories of earlier writes to `out_dir` whose process is gone.

    A process killed outright (SIGKILL, the OOM killer, a power cut) cannot remove its temp
    directory; the next write to the same output does. Only directories of this host are
    touched: another machine's writer on a shared file system may still be running."""
    host = _host()
    removed = []
    for tmp_dir in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp-*"):
        owner = _TEMP_DIR.search(tmp_dir.name)
        if owner and owner["host"] == host and not _alive(int(owner["pid"])):
            shutil.rmtree(tmp_dir, ignore_errors=True)
            removed.append(tmp_dir)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class CheckpointWriter:
    """Use as a context manager; `commit()` happens on a clean exit, cleanup on an error."""

    def __init__(self, out_dir: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = True, durable: bool = False) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} exists; pass overwrite=True or choose another --out")
        self.max_shard_bytes = max_shard_bytes
        remove_stale_temp_dirs(self.out_dir)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{_owner()}-{uuid.uuid4().hex[:8]}"
        self.tmp_dir.mkdir(parents=True)
        track_unfinished(self.tmp_dir)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str], int]] = []  # temp file name, tensor names, bytes
        self._committed = False
        self.durable = durable  # fsync before the rename (survives power loss; costs time)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes

    def add_file(self, src: str | Path, name: str | None = None) -> None:
        """Copy a side file (config.json, tokenizer files) into the output."""
        shutil.copy2(src, self.tmp_dir / (name or Path(src).name))

    def write_text(self, name: str, text: str) -> None:
        (self.tmp_dir / name).write_text(text)

    def write_json(self, name: str, obj: object) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def _flush(self) -> None:
        if not self._pending:
            return
        tmp_name = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.tmp_dir / tmp_name), metadata={"format": "pt"})
        self._shards.append((tmp_name, list(self._pending), self._pending_bytes))
        self._pending, self._pending_bytes = {}, 0

    def commit(self) -> Path:
        self._flush()
        total = len(self._shards)
        if total == 1:
            os.replace(self.tmp_dir / self._shards[0][0], self.tmp_dir / SINGLE_FILE)
        elif total > 1:
            weight_map = {}
            for i, (tmp_name, names, _) in enumerate(self._shards, start=1):
                final = f"model-{i:05d}-of-{total:05d}.safetensors"
                os.replace(self.tmp_dir / tmp_name, self.tmp_dir / final)
                weight_map.update({n: final for n in names})
            size = sum(b for _, _, b in self._shards)
            self.write_json(INDEX_FILE, {"metadata": {"total_size": size}, "weight_map": weight_map})
        if self.durable:
            _fsync_dir(self.tmp_dir)
        if self.out_dir.exists():
            # Move the old output aside first so the destination is never half-replaced.
            trash = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, trash)
            os.replace(self.tmp_dir, self.out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp_dir, self.out_dir)
        self._committed = True
        self._finished()
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._finished()

    def _finished(self) -> None:
        untrack_unfinished(self.tmp_dir)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._committed:
            try:
                self.commit()
            except BaseException:  # the last shard did not fit (a full disk): no half output either
                self.abort()
                raise


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], out_dir: str | Path, *,
                    config: dict | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a state dict as an HF-style safetensors directory (sharded if large), atomically."""
    with CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes) as w:
        for name in sorted(state_dict):
            w.add(name, state_dict[name])
        if config is not None:
            w.write_json("config.json", config)
    return Path(out_dir)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
