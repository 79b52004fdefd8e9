"""Task: merge fine-tuned checkpoints into one model directory with a registered method, through
the streaming engine (the same code path as `mergeflow merge`)."""

from __future__ import annotations

from typing import Any

from prefect import task

from mergeflow.sources import CheckpointRef
from tasks.artifacts import ArtifactRef
from tasks.cache import ArtifactCache

POLICY = ArtifactCache(task="merge", kind="merged",
                       code=("mergeflow.methods", "mergeflow.engine", "mergeflow.statistics",
                             "mergeflow.checkpoint", "mergeflow.checkpoint_writer", "tasks.merge"))


@task(name="merge", cache_policy=POLICY, persist_result=True)
def merge_models(store: str, method: str, hparams: dict[str, Any], base: CheckpointRef,
                 models: list[CheckpointRef], prepared: dict[str, Any], device: str) -> ArtifactRef:
    """`prepared` holds the outputs of method-specific steps (learned coefficients, activation
    statistics): plain values are passed as hyperparameters, artifact references as their path."""
    slot = POLICY.slot(locals())
    if slot.done:
        return slot.done
    from mergeflow.engine import merge_checkpoints

    values = {**hparams, **{k: v.path if isinstance(v, ArtifactRef) else v for k, v in prepared.items()}}
    with slot.writer("model") as out:
        # The recipe this merge is, recorded in the manifest: `mergeflow merge` on it gives the same
        # bytes (its paths are the artifact store's, the content hashes beside them say what they held).
        recipe = {"method": method, "base": base.path, "models": [m.path for m in models],
                  "hyperparameters": values, "device": device}
        result = merge_checkpoints(method, base.path, recipe["models"], out.main_path, values,
                                   device=device, progress=True, recipe=recipe,
                                   input_hashes=[base.content_hash, *(m.content_hash for m in models)])
        out.content_hash = result.output_hash
        out.summary = {"method": method, "hparams": hparams}
    return out.ref
