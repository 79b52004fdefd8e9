"""The merge pipeline end to end on a reduced zoo, under the session's Prefect test API.

One project (tiny zoo, tracking into a temp sqlite store) is run several times:
first run computes everything; a second run reports every task Cached; deleting an artifact
recomputes exactly that task; changing `merge.lam` re-runs only what depends on it.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest

from flows.params import Params, validate_params
from mergeflow.zoo import ZooSpec

# Tiny and quick: the pipeline's mechanics are under test here, not the zoo's accuracy.
TINY = ZooSpec.tiny(pretrain_steps=6, probe_steps=6, finetune_steps=6, train_size=128,
                    pretrain_images_per_source=128, eval_limit=64).to_json()


def _params(project: Path, **merge) -> Params:
    raw = {
        "zoo": {"spec": TINY},
        "merge": {"method": "task_arithmetic", "lam": 0.3, **merge},
        "compare": [{"method": "average"}, {"method": "task_arithmetic"}],
        "evaluation": {"split": "test", "batch_size": 64, "limit": 64},
        "device": "cpu",
    }
    return validate_params(raw, project=project)


def _run(params: Params, expected: int = 14) -> tuple[dict, dict[str, list[str]]]:
    """Run the flow; return its report and {task name: [state names of its runs]}.

    `expected` task runs: zoo 1, fetch 3, task vectors 1, merges 2, evaluations 1 + 2 + 2,
    MLflow records 2 (one more merge, evaluation and record per extra method)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.merge import merge_pipeline

    state = merge_pipeline(params, return_state=True)
    report = state.result()
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        # The API records task runs and their states from events, asynchronously (slower on a
        # loaded machine): wait until every run is final and the set has stopped growing.
        previous, deadline = None, time.monotonic() + 60
        while time.monotonic() < deadline:
            runs = client.read_task_runs(flow_run_filter=flow_runs)
            current = sorted((str(r.id), r.state.name if r.state else "") for r in runs)
            if (len(runs) >= expected and current == previous
                    and all(r.state is not None and r.state.is_final() for r in runs)):
                break
            previous = current
            time.sleep(0.5)
    states: dict[str, list[str]] = {}
    for run in runs:
        # run names: "<task>-<3 hex>", or "fetch <ref>" for fetch_checkpoint
        task = run.name.split(" ")[0].rsplit("-", 1)[0] if " " not in run.name else run.name.split(" ")[0]
        states.setdefault(task, []).append(run.state.name)
    return report, states


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_api):
    project = tmp_path_factory.mktemp("project")
    params = _params(project)
    first, first_states = _run(params)
    return project, params, first, first_states


def test_first_run_computes_every_step_and_writes_the_outputs(project):
    root, params, report, states = project
    assert all(s == "Completed" for names in states.values() for s in names), states
    assert len(states["merge"]) == 2 and len(states["evaluate"]) == 1 + 2 + 2  # pretrained, experts, merges
    assert [m["label"] for m in report["merges"]] == ["task_arithmetic(lam=0.3)", "average"]
    tasks = report["tasks"]
    assert tasks == ["digits", "mnist_rot90"]
    assert report["experts"]["normalized_average"] == pytest.approx(1.0)

    merged = root / "outputs" / "merged"
    assert (merged / "model.safetensors").is_file()
    # The manifest's recipe is the merge: `mergeflow merge` on it gives the same bytes.
    from mergeflow.engine import merge_checkpoints
    from mergeflow.recipe import parse_recipe

    manifest = json.loads((merged / "mergeflow_manifest.json").read_text())
    recipe = parse_recipe(manifest["recipe"])
    again = merge_checkpoints(recipe.method, recipe.base, recipe.models, root / "again", recipe.hyperparameters,
                              progress=False)
    assert again.output_hash == manifest["output_hash"]
    zoo = root / "outputs" / "zoo"
    assert (zoo / "zoo.json").is_file() and (zoo / "experts" / "digits").is_dir()
    metrics = json.loads((root / "outputs" / "metrics.json").read_text())
    assert metrics["method"] == "task_arithmetic(lam=0.3)"
    assert metrics["per_task"] == report["merges"][0]["accuracy"]
    rows = list(csv.DictReader((root / "outputs" / "per_task.csv").open()))
    assert {r["model"] for r in rows} == {"pretrained", "experts", "task_arithmetic(lam=0.3)", "average"}
    assert len(rows) == 4 * len(tasks) and set(rows[0]) == {"task", "model", "accuracy"}


def test_each_merge_is_recorded_once_in_mlflow(project):
    root, params, report, _ = project
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=params.tracking_uri())
    exp = client.get_experiment_by_name(params.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["average", "task_arithmetic(lam=0.3)"]
    ta = next(r for r in runs if r.info.run_name.startswith("task_arithmetic"))
    expected = report["merges"][0]["accuracy"]
    assert ta.data.metrics["accuracy/digits"] == pytest.approx(expected["digits"])
    assert ta.data.tags["mergeflow.output_hash"] == report["merges"][0]["output_hash"]


def test_second_run_is_all_cached_and_identical(project):
    root, params, first, _ = project
    report, states = _run(params)
    assert report == first
    not_cached = {t: s for t, s in states.items() if any(x != "Cached" for x in s)}
    assert not not_cached, not_cached


def test_deleted_artifact_is_recomputed_not_returned_dangling(project):
    root, params, first, _ = project
    merged = root / ".artifacts" / "merged"
    victim = next(d for d in merged.iterdir()
                  if json.loads((d / "manifest.json").read_text())["summary"]["method"] == "average")
    shutil.rmtree(victim)
    report, states = _run(params)
    assert report == first
    assert sorted(states["merge"]) == ["Cached", "Completed"]  # only the deleted one ran
    assert (victim / "model" / "model.safetensors").is_file()
    assert all(s == "Cached" for s in states["evaluate"]) and all(s == "Cached" for s in states["build_zoo"])
    _, states = _run(params)  # and afterwards it is a plain cache hit again
    assert all(s == "Cached" for names in states.values() for s in names), states


def test_changing_lam_reruns_only_what_depends_on_it(project):
    root, params, first, _ = project
    report, states = _run(_params(root, lam=0.5), expected=17)
    assert [m["label"] for m in report["merges"]] == ["task_arithmetic(lam=0.5)", "average",
                                                     "task_arithmetic(lam=0.3)"]
    assert sorted(states["merge"]) == ["Cached", "Cached", "Completed"]
    assert sorted(states["evaluate"]).count("Completed") == 1
    assert all(s == "Cached" for s in states["build_zoo"] + states["extract_task_vectors"])
    metrics = json.loads((root / "outputs" / "metrics.json").read_text())
    assert metrics["method"] == "task_arithmetic(lam=0.5)"


def test_sweep_chooses_on_validation_and_logs_every_point(project):
    root, params, _, _ = project
    from mlflow import MlflowClient

    from flows.merge import evaluate, gather_inputs
    from flows.sweep import run_sweep

    sweep_params = params.model_copy(update={"sweep": params.sweep.model_copy(
        update={"grid": {"task_arithmetic": {"lam": [0.3, 1.0, 0.05]}}, "workers": 2})})
    result = run_sweep(sweep_params)
    r = result["methods"]["task_arithmetic"]
    assert [p["label"] for p in r["points"]] == [
        "task_arithmetic(lam=0.3)", "task_arithmetic(lam=1.0)", "task_arithmetic(lam=0.05)"]
    best = max(r["points"], key=lambda p: p["val_average"])
    assert r["chosen"] == best["label"]

    # The points were scored on the validation split, the chosen one reported on test.
    from prefect import flow

    @flow
    def check():
        inputs = gather_inputs(params)
        chosen = next(p for p in r["points"] if p["label"] == r["chosen"])
        ref = type("Ref", (), chosen["merged"])  # path + content_hash: all evaluate needs
        return (evaluate(inputs, ref, inputs.tasks, "val"), evaluate(inputs, ref, inputs.tasks, "test"))

    val, test = check()
    assert val == best["val"] and test == r["test"]

    client = MlflowClient(tracking_uri=params.tracking_uri())
    exp = client.get_experiment_by_name(params.tracking.experiment)
    parents = client.search_runs([exp.experiment_id], "attributes.run_name = 'sweep task_arithmetic'")
    assert len(parents) == 1 and parents[0].data.params["sweep.chosen"] == r["chosen"]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(children) == 3
    assert sum(c.data.tags["mergeflow.sweep.chosen"] == "True" for c in children) == 1

    # The chosen merge is registered and, as the only candidate, holds the champion alias.
    from tasks.registry import CHAMPION, MODEL_NAME

    champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    chosen_run = next(c for c in children if c.data.tags["mergeflow.sweep.chosen"] == "True")
    assert champion.run_id == chosen_run.info.run_id
