"""AdaMerging's pipeline step: cached unlabelled draw and tuning, merge with the learned
coefficients, and the MLflow tuning run (entropy curve, heat map, accuracy, transductive tag)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_pipeline import TINY, _run

from flows.params import validate_params


def _params(project: Path, **merge):
    raw = {
        "zoo": {"spec": TINY},
        "merge": {"method": "adamerging", "steps": 3, "unlabelled_limit": 32, **merge},
        "compare": [],
        "evaluation": {"split": "test", "batch_size": 64, "limit": 64},
        "device": "cpu",
    }
    return validate_params(raw, project=project)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prefect_api):
    project = tmp_path_factory.mktemp("adamerging_project")
    params = _params(project)
    report, states = _run(params)
    return project, params, report, states


def test_first_run_tunes_then_merges_with_the_learned_coefficients(first_run):
    from mergeflow.adamerging import Coefficients
    from tasks.artifacts import ArtifactStore

    project, params, report, states = first_run
    assert states["draw_unlabelled"] == ["Completed"]
    assert states["tune_adamerging"] == ["Completed"]
    store = ArtifactStore(params.path(params.artifacts))
    [coef_dir] = [p for p in (store.root / "adamerging").iterdir()]
    coefs = Coefficients.load(coef_dir / "coefficients.safetensors")
    assert coefs.mode == "layer_wise" and coefs.metadata["config"]["steps"] == 3
    assert coefs.metadata["unlabelled"] == {"split": "test", "transductive": True,
                                            "count": {t: 32 for t in coefs.task_names}}
    [merge] = report["merges"]
    assert merge["method"] == "adamerging" and set(merge["accuracy"]) == set(coefs.task_names)
    coefficients = merge["prepared"]["coefficients"]  # the report names the tuned coefficients
    assert coefficients["path"] == str(coef_dir / "coefficients.safetensors")
    assert coefficients["content_hash"] == json.loads((coef_dir / "manifest.json").read_text())["content_hash"]


def test_tuning_run_in_mlflow(first_run):
    from mlflow import MlflowClient

    _, params, report, _ = first_run
    client = MlflowClient(params.tracking_uri())
    exp = client.get_experiment_by_name(params.tracking.experiment)
    [run] = client.search_runs([exp.experiment_id], "tags.`mergeflow.stage` = 'adamerging_tuning'")
    assert run.data.tags["mergeflow.transductive"] == "true"
    assert len(client.get_metric_history(run.info.run_id, "entropy_loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"coefficients_heatmap.png", "coefficients.safetensors"} <= artifacts
    accuracy = report["merges"][0]["accuracy"]
    assert run.data.metrics["accuracy/" + next(iter(accuracy))] == pytest.approx(next(iter(accuracy.values())))


def test_second_run_is_cached_and_a_new_setting_retunes_only(first_run):
    project, params, report, _ = first_run
    again, states = _run(params)
    assert states["draw_unlabelled"] == ["Cached"] and states["tune_adamerging"] == ["Cached"]
    assert all(s == "Cached" for s in states["merge"])
    assert again["merges"][0]["accuracy"] == report["merges"][0]["accuracy"]
    _, states = _run(_params(project, steps=4))
    assert states["draw_unlabelled"] == ["Cached"] and states["tune_adamerging"] == ["Completed"]
