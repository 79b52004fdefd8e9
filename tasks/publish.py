"""Copy an artifact to a fixed output path (a DVC out such as outputs/merged), atomically.

Not a Prefect task: it is a cheap, idempotent copy that runs every time, so the output folders
always match the current params even when every task was a cache hit. An unchanged output is
left untouched (same files, sizes and times), so DVC sees nothing new.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from tasks.artifacts import ArtifactRef


def publish(ref: ArtifactRef, dest: str | Path) -> Path:
    src, dest = Path(ref.path), Path(dest)
    if dest.exists() and _listing(src) == _listing(dest):
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


def _listing(path: Path) -> list[tuple[str, int, int]]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    root = path if path.is_dir() else path.parent
    return [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
