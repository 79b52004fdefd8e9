"""Method-specific steps that run between task-vector extraction and the merge.

Most methods (average, task_arithmetic, ties, dare, pcb) merge from the checkpoints alone.
Others first need something learned or measured: AdaMerging tunes merging coefficients by
entropy minimisation on unlabeled data, PCB can search its coefficients, MuDSC collects
activations. Each such step is ONE Prefect task (cached on its inputs, writing an artifact),
registered here under the method's name.

How to add a step for method `m` (the whole change is one task and one line):
1. Write the task in `tasks/<m>.py` with `ArtifactCache` as its cache policy (see tasks/merge.py
   for the pattern: `slot = POLICY.slot(locals())`, write into `slot.writer()`, return the ref).
   Small results (coefficients) go into the ref's `summary`, big ones into files.
2. Write a step function `prepare_<m>(inputs: MergeInputs, choice: MethodChoice) -> dict` next to
   it: it calls the task(s) and returns the extra inputs of the merge, e.g.
   `{"coefficients": ref.summary["coefficients"]}` (a plain value, passed as a hyperparameter of
   the method) or `{"activations": ref}` (an artifact, passed to the method as its path).
3. Add `"m": "tasks.<m>:prepare_<m>"` to `STEPS` below.
The merge's cache key covers what the step returns, so a changed coefficient re-runs the merge
and everything after it, and nothing before.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flows.params import MethodChoice, Params
from mergeflow.sources import CheckpointRef
from tasks.artifacts import ArtifactRef

# method name -> "module:function" of its preparation step (imported only when that method runs)
STEPS: dict[str, str] = {
    "adamerging": "tasks.adamerging:prepare_adamerging",
}


@dataclass(frozen=True)
class MergeInputs:
    """Everything upstream of the merge that a preparation step may use (all references)."""

    store: str
    params: Params
    zoo: ArtifactRef
    tasks: list[str]
    base: CheckpointRef
    models: dict[str, CheckpointRef]  # task name -> fine-tuned checkpoint
    task_vectors: ArtifactRef
    device: str
    extra: dict[str, Any] = field(default_factory=dict)


PreparationStep = Callable[[MergeInputs, MethodChoice], dict[str, Any]]


def prepare(inputs: MergeInputs, choice: MethodChoice) -> dict[str, Any]:
    """Run the method's preparation step, if it has one; returns the merge's extra inputs."""
    target = STEPS.get(choice.method)
    if target is None:
        return {}
    module, func = target.split(":")
    step: PreparationStep = getattr(importlib.import_module(module), func)
    return dict(step(inputs, choice))
