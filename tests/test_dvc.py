"""The project's DVC pipeline, run by the real `dvc` CLI in a temporary git repo.

The repo gets the project's own params.yaml, plots template and dvc.yaml (same stages, params,
outs, metrics and plots); only each stage's `cmd` and code deps are swapped for a seconds-fast
stage script that uses the real library (`load_params`, `mergeflow.merge`, the checkpoint writer)
on a tiny random zoo, because the real commands pay minutes of training and Prefect start-up.
It writes exactly the files the real stages declare. What is checked is DVC's behaviour on the
project's declarations: repro, no-op repro, params-driven partial re-runs, `dvc exp run -S`, plots.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("dvc") is None and not (Path(sys.executable).parent / "dvc").exists(),
                                reason="dvc CLI not installed")

STAGE_SCRIPT = '''
"""Fast stand-ins for `mergeflow zoo` / `mergeflow run`: same params, same output files."""
import csv, json, sys
from pathlib import Path

import torch

import mergeflow
from flows.params import load_params
from mergeflow.checkpoint import load_state_dict
from mergeflow.checkpoint_writer import save_checkpoint

TASKS = ["alpha", "beta", "gamma"]
stage, params = sys.argv[1], load_params(sys.argv[2])

def state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}

if stage == "zoo":
    zoo = params.path(params.zoo.dir)
    base = state(0)
    save_checkpoint(base, zoo / "pretrained")
    for i, task in enumerate(TASKS, 1):
        save_checkpoint({k: v + 0.5 * state(i)[k] for k, v in base.items()}, zoo / "experts" / task)
else:
    zoo = params.path(params.zoo.dir)
    base = load_state_dict(zoo / "pretrained")
    experts = {t: load_state_dict(zoo / "experts" / t) for t in TASKS}
    out = params.outputs
    rows, merged_primary, primary_label = [], None, None
    def score(sd, task):  # a deterministic stand-in for accuracy, in [0, 1]
        d = sum(float((sd[k] - experts[task][k]).pow(2).sum()) for k in sd)
        return 1.0 / (1.0 + d)
    for name, sd in [("pretrained", base)] + [("experts", None)]:
        for t in TASKS:
            rows.append([t, name, score(experts[t] if sd is None else sd, t)])
    for choice in params.methods():
        merged = mergeflow.merge(choice.method, base, [experts[t] for t in TASKS], **choice.hparams())
        for t in TASKS:
            rows.append([t, choice.label, score(merged, t)])
        if merged_primary is None:
            merged_primary, primary_label = merged, choice.label
    save_checkpoint(merged_primary, params.path(out.merged))
    primary = {t: a for t, m, a in rows if m == primary_label}
    metrics = {"method": primary_label, "average": sum(primary.values()) / len(primary), "per_task": primary}
    params.path(out.metrics).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    params.path(out.report).write_text(json.dumps({"rows": rows}))
    with open(params.path(out.per_task), "w", newline="") as f:
        csv.writer(f, lineterminator="\\n").writerows([["task", "model", "accuracy"], *rows])
'''


def _dvc_bin() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def _run(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(PROJECT),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    cmd = [_dvc_bin(), *args[1:]] if args[0] == "dvc" else list(args)
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _ran(output: str) -> set[str]:
    return {stage for stage in ("zoo", "merge") if f"Running stage '{stage}'" in output}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("dvc-repo")
    shutil.copy(PROJECT / "params.yaml", repo / "params.yaml")
    (repo / "stages.py").write_text(STAGE_SCRIPT)
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    for name, stage in pipeline["stages"].items():
        stage["cmd"] = f"{sys.executable} stages.py {name} params.yaml"
        data_deps = [d for d in stage.get("deps", []) if str(d).startswith("outputs/")]
        stage["deps"] = ["stages.py", *data_deps]  # code deps of the real stage -> the script
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    _run(repo, "git", "init", "-q")
    _run(repo, "dvc", "init", "-q")
    shutil.copytree(PROJECT / ".dvc" / "plots", repo / ".dvc" / "plots")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "pipeline")
    return repo


def test_project_pipeline_declares_the_contract():
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    zoo, merge = pipeline["stages"]["zoo"], pipeline["stages"]["merge"]
    assert zoo["cmd"] == "mergeflow zoo params.yaml" and merge["cmd"] == "mergeflow run params.yaml"
    assert zoo["outs"] == [params["zoo"]["dir"]] and params["zoo"]["dir"] in merge["deps"]
    assert "merge" in merge["params"] and "merge" not in zoo["params"]
    assert params["outputs"]["merged"] in merge["outs"]
    assert merge["metrics"] == [params["outputs"]["metrics"]]  # cached: experiments' metrics live in DVC's cache
    assert list(merge["plots"][0]) == [params["outputs"]["per_task"]]


def test_repro_then_noop_then_partial_rerun_then_experiment_then_plots(repo):
    # 1. First repro runs both stages and produces every declared output.
    assert _ran(_run(repo, "dvc", "repro")) == {"zoo", "merge"}
    for out in ("outputs/zoo/pretrained", "outputs/merged/model.safetensors", "outputs/metrics.json",
                "outputs/per_task.csv", "dvc.lock"):
        assert (repo / out).exists(), out
    first = json.loads((repo / "outputs/metrics.json").read_text())
    assert first["method"].startswith("task_arithmetic")

    # 2. Nothing changed: a second repro runs nothing.
    assert _ran(_run(repo, "dvc", "repro")) == set()
    assert "up to date" in _run(repo, "dvc", "status")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "first run")

    # 3. merge.lam changed: only the merge stage re-runs, with a different result.
    params = (repo / "params.yaml").read_text()
    assert "lam: 0.3" in params
    (repo / "params.yaml").write_text(params.replace("lam: 0.3", "lam: 0.6", 1))
    assert _ran(_run(repo, "dvc", "repro")) == {"merge"}
    second = json.loads((repo / "outputs/metrics.json").read_text())
    assert second["method"] == "task_arithmetic(lam=0.6)" and second["average"] != first["average"]
    _run(repo, "git", "commit", "-q", "-am", "lam 0.6")

    # 4. An experiment with another method, from the command line.
    assert _ran(_run(repo, "dvc", "exp", "run", "-S", "merge.method=average")) == {"merge"}
    assert json.loads((repo / "outputs/metrics.json").read_text())["method"] == "average"
    [experiment] = [rev for e in _experiments(repo) for rev in e["revs"]]
    metrics = experiment["data"]["metrics"]["outputs/metrics.json"]["data"]  # from DVC's cache
    assert metrics["method"] == "average" and metrics["average"] != second["average"]

    # 5. The per-task plot renders as HTML with the project's template (bars coloured by model).
    _run(repo, "dvc", "plots", "show", "-o", "plots_html")
    html = (repo / "plots_html" / "index.html").read_text()
    assert "Per-task accuracy" in html and '"field": "step"' not in html  # ours, not the line default
    assert '"field": "model"' in html and "alpha" in html and "pretrained" in html


def _experiments(repo: Path) -> list[dict]:
    out = subprocess.run([_dvc_bin(), "exp", "show", "--json"], cwd=repo, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert out.returncode == 0, out.stderr
    return [e for baseline in json.loads(out.stdout) for e in baseline.get("experiments") or []]
