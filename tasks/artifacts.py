"""A content-addressed artifact store: what tasks write, addressed by a hash, never overwritten.

Layout: `<root>/<kind>/<key>/` holding the artifact's files and a `manifest.json`
(kind, key, content hash, summary). `key` is the task's cache key: the hash of everything that
determines the content (the content hashes of the inputs, the method and its validated
hyperparameters, the code version). Addressing by that hash rather than by the output bytes
means a task knows where its result lives *before* computing it, so a cache hit can be checked
against the disk (a deleted artifact is recomputed, never returned as a dangling path). The
output's own content hash is recorded in the manifest and is what downstream keys use.

Writes are atomic and safe under concurrency: a writer fills `<root>/.tmp/<random>/`, then
renames it onto `<kind>/<key>/` only if that is absent. Directory rename onto a non-empty
directory fails on POSIX, so when two writers race, one wins and the other discards its copy:
readers only ever see complete artifacts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from mergeflow.stop_signals import track_unfinished, untrack_unfinished

MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ArtifactStoreError(ValueError):
    """A bad kind/key/path for the artifact store (for example one escaping its root)."""


class ArtifactRef(BaseModel):
    """A small, picklable reference to a stored artifact: what tasks return instead of tensors.

    `path` is the artifact's main content (a model dir, a zoo dir, a JSON file); `summary`
    carries small results (accuracies, learned coefficients) so the flow never opens files.
    """

    model_config = ConfigDict(frozen=True)

    kind: str
    key: str
    root: str  # the artifact directory <store>/<kind>/<key>
    path: str
    main: str = ""  # `path` relative to `root`
    content_hash: str
    summary: dict[str, Any] = {}


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def dir(self, kind: str, key: str) -> Path:
        """`<root>/<kind>/<key>`, refusing names that could escape the store."""
        for part, what in ((kind, "kind"), (key, "key")):
            if not _NAME.match(part) or part in (".", ".."):
                raise ArtifactStoreError(
                    f"artifact {what} {part!r} is not a plain name (letters, digits, _ . -); "
                    "a key must be a hash, never a path")
        return self.contain(self.root / kind / key)

    def contain(self, path: str | Path) -> Path:
        """`path` resolved, if it lies inside the store; else an error (no escapes via .. or links)."""
        resolved = Path(path).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ArtifactStoreError(f"path {str(path)!r} escapes the artifact store {self.root}")
        return resolved

    def get(self, kind: str, key: str) -> ArtifactRef | None:
        """The complete artifact `<kind>/<key>`, or None if absent (or deleted since)."""
        manifest = self.dir(kind, key) / MANIFEST
        if not manifest.is_file():
            return None
        ref = ArtifactRef(**json.loads(manifest.read_text()))
        # Paths are re-derived from where the artifact is now (the project may have moved).
        root = manifest.parent
        ref = ref.model_copy(update={"root": str(root), "path": str(root / ref.main)})
        return ref if Path(ref.path).exists() else None

    def exists(self, kind: str, key: str) -> bool:
        return self.get(kind, key) is not None

    @contextmanager
    def writer(self, kind: str, key: str, main: str = "") -> Iterator[PendingArtifact]:
        """Fill `pending.dir` (and optionally set `pending.summary` / `pending.content_hash`);
        on a clean exit it becomes `<kind>/<key>/`, on an error it is removed."""
        final = self.dir(kind, key)
        tmp_parent = self.root / ".tmp"
        tmp_parent.mkdir(parents=True, exist_ok=True)
        pending = PendingArtifact(tmp_parent / f"{kind}-{uuid.uuid4().hex}", main)
        pending.dir.mkdir()
        track_unfinished(pending.dir)  # a hard exit on Ctrl-C removes it too
        try:
            yield pending
            pending.ref = self._commit(pending, kind, key, final)
        finally:
            shutil.rmtree(pending.dir, ignore_errors=True)
            untrack_unfinished(pending.dir)

    def _commit(self, pending: PendingArtifact, kind: str, key: str, final: Path) -> ArtifactRef:
        main = pending.dir / pending.main if pending.main else pending.dir
        if not main.exists():
            raise ArtifactStoreError(f"task wrote no {pending.main!r} into its {kind} artifact")
        content_hash = pending.content_hash or hash_tree(pending.dir)
        ref = ArtifactRef(kind=kind, key=key, root=str(final), path=str(final / pending.main),
                          main=pending.main, content_hash=content_hash, summary=pending.summary)
        (pending.dir / MANIFEST).write_text(json.dumps(ref.model_dump(), indent=2, sort_keys=True) + "\n")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and not (final / MANIFEST).is_file():
            # A leftover without a manifest is not an artifact (e.g. a partial manual copy).
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(pending.dir, final)  # rename-if-absent: fails if `final` is a non-empty dir
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            existing = self.get(kind, key)  # another writer won the race: theirs is as good
            if existing is None:
                raise
            return existing
        return ref

    def delete(self, kind: str, key: str) -> None:
        shutil.rmtree(self.dir(kind, key), ignore_errors=True)


class PendingArtifact:
    """An artifact being written: files go into `dir`; `ref` is set once committed."""

    def __init__(self, dir: Path, main: str) -> None:
        self.dir = dir
        self.main = main
        self.summary: dict[str, Any] = {}
        self.content_hash: str | None = None
        self.ref: ArtifactRef | None = None

    @property
    def main_path(self) -> Path:
        return self.dir / self.main if self.main else self.dir


def hash_tree(path: str | Path) -> str:
    """sha256 over the relative paths and bytes of every file under `path`, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()
