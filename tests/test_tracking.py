"""MLflow tracking in a temporary sqlite store: log runs, read them back with MLflow's own API."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from tasks.tracking import CHART_FILE, REPORT_FILE, Tracker, flatten, log_merge_run  # noqa: E402

ACC = {"mnist": 0.80, "fashion_mnist": 0.60}
EXPERT = {"mnist": 0.98, "fashion_mnist": 0.90}
PRETRAINED = {"mnist": 0.50, "fashion_mnist": 0.40}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git project with a dvc.lock, as `mergeflow run` sees it under `dvc repro`."""
    root = tmp_path_factory.mktemp("project")
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "dvc.lock"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    return root


@pytest.fixture(scope="module")
def tracker(project, monkeypatch_module) -> Tracker:
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Tracker("test-merges", project_dir=project)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_merge_run_records_metrics_params_tags_and_artifacts(tracker, project):
    run_id = tracker.log_merge_run(
        method="task_arithmetic", hyperparams={"lam": 0.3},
        accuracy=ACC, expert_accuracy=EXPERT, pretrained_accuracy=PRETRAINED,
        params={"zoo": {"dir": "outputs/zoo", "spec": {}}, "evaluation": {"split": "test", "tasks": None},
                "compare": [{"method": "average"}]},
        input_hashes={"pretrained": "a" * 64, "expert/mnist": "b" * 64}, output_hash="c" * 64,
    )
    # The embedded defaults: a sqlite file and an artifact folder inside the project, not the cwd.
    assert tracker.tracking_uri == f"sqlite:///{project / 'mlflow.db'}"
    assert (project / "mlflow.db").is_file()

    client = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri)
    experiment = client.get_experiment_by_name("test-merges")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "task_arithmetic(lam=0.3)"
    m = run.data.metrics
    assert m["accuracy/mnist"] == 0.80 and m["accuracy_avg"] == pytest.approx(0.70)
    assert m["normalized_accuracy/mnist"] == pytest.approx(0.80 / 0.98)
    assert m["normalized_accuracy_avg"] == pytest.approx((0.80 / 0.98 + 0.60 / 0.90) / 2)
    assert m["expert_accuracy/fashion_mnist"] == 0.90 and m["pretrained_accuracy_avg"] == pytest.approx(0.45)
    p = run.data.params
    assert p["method"] == "task_arithmetic" and p["hparams.lam"] == "0.3"
    assert p["zoo.dir"] == "outputs/zoo" and p["zoo.spec"] == "{}"
    assert p["evaluation.split"] == "test" and p["evaluation.tasks"] == "null"
    assert json.loads(p["compare"]) == [{"method": "average"}]
    t = run.data.tags
    head = subprocess.run(["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert t["mergeflow.git_commit"] == head and t["mergeflow.git_dirty"] == "False"
    import hashlib

    assert t["mergeflow.dvc_lock_hash"] == hashlib.sha256((project / "dvc.lock").read_bytes()).hexdigest()
    assert t["mergeflow.input_hash.expert/mnist"] == "b" * 64 and t["mergeflow.output_hash"] == "c" * 64
    assert t["mergeflow.version"] and t["mergeflow.method"] == "task_arithmetic"

    assert {a.path for a in client.list_artifacts(run_id)} == {CHART_FILE, REPORT_FILE}
    assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
    chart = Path(client.download_artifacts(run_id, CHART_FILE, str(project / "dl")))
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    report = json.loads(Path(client.download_artifacts(run_id, REPORT_FILE, str(project / "dl"))).read_text())
    assert report["method"] == "task_arithmetic" and report["metrics"]["accuracy/mnist"] == 0.80


def test_under_dvc_the_stage_and_the_experiment_are_tagged(project, monkeypatch):
    from tasks.tracking import lineage_tags

    for variable in ("DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(variable, raising=False)
    assert not any(k.startswith("mergeflow.dvc_stage") or "dvc_exp" in k for k in lineage_tags(project))
    monkeypatch.setenv("DVC_STAGE", "merge")
    monkeypatch.setenv("DVC_EXP_NAME", "civil-holy")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abc")
    tags = lineage_tags(project)
    assert (tags["mergeflow.dvc_stage"], tags["mergeflow.dvc_exp_name"], tags["mergeflow.dvc_exp_baseline_rev"]) == (
        "merge", "civil-holy", "0123abc")


def test_sweep_child_runs_nest_under_a_parent(tracker):
    with tracker.parent_run("sweep task_arithmetic", params={"grid": {"lam": [0.1, 0.5]}}) as parent:
        children = [tracker.log_merge_run(method="task_arithmetic", hyperparams={"lam": lam},
                                          accuracy={"mnist": lam}, parent_run_id=parent)
                    for lam in (0.1, 0.5)]
    client = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri)
    found = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in found) == sorted(children)
    assert client.get_run(parent).data.params["grid.lam"] == "[0.1, 0.5]"
    assert client.get_run(parent).info.status == "FINISHED"


def test_failed_body_marks_the_run_failed(tracker):
    with pytest.raises(RuntimeError), tracker.parent_run("doomed") as run_id:
        raise RuntimeError("boom")
    assert mlflow.MlflowClient(tracking_uri=tracker.tracking_uri).get_run(run_id).info.status == "FAILED"


def test_env_tracking_uri_wins_over_the_default(tracker, tmp_path, monkeypatch):
    # The env var points at the module's store (a fresh sqlite store costs seconds to create).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    run_id = log_merge_run(experiment="env", project_dir=tmp_path, method="average",
                           hyperparams={}, accuracy={"digits": 0.5})
    assert not (tmp_path / "mlflow.db").exists()
    run = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri).get_run(run_id)
    assert run.data.metrics["accuracy/digits"] == 0.5 and run.info.run_name == "average"


def test_flatten_and_empty_accuracy():
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1, 2], "e": "x"}) == {"a.b": "1", "a.c": "{}", "d": "[1, 2]", "e": "x"}
    with pytest.raises(ValueError, match="at least one task"):
        Tracker.log_merge_run(None, method="x", hyperparams={}, accuracy={})
