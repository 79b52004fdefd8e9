"""Task: build the embedded model zoo (pretrained ViT, experts, heads) into the artifact store."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.artifacts import ArtifactRef
from tasks.cache import ArtifactCache

POLICY = ArtifactCache(task="build_zoo", kind="zoo",
                       code=("mergeflow.zoo", "mergeflow.datasets", "mergeflow.checkpoint_writer", "tasks.zoo"))


@task(name="build_zoo", cache_policy=POLICY, persist_result=True)
def build_zoo(store: str, spec: dict[str, Any]) -> ArtifactRef:
    """Train the zoo described by `spec` (ZooSpec fields) once; later calls hit the cache."""
    slot = POLICY.slot(locals())
    if slot.done:
        return slot.done
    from mergeflow.zoo import ZooSpec
    from mergeflow.zoo import build_zoo as build

    with slot.writer("zoo") as out:
        zoo = build(ZooSpec(**spec), out.main_path)
        out.summary = {"tasks": zoo.tasks}
    return out.ref
