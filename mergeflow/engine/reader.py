"""Positioned reads of whole tensors or row ranges from safetensors files.

The engine reads with `os.preadv` straight into a fresh tensor instead of memory-mapping: a
mapped file's touched pages count toward the process's resident memory until it is unmapped,
so mapping K models of several GB would make peak RSS grow with the model size. A positioned
read keeps memory at the few chunks in flight, and releases the GIL so reads overlap the math.
`prefetch` tells the OS which bytes come next (run_units hints a little ahead of its workers), so
reads from a cold page cache overlap the math too.
Pickle checkpoints (opt-in) are served from their in-memory state dict.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from mergeflow.checkpoint import Checkpoint, CheckpointError


class TensorSource:
    """One checkpoint's tensors, readable by name and row range without loading the rest."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False) -> None:
        self.checkpoint = Checkpoint(path, allow_pickle=allow_pickle)
        self._location: dict[str, tuple[Path, int]] = {}  # name -> (file, absolute data offset)
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # reads come from several threads
        files = {self.checkpoint.info(n).file for n in self.checkpoint.names}
        for file in sorted(files):
            if file.suffix == ".safetensors":
                self._location.update(_data_offsets(file))

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    def read(self, name: str, row_start: int | None = None, row_end: int | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` (storage dtype, CPU), or its rows [row_start, row_end) along dim 0.

        `out`: a contiguous tensor of the storage dtype and the right size to read into.
        """
        info = self.checkpoint.info(name)
        shape = info.shape
        whole = row_start is None or not shape
        if name not in self._location:  # pickle checkpoint: already in memory
            t = self.checkpoint.get(name)
            t = t if whole else t[row_start:row_end]
            return t if out is None else out.copy_(t.reshape(out.shape))
        row_elems = 1
        for s in shape[1:]:
            row_elems *= s
        if whole:
            row_start, row_end = 0, (shape[0] if shape else 1)
            out_shape = shape
        else:
            out_shape = (row_end - row_start, *shape[1:])
        itemsize = info.dtype.itemsize
        nbytes = (row_end - row_start) * row_elems * itemsize
        if out is not None:
            if out.dtype != info.dtype or out.numel() * itemsize != nbytes or not out.is_contiguous():
                raise ValueError(f"read({name!r}): `out` must be a contiguous {info.dtype} of {nbytes} bytes")
            buf = out.reshape(-1).view(torch.uint8)
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            file, offset = self._location[name]
            self._pread(file, offset + row_start * row_elems * itemsize, buf)
        return buf.view(info.dtype).reshape(out_shape) if out is None else out

    def read_blocks(self, name: str, block_bytes: int = 16 << 20) -> Iterator[torch.Tensor]:
        """Tensor `name` as consecutive blocks of whole rows, about `block_bytes` each (one row
        at least), in order: its bytes without holding the tensor in memory."""
        shape = self.checkpoint.info(name).shape
        if not shape:
            yield self.read(name)
            return
        step = max(1, block_bytes // max(1, self._row_bytes(name)))
        for start in range(0, shape[0], step):
            yield self.read(name, start, min(shape[0], start + step))

    def prefetch(self, name: str, row_start: int | None = None, row_end: int | None = None) -> None:
        """Ask the OS to start reading tensor `name` (or its rows) into the page cache and return
        at once; a later `read` finds the bytes there. A no-op without posix_fadvise, and for
        pickle checkpoints (already in memory)."""
        if name not in self._location or not hasattr(os, "posix_fadvise"):
            return
        shape, row_bytes = self.checkpoint.info(name).shape, self._row_bytes(name)
        if row_start is None or not shape:
            row_start, row_end = 0, (shape[0] if shape else 1)
        nbytes = (row_end - row_start) * row_bytes
        if nbytes:  # a length of 0 would mean "to the end of the file"
            file, offset = self._location[name]
            os.posix_fadvise(self._fd(file), offset + row_start * row_bytes, nbytes, os.POSIX_FADV_WILLNEED)

    def in_page_cache(self, samples: int = 16) -> bool:
        """Whether this checkpoint's files look cached: of `samples` evenly spread bytes of each
        file, all but a few can be read without waiting for the disk (preadv2 with RWF_NOWAIT,
        ~2 us a probe). A few misses are allowed because a cached page that carries the OS's
        mark to read further ahead also answers EAGAIN (1 probe of 256 did, on inputs just read
        in full); a file on disk misses every probe. False where the OS cannot tell; True for
        pickle checkpoints (already in memory)."""
        if not hasattr(os, "RWF_NOWAIT"):
            return False
        byte = bytearray(1)
        for file in sorted({file for file, _ in self._location.values()}):
            fd = self._fd(file)
            size, misses = os.fstat(fd).st_size, 0
            for k in range(samples):
                try:
                    misses += os.preadv(fd, [byte], size * k // samples, os.RWF_NOWAIT) != 1
                except BlockingIOError:  # EAGAIN: not in the page cache
                    misses += 1
                except OSError:  # EOPNOTSUPP: this file system cannot tell
                    return False
            if misses > samples // 8:
                return False
        return True

    def _row_bytes(self, name: str) -> int:
        """Bytes of one row (along dim 0) of tensor `name`; a scalar is one row."""
        info = self.checkpoint.info(name)
        return info.dtype.itemsize * math.prod(info.shape[1:])

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def _pread(self, file: Path, offset: int, buf: torch.Tensor) -> None:
        fd = self._fd(file)
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{file}: unexpected end of file (truncated checkpoint?)")
            done += got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _data_offsets(file: Path) -> dict[str, tuple[Path, int]]:
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    start = 8 + header_len
    return {
        name: (file, start + meta["data_offsets"][0])
        for name, meta in header.items()
        if name != "__metadata__"
    }
