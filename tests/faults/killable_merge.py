"""A small merge flow run in a subprocess by tests/test_faults.py, so the test can kill it.

    python killable_merge.py STORE BASE MODEL... [--slow-marker PATH]

Real tasks (fetch_checkpoint, extract_task_vectors, merge_models) and the real engine; the only
test-specific piece is the merge method `slow_average` (the mean, like `average`), which with
--slow-marker touches that file on its first tensor and then sleeps on each one, so the test
can kill the process while the merge is writing. Prints one JSON line: the task states and the
merged artifact.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from prefect import flow

from mergeflow.methods.base import GlobalStats, Hyperparams, TensorGroup
from mergeflow.methods.registry import register
from tasks.fetch import fetch_checkpoint
from tasks.merge import merge_models
from tasks.task_vectors import extract_task_vectors

SLOW_MARKER: Path | None = None


class _NoParams(Hyperparams):
    pass


@register("slow_average", hyperparams=_NoParams, paper="test only", summary="average, slowly")
def slow_average(group: TensorGroup, params: _NoParams, stats: GlobalStats) -> torch.Tensor:
    if SLOW_MARKER is not None:
        SLOW_MARKER.touch()
        time.sleep(0.5)
    return group.models.mean(dim=0)


@flow(name="killable-merge")
def killable_merge(store: str, base_dir: str, model_dirs: list[str]) -> dict:
    base = fetch_checkpoint(base_dir)
    models = {f"m{i}": fetch_checkpoint(d) for i, d in enumerate(model_dirs)}
    tv_state = extract_task_vectors(store, base, models, return_state=True)
    merged_state = merge_models(store, "slow_average", {}, base, [models[k] for k in sorted(models)],
                                {}, "cpu", return_state=True)
    return {"task_vectors": tv_state.name, "merge": merged_state.name,
            "merged": merged_state.result().path}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("base")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--slow-marker")
    args = ap.parse_args()
    SLOW_MARKER = Path(args.slow_marker) if args.slow_marker else None
    print(json.dumps(killable_merge(args.store, args.base, args.models)), flush=True)
