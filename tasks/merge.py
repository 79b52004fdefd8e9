"""Task: merge fine-tuned checkpoints into one model directory with a registered method."""

from __future__ import annotations

from typing import Any

from prefect import task

from mergeflow.sources import CheckpointRef
from tasks.artifacts import ArtifactRef
from tasks.cache import ArtifactCache

POLICY = ArtifactCache(task="merge", kind="merged",
                       code=("mergeflow.methods", "mergeflow.merging", "mergeflow.statistics",
                             "mergeflow.checkpoint", "mergeflow.checkpoint_writer", "tasks.merge"))


@task(name="merge", cache_policy=POLICY, persist_result=True)
def merge_models(store: str, method: str, hparams: dict[str, Any], base: CheckpointRef,
                 models: list[CheckpointRef], prepared: dict[str, Any], device: str) -> ArtifactRef:
    """`prepared` holds the outputs of method-specific steps (learned coefficients, activation
    statistics): plain values are passed as hyperparameters, artifact references as their path."""
    slot = POLICY.slot(locals())
    if slot.done:
        return slot.done
    values = {**hparams, **{k: v.path if isinstance(v, ArtifactRef) else v for k, v in prepared.items()}}
    with slot.writer("model") as out:
        out.content_hash = _merge(method, values, base, models, str(out.main_path), device)
        out.summary = {"method": method, "hparams": hparams}
    return out.ref


def _merge(method: str, hparams: dict[str, Any], base: CheckpointRef, models: list[CheckpointRef],
           out_dir: str, device: str) -> str:
    """The streaming engine when it is installed, else the in-memory contract. Returns the
    output's content hash."""
    try:
        from mergeflow.engine import merge_checkpoints
    except ImportError:
        merge_checkpoints = None
    if merge_checkpoints is not None:
        result = merge_checkpoints(method, base.path, [m.path for m in models], out_dir, hparams,
                                   device=device, progress=True)
        return result.output_hash
    from mergeflow import load_state_dict, merge, save_checkpoint
    from mergeflow.hashing import hash_checkpoint

    merged = merge(method, load_state_dict(base.path), [load_state_dict(m.path) for m in models], **hparams)
    save_checkpoint(merged, out_dir)
    return hash_checkpoint(out_dir)
