"""Per-task coefficient search (PCB's evolutionary search), as a flow:

    checkpoints -> [pcb: scores, once, cached] -> NGOpt asks `workers` candidates
                -> evaluate each on VALIDATION (parallel tasks) -> tell -> ... (budget times)
                -> best candidate -> (optionally) its test accuracy, for the report only

Defaults follow the official pcb_ES.py: nevergrad NGOpt, one coefficient per task, start 1.0,
bounds [0.8, 1.3], budget 100; objective = mean validation accuracy over the tasks (the official
NLP code searched on test; here the objective's split is fixed to validation in the task).
The chosen coefficients are the best evaluated candidate (earliest on ties), so they are exactly
what validation preferred. Works for pcb (variant vision_es or vision), task_arithmetic and ties.

MLflow: one run per search; per evaluation (step = its index) the metrics `search/val_mean`,
`search/best_val_mean` and `search/lam/<task>`; artifacts `search.png` (objective and best so far
vs evaluation) and `search_points.json`; params and the chosen lams.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.coefficient_search import evaluate_candidate, evaluate_choice, pcb_scores, search_figure

DEFAULTS = {"budget": 100, "lower": 0.8, "upper": 1.3, "init": 1.0}


@flow(name="coefficient-search", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def coefficient_search(
    zoo_dir: str,
    store: str = ".artifacts",
    method: str = "pcb",
    hparams: dict[str, Any] | None = None,
    tasks: list[str] | None = None,
    budget: int = DEFAULTS["budget"],
    lower: float = DEFAULTS["lower"],
    upper: float = DEFAULTS["upper"],
    init: float = DEFAULTS["init"],
    workers: int = 2,
    seed: int = 0,
    eval_limit: int | None = None,
    batch_size: int = 1024,
    device: str = "cpu",
    test: bool = False,
    track: bool = True,
    experiment: str = "mergeflow",
    tracking_uri: str | None = None,
    project_dir: str = ".",
) -> dict[str, Any]:
    """Search one coefficient per fine-tuned model of the zoo (models in sorted task order).

    Returns {"lams": [...], "lams_by_task": {...}, "val_accuracy": {...}, "val_mean": float,
    "points": [{"lams", "val_mean", "val_accuracy"}...], "test_accuracy": {...} | None, "run_id"}.
    """
    from mergeflow.coefficient_search import candidate_hparams
    from mergeflow.sources import resolve_checkpoint
    from mergeflow.zoo import Zoo

    hparams = dict(hparams or {})
    if method == "pcb":  # the official searched setting (pcb_ES.py) unless told otherwise
        hparams = {"variant": "vision_es", "ratio": 0.05, **hparams}
    _check_settings(budget, lower, upper, init, workers)
    zoo = Zoo.open(zoo_dir)
    model_tasks = sorted(zoo.tasks)
    tasks = list(tasks or zoo.tasks)
    candidate_hparams(method, hparams, [init] * len(model_tasks))  # bad settings fail before any work
    base = resolve_checkpoint(str(zoo.pretrained_dir))
    models = [resolve_checkpoint(str(zoo.expert_dir(t))) for t in model_tasks]

    scores = None
    if method == "pcb":
        full = get_pcb_params(hparams)
        scores = pcb_scores(store, base, models, full["ratio"], full["variant"], full["clip"])
    common = dict(zoo_dir=str(zoo.root), tasks=tasks, method=method, hparams=hparams, base=base,
                  models=models, scores=scores, limit=eval_limit, batch_size=batch_size, device=device)

    tracker = _tracker(experiment, tracking_uri, project_dir) if track else None
    settings = {"method": method, "hparams": hparams, "budget": budget, "lower": lower, "upper": upper,
                "init": init, "workers": workers, "seed": seed, "optimizer": "nevergrad.NGOpt",
                "objective": "mean validation accuracy", "models": model_tasks, "eval_tasks": tasks,
                "eval_limit": eval_limit}
    with _maybe_run(tracker, f"coefficient_search {method}", settings) as run_id:
        points = _search(common, len(model_tasks), budget, lower, upper, init, workers, seed,
                         lambda new, all_points: _log_points(tracker, run_id, model_tasks, new, all_points))
        best = max(points, key=lambda p: p["val_mean"])  # max keeps the earliest of equal values
        result = {"lams": best["lams"], "lams_by_task": dict(zip(model_tasks, best["lams"], strict=True)),
                  "val_accuracy": best["val_accuracy"], "val_mean": best["val_mean"], "points": points,
                  "test_accuracy": None, "run_id": run_id}
        if test:
            acc = evaluate_choice(**common, lams=best["lams"], split="test")
            result["test_accuracy"] = acc
        _log_result(tracker, run_id, method, result)
    print(f"coefficient search ({method}): best mean val accuracy {100 * best['val_mean']:.2f}% "
          f"at lams {result['lams_by_task']} after {len(points)} evaluations")
    return result


def get_pcb_params(hparams: dict[str, Any]) -> dict[str, Any]:
    """PCB's validated hyperparameters with defaults filled in (lam aside)."""
    from mergeflow.methods import get_method

    return get_method("pcb").params(**hparams).model_dump()


def _search(common: dict[str, Any], n: int, budget: int, lower: float, upper: float, init: float,
            workers: int, seed: int, on_batch) -> list[dict[str, Any]]:
    """Ask `workers` candidates at a time, evaluate them in parallel, tell the optimiser."""
    import nevergrad as ng
    import numpy as np

    parametrization = ng.p.Array(init=[init] * n, lower=lower, upper=upper)
    parametrization.random_state = np.random.RandomState(seed)  # same seed, same candidates
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget, num_workers=workers)
    points: list[dict[str, Any]] = []
    while len(points) < budget:
        asked = [optimizer.ask() for _ in range(min(workers, budget - len(points)))]
        lams = [[float(x) for x in c.value] for c in asked]
        futures = [evaluate_candidate.submit(**common, lams=lam) for lam in lams]
        new = []
        for candidate, lam, future in zip(asked, lams, futures, strict=True):
            accuracy = future.result()
            mean = sum(accuracy.values()) / len(accuracy)
            optimizer.tell(candidate, -mean)  # nevergrad minimises
            new.append({"lams": lam, "val_mean": mean, "val_accuracy": accuracy})
        points.extend(new)
        on_batch(new, points)
    return points


def _check_settings(budget: int, lower: float, upper: float, init: float, workers: int) -> None:
    if budget < 1:
        raise ValueError(f"budget={budget}: the search needs at least one evaluation")
    if not lower < upper:
        raise ValueError(f"bounds lower={lower}, upper={upper}: need lower < upper")
    if not lower <= init <= upper:
        raise ValueError(f"init={init} is outside the bounds [{lower}, {upper}]")
    if workers < 1:
        raise ValueError(f"workers={workers}: need at least 1")


# ---- MLflow ----------------------------------------------------------------------------------------


def _tracker(experiment: str, tracking_uri: str | None, project_dir: str):
    from tasks.tracking import Tracker

    return Tracker(experiment, tracking_uri=tracking_uri, project_dir=Path(project_dir))


class _NoRun:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _maybe_run(tracker, name: str, settings: dict[str, Any]):
    if tracker is None:
        return _NoRun()
    return tracker.parent_run(name, params=settings, tags={"mergeflow.kind": "coefficient_search"})


def _log_points(tracker, run_id: str | None, model_tasks: list[str], new: list[dict], points: list[dict]) -> None:
    if tracker is None:
        return
    from mlflow.entities import Metric

    first = len(points) - len(new)
    best = max((p["val_mean"] for p in points[:first]), default=float("-inf"))
    metrics = []
    for step, point in enumerate(new, start=first):
        best = max(best, point["val_mean"])
        metrics += [Metric("search/val_mean", point["val_mean"], 0, step),
                    Metric("search/best_val_mean", best, 0, step)]
        metrics += [Metric(f"search/lam/{t}", lam, 0, step) for t, lam in zip(model_tasks, point["lams"], strict=True)]
    tracker.client.log_batch(run_id, metrics=metrics)


def _log_result(tracker, run_id: str | None, method: str, result: dict[str, Any]) -> None:
    if tracker is None:
        return
    from mlflow.entities import Metric

    metrics = [Metric("best/val_mean", result["val_mean"], 0, 0)]
    metrics += [Metric(f"best/lam/{t}", lam, 0, 0) for t, lam in result["lams_by_task"].items()]
    metrics += [Metric(f"best/val_accuracy/{t}", a, 0, 0) for t, a in result["val_accuracy"].items()]
    if result["test_accuracy"]:
        test = result["test_accuracy"]
        metrics += [Metric(f"best/test_accuracy/{t}", a, 0, 0) for t, a in test.items()]
        metrics.append(Metric("best/test_accuracy_avg", sum(test.values()) / len(test), 0, 0))
    tracker.client.log_batch(run_id, metrics=metrics)
    values = [p["val_mean"] for p in result["points"]]
    tracker.client.log_figure(run_id, search_figure(values, f"coefficient search: {method}"), "search.png")
    tracker.client.log_dict(run_id, {k: v for k, v in result.items() if k != "run_id"}, "search_points.json")
