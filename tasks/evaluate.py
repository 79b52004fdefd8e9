"""Task: per-task accuracy of a model's encoder with each task's own (frozen) head."""

from __future__ import annotations

import json
from typing import Any

from prefect import task

from tasks.artifacts import ArtifactRef
from tasks.cache import ArtifactCache

POLICY = ArtifactCache(task="evaluate", kind="evaluation",
                       code=("mergeflow.evaluation", "mergeflow.zoo", "mergeflow.datasets",
                             "mergeflow.checkpoint", "tasks.evaluate"))


@task(name="evaluate", cache_policy=POLICY, persist_result=True)
def evaluate_model(store: str, model: Any, zoo: ArtifactRef, tasks: list[str],
                   split: str, batch_size: int, limit: int | None, device: str) -> ArtifactRef:
    """`model` is any reference with `.path` and `.content_hash` (a merged artifact, a fetched
    checkpoint). The accuracies come back in `summary["accuracy"]` and as accuracy.json."""
    slot = POLICY.slot(locals())
    if slot.done:
        return slot.done
    from mergeflow.evaluation import evaluate
    from mergeflow.zoo import Zoo

    accuracy = evaluate(model.path, Zoo.open(zoo.path), tasks, split=split, device=device,
                        batch_size=batch_size, limit=limit, progress=True)
    with slot.writer("accuracy.json") as out:
        out.main_path.write_text(json.dumps(accuracy, indent=2, sort_keys=True) + "\n")
        out.summary = {"accuracy": accuracy, "split": split}
    return out.ref
