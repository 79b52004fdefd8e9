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

A coefficient search (`search:` on a pcb, task_arithmetic or ties entry) is not keyed by a method
name: the same block applies to three methods. So it is one more step, `SEARCH_STEP`, run when
the choice has a `search` block (after the method's own step, if any; params validation already
refused `search` on other methods). It returns `{"lam": [one per task]}`, which replaces the
method's lam in the merge. `run_tags(inputs, choice)` gives the merge's MLflow run the
provenance of such inputs (the chosen lams, the budget, the search's run id).
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
# run when a choice has a `search:` block (any method with a per-task lam), and its MLflow tags
SEARCH_STEP = "flows.coefficient_search:prepare_search"
SEARCH_TAGS = "flows.coefficient_search:search_tags"


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
    """Run the method's preparation step and the search step, where they apply; returns the
    merge's extra inputs."""
    prepared: dict[str, Any] = {}
    if choice.method in STEPS:
        prepared.update(_load(STEPS[choice.method])(inputs, choice))
    if choice.search is not None:
        prepared.update(_load(SEARCH_STEP)(inputs, choice))
    return prepared


def run_tags(inputs: MergeInputs, choice: MethodChoice) -> dict[str, str]:
    """MLflow tags for the merge's run that say where prepared inputs came from ({} if nothing)."""
    if choice.search is None:
        return {}
    return dict(_load(SEARCH_TAGS)(inputs, choice))


def _load(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)
