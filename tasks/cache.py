"""Cache keys for artifact-producing tasks, and the Prefect cache policy that checks the disk.

A task's key is the sha256 of:
- the task's name and artifact kind,
- the code version: a hash of the source files of the library modules the task calls (plus the
  task's own module), so editing `mergeflow/methods/ties.py` invalidates merges, not the zoo;
- every argument, canonicalised: references to checkpoints and artifacts contribute their
  *content hash* (never their path), pydantic models their validated fields, plain values
  themselves. Arguments that cannot change the result (the store's location) are excluded.

`ArtifactCache` is the Prefect policy. Its key is that hash plus the store's location. If Prefect
holds a record for the key but the artifact `<store>/<kind>/<key>` was deleted, it returns no
key, so Prefect runs the task instead of returning a dangling path; the task rewrites the
artifact at the same address, so the stored record (which points there) is valid again. A task
body also starts by checking the store, so a lost Prefect home never recomputes an artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from tasks.artifacts import ArtifactRef, ArtifactStore

# Arguments that locate things but do not change them.
NOT_IN_KEY = frozenset({"store"})


def task_key(task: str, kind: str, code: Iterable[str], inputs: Mapping[str, Any]) -> str:
    """The cache key and artifact address of one task call."""
    body = {
        "task": task,
        "kind": kind,
        "code": code_version(tuple(sorted(code))),
        "inputs": {k: canonical(v) for k, v in sorted(inputs.items()) if k not in NOT_IN_KEY},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def canonical(value: Any) -> Any:
    """A JSON value that changes exactly when `value`'s content does."""
    content_hash = getattr(value, "content_hash", None)
    if isinstance(content_hash, str):  # ArtifactRef, sources.CheckpointRef: identity = content
        return {"content_hash": content_hash}
    if isinstance(value, BaseModel):
        return canonical(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        raise TypeError(f"a Path ({value}) in a cache key: pass a reference with a content hash")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot put a {type(value).__name__} into a cache key; pass plain values or refs")


@cache
def code_version(modules: tuple[str, ...]) -> str:
    """Hash of the source files of `modules` (a package counts all its .py files)."""
    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"code_version: module {name!r} not found")
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for f in files:
            h.update(f"{name}:{f.relative_to(origin.parent)}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class ArtifactCache(CachePolicy):
    """Cache on `task_key`, but only while the artifact it addresses is still in the store."""

    task: str = ""
    kind: str = ""
    code: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        slot = self.slot(inputs)
        # Prefect's cache records live in PREFECT_HOME, which may serve several projects (or test
        # stores): the record's key names the store too, so a hit never points into another one.
        key = f"{slot.key}-{hashlib.sha256(str(slot.store.root).encode()).hexdigest()[:12]}"
        if slot.done is None and _record_exists(key):
            # The artifact was deleted but Prefect still has a record pointing at it: run the
            # task (no key, so the record is not read); it rewrites the artifact at the same
            # address, which makes the record valid again for the next run.
            return None
        return key

    def slot(self, inputs: Mapping[str, Any]) -> ArtifactSlot:
        """Where this call's artifact lives; a task body starts with `POLICY.slot(locals())`."""
        store = ArtifactStore(inputs["store"])
        key = task_key(self.task, self.kind, self.code, inputs)
        return ArtifactSlot(store, self.kind, key, store.get(self.kind, key))


@dataclasses.dataclass(frozen=True)
class ArtifactSlot:
    """One task call's artifact: `done` if already stored, else write it with `writer()`."""

    store: ArtifactStore
    kind: str
    key: str
    done: ArtifactRef | None

    def writer(self, main: str = ""):
        return self.store.writer(self.kind, self.key, main)


def _record_exists(key: str) -> bool:
    from prefect.results import get_result_store

    return bool(get_result_store().exists(key))


@dataclasses.dataclass
class RecordedOnce(CachePolicy):
    """For tasks that record rather than compute (MLflow runs): the same inputs are recorded
    once. The key covers every input; after a local sqlite store was deleted, it records again."""

    task: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        body = {"task": self.task, "inputs": {k: canonical(v) for k, v in sorted(inputs.items())}}
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
        uri = str(inputs.get("tracking_uri") or "")
        store_gone = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()
        if store_gone and _record_exists(key):
            return None  # recorded into a store that was deleted since: record again
        return key
