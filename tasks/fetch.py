"""Prefect task: resolve a checkpoint reference to a local path and its content hash.

    from tasks.fetch import CheckpointRef, fetch_checkpoint

    base = fetch_checkpoint("outputs/zoo/pretrained")                # in a flow
    experts = fetch_checkpoint.map(["outputs/zoo/experts/mnist", ...])
    base.path, base.content_hash, base.n_tensors, base.nbytes

References (see `mergeflow.sources`): a local model directory or `.safetensors` file (relative
paths are taken from `base_dir`, default the cwd), `hf://org/name@revision`, `pip:package`.

`CheckpointRef.content_hash` is the identity downstream tasks key their caches on: pass the whole
`CheckpointRef` to them, never a bare path.

Cache key: the reference, the options, and the stat fingerprint (paths, sizes, mtimes) of the
weight files it resolves to now. A rewritten local checkpoint is therefore re-hashed, an unchanged
one is a cache hit without reading a byte. A hub repo not yet in the local cache has no key (the
task runs, downloads, and is cached from then on).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from mergeflow import __version__
from mergeflow.hashing import hash_json
from mergeflow.sources import CheckpointRef, cached_local_path, resolve_checkpoint, stat_fingerprint

__all__ = ["CheckpointRef", "fetch_checkpoint", "fetch_cache_key"]


def fetch_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """Prefect cache key of `fetch_checkpoint`; None (no caching) if the files are not local yet."""
    ref = parameters["ref"]
    location = cached_local_path(ref, base_dir=parameters.get("base_dir"))
    if location is None:
        return None
    options = {k: parameters.get(k) for k in ("allow_pickle", "trust_remote_code")}
    return "fetch-" + hash_json([ref, options, str(location), stat_fingerprint(location), __version__])


@task(name="fetch-checkpoint", cache_key_fn=fetch_cache_key, persist_result=True,
      task_run_name="fetch {ref}")
def fetch_checkpoint(
    ref: str,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    base_dir: str | None = None,
) -> CheckpointRef:
    """Resolve `ref` to a checked local checkpoint with its content hash (cached across runs)."""
    return resolve_checkpoint(
        ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, base_dir=base_dir
    )
