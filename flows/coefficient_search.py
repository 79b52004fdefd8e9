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

In the merge pipeline (a `search:` block on a pcb/task_arithmetic/ties entry of params.yaml),
`prepare_search` is the preparation step (flows/preparation.py): it runs this flow as a subflow
inside ONE cached task, `search_coefficients`, whose artifact (`search.json`, the lams in its
summary) is keyed on the zoo, the checkpoints, the method's hyperparameters, every search and
evaluation setting, the tracking destination and the code; a second run with the same params is
Cached and never searches again. The merge then gets `lam` = the chosen per-task list, and
`search_tags` gives its MLflow run the provenance (`mergeflow.lam_source=search`, the lams, the
budget, the search's run id). The search's own objective is fixed to validation (tasks/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.params import SearchSettings
from mergeflow.sources import CheckpointRef
from tasks.artifacts import ArtifactRef
from tasks.cache import ArtifactCache
from tasks.coefficient_search import (
    SEARCH_SPLIT,
    evaluate_candidate,
    evaluate_choice,
    pcb_scores,
    search_figure,
)

# The official pcb_ES.py settings; params.yaml's `search:` block has the same defaults.
DEFAULTS = {k: SearchSettings.model_fields[k].default for k in ("budget", "lower", "upper", "init")}


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
    artifact_root: str | None = None,
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

    tracker = _tracker(experiment, tracking_uri, project_dir, artifact_root) if track else None
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
    optimizer = make_optimizer(n, budget, lower, upper, init, workers, seed)
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


def make_optimizer(n: int, budget: int, lower: float, upper: float, init: float, workers: int, seed: int):
    """nevergrad's NGOpt over n coefficients in [lower, upper], starting at init, as the official
    pcb_ES.py builds it; seeded, so the same settings ask the same candidates."""
    import nevergrad as ng
    import numpy as np

    parametrization = ng.p.Array(init=[init] * n, lower=lower, upper=upper)
    parametrization.random_state = np.random.RandomState(seed)
    return ng.optimizers.NGOpt(parametrization=parametrization, budget=budget, num_workers=workers)


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


def _tracker(experiment: str, tracking_uri: str | None, project_dir: str, artifact_root: str | None):
    from tasks.tracking import Tracker

    return Tracker(experiment, tracking_uri=tracking_uri, artifact_root=artifact_root,
                   project_dir=Path(project_dir))


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


# ---- the merge pipeline's preparation step (flows/preparation.py) ---------------------------------

SEARCH_FILE = "search.json"
SEARCH_POLICY = ArtifactCache(task="search_coefficients", kind="coefficient_search",
                              code=("flows.coefficient_search", "tasks.coefficient_search",
                                    "mergeflow.coefficient_search", "mergeflow.methods", "mergeflow.merging",
                                    "mergeflow.statistics", "mergeflow.evaluation", "mergeflow.zoo",
                                    "mergeflow.checkpoint"))


@task(name="search_coefficients", cache_policy=SEARCH_POLICY, persist_result=True)
def search_coefficients(store: str, zoo: ArtifactRef, base: CheckpointRef, models: dict[str, CheckpointRef],
                        method: str, hparams: dict[str, Any], tasks: list[str], settings: dict[str, Any],
                        batch_size: int, device: str, tracking: dict[str, Any] | None) -> ArtifactRef:
    """Run the search (the flow above, as a subflow) once per distinct setting; the chosen lams
    (one per model, in sorted task order) are in the returned ref's summary.

    `base` and `models` are the pipeline's fetched checkpoints: the flow reads the same zoo
    directories, and their content hashes put the checkpoints themselves into this task's key.
    `tracking` ({experiment, tracking_uri, artifact_root, project_dir}, or None for no MLflow)
    is in the key too, so the recorded run id always belongs to the current store."""
    slot = SEARCH_POLICY.slot(locals())
    if slot.done:
        return slot.done
    import json

    result = coefficient_search(zoo_dir=zoo.path, store=store, method=method, hparams=hparams, tasks=tasks,
                                budget=settings["budget"], lower=settings["lower"], upper=settings["upper"],
                                init=settings["init"], workers=settings["workers"], seed=settings["seed"],
                                eval_limit=settings["limit"], batch_size=batch_size, device=device,
                                track=tracking is not None, **(tracking or {}))
    if result["lams_by_task"].keys() != models.keys():
        raise ValueError(f"the search tuned {sorted(result['lams_by_task'])}, the merge has {sorted(models)}")
    with slot.writer(SEARCH_FILE) as out:
        out.main_path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        out.summary = {"lams": result["lams"], "lams_by_task": result["lams_by_task"],
                       "val_mean": result["val_mean"], "val_accuracy": result["val_accuracy"],
                       "objective_split": SEARCH_SPLIT, "budget": settings["budget"],
                       "evaluations": len(result["points"]), "run_id": result["run_id"]}
    return out.ref


def search_call(inputs, choice) -> dict[str, Any]:
    """The arguments of `search_coefficients` for one merge choice: the step and `search_tags`
    build them the same way, so the tags read exactly the artifact the step produced."""
    params, ev, search = inputs.params, inputs.params.evaluation, choice.search
    settings = {**search.model_dump(), "limit": search.limit or ev.limit}
    tracking = None
    if params.tracking.enabled:
        tracking = {"experiment": params.tracking.experiment, "tracking_uri": params.tracking_uri(),
                    "artifact_root": str(params.artifact_root()), "project_dir": params.project}
    return {"store": inputs.store, "zoo": inputs.zoo, "base": inputs.base, "models": dict(inputs.models),
            "method": choice.method, "hparams": choice.hparams(), "tasks": list(inputs.tasks),
            "settings": settings, "batch_size": ev.batch_size, "device": inputs.device, "tracking": tracking}


def prepare_search(inputs, choice) -> dict[str, Any]:
    """The preparation step: search (cached), then merge with `lam` = the chosen per-task list."""
    ref = search_coefficients(**search_call(inputs, choice))
    return {"lam": ref.summary["lams"]}


def search_tags(inputs, choice) -> dict[str, str]:
    """MLflow tags for the merge made from a search's lams (read from the cached artifact)."""
    import json

    ref = SEARCH_POLICY.slot(search_call(inputs, choice)).done
    if ref is None:
        return {}
    s = ref.summary
    return {"mergeflow.lam_source": "search", "mergeflow.search.lams": json.dumps(s["lams"]),
            "mergeflow.search.lams_by_task": json.dumps(s["lams_by_task"], sort_keys=True),
            "mergeflow.search.budget": str(s["budget"]), "mergeflow.search.val_mean": str(s["val_mean"]),
            "mergeflow.search.objective_split": s["objective_split"],
            "mergeflow.search.run_id": str(s["run_id"]), "mergeflow.search.artifact": ref.path}
