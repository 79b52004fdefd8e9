"""The sweep: a grid of hyperparameters per method, merged and evaluated in parallel; each
method's setting is chosen on the VALIDATION split (never test), then reported on test.

    params.sweep.grid = {task_arithmetic: {lam: [0.1, 0.3, 0.5]}, ties: {k: [0.1, 0.2], lam: [1.0]}}

    zoo -> fetch -> task vectors -> for each grid point: [method steps] -> merge -> evaluate(val)
        -> choose per method (best val average; ties go to the earlier grid point)
        -> evaluate(test) of the chosen settings, pretrained and experts

Every grid point is an MLflow child run (val metrics) under one parent run per method; the
parent records the chosen setting and its test accuracy. Each method's chosen merge is
registered in the MLflow model registry, and the alias `champion` goes to the best of them by
validation accuracy (tasks/registry.py). Merges and evaluations are the same
cached tasks as the merge pipeline, so a point already computed by `mergeflow run` is reused.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.merge import evaluate, expert_accuracy, gather_inputs
from flows.params import MethodChoice, Params, expand_grid
from flows.preparation import MergeInputs, prepare
from mergeflow.evaluation import format_accuracy_table
from tasks.evaluate import evaluate_model
from tasks.merge import merge_models

VALIDATION = "val"


@flow(name="sweep", log_prints=True)
def sweep_flow(params: Params) -> dict[str, Any]:
    """Returns {"tasks", "methods": {method: {"points": [...], "chosen": ..., "test": ...}},
    "pretrained", "experts"} (test accuracies for the chosen settings and baselines)."""
    if not params.sweep.grid:
        raise ValueError("sweep.grid is empty: add e.g. `sweep: {grid: {task_arithmetic: {lam: [0.1, 0.3]}}}`")
    inputs = gather_inputs(params)
    grid = {m: [MethodChoice(**p) for p in expand_grid(m, axes)] for m, axes in params.sweep.grid.items()}

    # Submit every grid point at once: the task runner runs them `sweep.workers` at a time.
    val_futures = {m: [validate_point(inputs, c) for c in choices] for m, choices in grid.items()}
    expert_val = expert_accuracy(inputs, VALIDATION)
    expert_test = expert_accuracy(inputs, "test")
    pretrained_test = evaluate(inputs, inputs.base, inputs.tasks, "test")

    methods = {}
    for method, futures in val_futures.items():
        points = []
        for choice, (merged_f, val_f) in zip(grid[method], futures, strict=True):
            merged, val = merged_f.result(), val_f.result().summary["accuracy"]
            points.append({"label": choice.label, "hparams": choice.hparams(), "merged": merged,
                           "val": val, "val_average": _mean(val, inputs.tasks)})
        best = max(points, key=lambda p: p["val_average"])  # max keeps the first of equals
        test = evaluate(inputs, best["merged"], inputs.tasks, "test")
        methods[method] = {"points": points, "chosen": best["label"], "test": test,
                           "test_average": _mean(test, inputs.tasks)}

    result = {"tasks": inputs.tasks, "methods": methods, "pretrained": pretrained_test,
              "experts": expert_test, "expert_val": expert_val}
    if params.tracking.enabled:
        track_sweep(params, result, inputs)
    return _without_refs(result)


def validate_point(inputs: MergeInputs, choice: MethodChoice):
    """[method steps] -> merge -> evaluate on val, submitted to the task runner (futures)."""
    prepared = prepare(inputs, choice)
    models = [inputs.models[t] for t in sorted(inputs.models)]
    merged = merge_models.submit(inputs.store, choice.method, choice.hparams(), inputs.base, models,
                                 prepared, inputs.device)
    ev = inputs.params.evaluation
    val = evaluate_model.submit(inputs.store, merged, inputs.zoo, inputs.tasks, VALIDATION,
                                ev.batch_size, ev.limit, inputs.device)
    return merged, val


def track_sweep(params: Params, result: dict[str, Any], inputs: MergeInputs) -> None:
    """One parent run per method (chosen setting, its test accuracy), one child run per point."""
    from tasks.registry import promote_champion, register_merged_model
    from tasks.tracking import Tracker

    tracker = Tracker(params.tracking.experiment, tracking_uri=params.tracking_uri(),
                      artifact_root=params.artifact_root(), project_dir=params.project)
    input_hashes = {"pretrained": inputs.base.content_hash,
                    **{f"expert/{t}": m.content_hash for t, m in inputs.models.items()}}
    for method, r in result["methods"].items():
        with tracker.parent_run(f"sweep {method}", params={"sweep.method": method,
                                                          "sweep.grid": params.sweep.grid[method],
                                                          "sweep.chosen": r["chosen"],
                                                          "sweep.selection_split": VALIDATION}) as parent:
            for point in r["points"]:
                run_id = tracker.log_merge_run(
                    method=method, hyperparams=point["hparams"], accuracy=point["val"],
                    expert_accuracy=result["expert_val"], params={"evaluation.split": VALIDATION},
                    input_hashes=input_hashes, output_hash=point["merged"].content_hash,
                    run_name=f"{point['label']} [val]", parent_run_id=parent,
                    tags={"mergeflow.sweep.chosen": str(point["label"] == r["chosen"])})
                if point["label"] == r["chosen"]:
                    register_merged_model(point["merged"].path, run_id,
                                          val_accuracy=point["val_average"],
                                          tracking_uri=params.tracking_uri())
            from mlflow.entities import Metric

            tracker.client.log_batch(parent, metrics=[
                Metric(f"test_accuracy/{t}", float(a), 0, 0) for t, a in r["test"].items()
            ] + [Metric("test_accuracy_avg", float(r["test_average"]), 0, 0)])
    promote_champion(tracking_uri=params.tracking_uri())


def format_sweep(result: dict[str, Any]) -> str:
    """Per method: every grid point's val average (chosen marked), then test of the chosen."""
    tasks = result["tasks"]
    lines = []
    for method, r in result["methods"].items():
        lines.append(f"{method}: validation average accuracy (%) per grid point")
        for p in r["points"]:
            mark = "  <- chosen" if p["label"] == r["chosen"] else ""
            lines.append(f"  {p['label']:<40} {100 * p['val_average']:6.2f}{mark}")
    lines.append("")
    lines.append("test accuracy (%) of the chosen settings (chosen on val, never on test)")
    rows = {"pretrained": result["pretrained"], "experts": result["experts"],
            **{r["chosen"]: r["test"] for r in result["methods"].values()}}
    lines.append(format_accuracy_table(rows, tasks, normalized={
        name: _mean({t: acc[t] / result["experts"][t] for t in tasks}, tasks) for name, acc in rows.items()}))
    return "\n".join(lines)


def run_sweep(params: Params) -> dict[str, Any]:
    """The sweep flow with a thread pool of `sweep.workers` (merges and evaluations in parallel)."""
    runner = ThreadPoolTaskRunner(max_workers=params.sweep.workers)
    return sweep_flow.with_options(task_runner=runner)(params)


def _mean(acc: dict[str, float], tasks: list[str]) -> float:
    return sum(acc[t] for t in tasks) / len(tasks)


def _without_refs(result: dict[str, Any]) -> dict[str, Any]:
    """The flow's return value: plain JSON (merged models as their paths and hashes)."""
    for r in result["methods"].values():
        for p in r["points"]:
            p["merged"] = {"path": p["merged"].path, "content_hash": p["merged"].content_hash}
    return result
