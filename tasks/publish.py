"""Copy an artifact to a fixed output path (a DVC out such as outputs/merged), atomically.

Not a Prefect task: it is a cheap, idempotent copy that runs every time, so the output folders
always match the current params even when every task was a cache hit. An unchanged output is
left untouched (same files and bytes), so DVC sees nothing new.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import uuid
from pathlib import Path

from tasks.artifacts import ArtifactRef


def publish(ref: ArtifactRef, dest: str | Path) -> Path:
    src, dest = Path(ref.path), Path(dest)
    if dest.exists() and _same_files(src, dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    return dest


def _same_files(a: Path, b: Path) -> bool:
    """Same relative paths and sizes, and each file has the same mtime or the same bytes
    (a `dvc checkout` rewrites times, not contents)."""
    fa, fb = _files(a), _files(b)
    if [(r, f.stat().st_size) for r, f in fa] != [(r, f.stat().st_size) for r, f in fb]:
        return False
    return all(x.stat().st_mtime_ns == y.stat().st_mtime_ns or filecmp.cmp(x, y, shallow=False)
               for (_, x), (_, y) in zip(fa, fb, strict=True))


def _files(path: Path) -> list[tuple[str, Path]]:
    if not path.is_dir():
        return [(path.name, path)]
    return [(str(f.relative_to(path)), f) for f in sorted(path.rglob("*")) if f.is_file()]
