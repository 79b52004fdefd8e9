"""Deployments on real servers: prefect server + mlflow server on loopback, a process worker.

Deploys the real merge pipeline from infra/prefect.yaml (pointed at a tiny zoo's params file),
triggers the on-demand deployment and lets the cron deployment fire on its own (its schedule
is set to every minute at deploy time with --cron), then checks that both flow runs COMPLETED
and that each recorded its merge run on the MLflow tracking server; then registers both merged
models in the server's model registry and gives the best on validation the alias `champion`.
Also registers the GPU work pool from infra/k8s-gpu-base-job-template.json (the server
validates the template). Every process started is stopped by the `servers` fixture.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from live_servers import BIN, REPO, TINY_PARAMS, Servers, seed_store, tiny_project

pytestmark = pytest.mark.integration

PREFECT_YAML = REPO / "infra" / "prefect.yaml"
GPU_TEMPLATE = REPO / "infra" / "k8s-gpu-base-job-template.json"
RUN_TIMEOUT_S = 180  # a run on the seeded zoo: about 40 s on a loaded 2-core machine
CRON_TIMEOUT_S = 180  # next minute boundary (<= 60 s) plus a run that hits the caches



def prefect_cli(servers: Servers, *args: str, timeout: float = 120) -> str:
    out = subprocess.run([str(BIN / "prefect"), *args], env=servers.env, cwd=REPO,
                         capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def api(servers: Servers, method: str, path: str, body: dict | None = None) -> object:
    # A loaded server on SQLite answers 503 when its database is busy: that is worth a retry.
    for _ in range(10):
        r = httpx.request(method, f"{servers.prefect_api}{path}", json=body, timeout=30)
        if r.status_code != 503:
            break
        time.sleep(2)
    assert r.is_success, f"{method} {path}: {r.status_code} {r.text}"
    return r.json()


def deployment_id(servers: Servers, name: str) -> str:
    found = api(servers, "POST", "/deployments/filter", {"deployments": {"name": {"any_": [name]}}})
    assert len(found) == 1, f"deployment {name!r} not on the server: {found}"
    return found[0]["id"]


def wait_terminal(servers: Servers, flow_run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api(servers, "GET", f"/flow_runs/{flow_run_id}")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout}s:\n"
                       f"{servers.procs.log('worker')}")


def wait_scheduled_run(servers: Servers, dep_id: str, timeout: float) -> dict:
    """The first run the scheduler created for a deployment, once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = api(servers, "POST", "/flow_runs/filter", {
            "flow_runs": {"deployment_id": {"any_": [dep_id]}},
            "sort": "EXPECTED_START_TIME_ASC"})
        auto = [r for r in runs if r["auto_scheduled"]]
        if auto and auto[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return auto[0]
        time.sleep(2)
    raise TimeoutError(f"no finished scheduled run of {dep_id} after {timeout}s:\n"
                       f"{servers.procs.log('worker')}")


def mlflow_runs_during(servers: Servers, flow_run: dict) -> list:
    """The finished MLflow runs of the integration experiment started during `flow_run`."""
    from datetime import datetime

    from mlflow.tracking import MlflowClient

    def ms(iso: str) -> int:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)

    client = MlflowClient(tracking_uri=servers.mlflow_uri)
    experiment = client.get_experiment_by_name(TINY_PARAMS["tracking"]["experiment"])
    assert experiment is not None, "the flow recorded nothing on the MLflow server"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    start, end = ms(flow_run["start_time"]), ms(flow_run["end_time"])
    return [r for r in runs if start <= r.info.start_time <= end and r.info.status == "FINISHED"]


def test_deployments_run_on_demand_and_on_cron(servers: Servers, tiny_zoo_store: Path) -> None:
    params_file = tiny_project(servers.tmp / "project")
    seed_store(tiny_zoo_store, params_file)  # the zoo is trained once per session
    params_path = str(params_file)
    # The nightly run merges with another lam: the pipeline records an identical merge in MLflow
    # only once (flows/merge.py, RecordedOnce), so a repeat of the on-demand merge would add no run.
    on_demand_params = json.dumps({"params_path": params_path})
    nightly_params = json.dumps({"params_path": params_path, "overrides": ["merge.lam=0.4"]})
    prefect_cli(servers, "work-pool", "create", "mergeflow-local", "--type", "process")
    # The GPU pool from the Kubernetes base job template: the server checks that every
    # placeholder in the job configuration is a declared variable.
    prefect_cli(servers, "work-pool", "create", "mergeflow-gpu", "--type", "kubernetes",
                "--base-job-template", str(GPU_TEMPLATE))
    prefect_cli(servers, "--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML),
                "-n", "merge-on-demand", "--params", on_demand_params)
    # The nightly cron of prefect.yaml, made to fire within a minute.
    prefect_cli(servers, "--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML),
                "-n", "merge-nightly", "--cron", "* * * * *", "--timezone", "UTC",
                "--params", nightly_params)
    on_demand, nightly = deployment_id(servers, "merge-on-demand"), deployment_id(servers, "merge-nightly")
    assert api(servers, "GET", f"/deployments/{nightly}")["schedules"][0]["schedule"]["cron"] == "* * * * *"

    servers.procs.start("worker", [str(BIN / "prefect"), "worker", "start", "--pool",
                                   "mergeflow-local", "--limit", "1"], servers.env)
    triggered = api(servers, "POST", f"/deployments/{on_demand}/create_flow_run", {})
    run = wait_terminal(servers, triggered["id"], RUN_TIMEOUT_S)
    assert run["state_type"] == "COMPLETED", f"{run['state']}\n{servers.procs.log('worker')}"

    scheduled = wait_scheduled_run(servers, nightly, CRON_TIMEOUT_S)
    assert scheduled["state_type"] == "COMPLETED", f"{scheduled['state']}\n{servers.procs.log('worker')}"

    merge_runs = []
    for flow_run, lam in ((run, "0.3"), (scheduled, "0.4")):
        recorded = mlflow_runs_during(servers, flow_run)
        assert [(r.data.tags.get("mergeflow.method"), r.data.params.get("hparams.lam"))
                for r in recorded] == [("task_arithmetic", lam)], recorded
        merge_runs += recorded

    register_and_promote(servers, params_file.parent / ".artifacts" / "merged", merge_runs)


def register_and_promote(servers: Servers, merged_store: Path, merge_runs: list) -> None:
    """Each merge's model becomes a registry version on the server; the best on val is champion."""
    from tasks.registry import VAL_ACCURACY_TAG, champion, promote_champion, register_merged_model

    model_by_hash = {}
    for artifact in merged_store.iterdir():
        manifest = json.loads((artifact / "manifest.json").read_text())
        model_by_hash[manifest["content_hash"]] = artifact / manifest["main"]
    versions = [register_merged_model(model_by_hash[r.data.tags["mergeflow.output_hash"]], r.info.run_id,
                                      tracking_uri=servers.mlflow_uri) for r in merge_runs]
    val = {str(v.version): float(v.tags[VAL_ACCURACY_TAG]) for v in versions}
    assert val == {str(i + 1): r.data.metrics["accuracy_avg"] for i, r in enumerate(merge_runs)}
    best = promote_champion(tracking_uri=servers.mlflow_uri)
    assert val[str(best.version)] == max(val.values())
    assert str(champion(tracking_uri=servers.mlflow_uri).version) == str(best.version)


def test_gpu_pool_template_renders_gpu_job(servers: Servers) -> None:
    """The pool stored on the server renders a Job requesting nvidia.com/gpu, with MLflow/DVC env."""
    from prefect.utilities.templating import apply_values

    pools = api(servers, "POST", "/work_pools/filter", {"work_pools": {"name": {"any_": ["mergeflow-gpu"]}}})
    if not pools:
        prefect_cli(servers, "work-pool", "create", "mergeflow-gpu", "--type", "kubernetes",
                    "--base-job-template", str(GPU_TEMPLATE))
        pools = api(servers, "POST", "/work_pools/filter", {"work_pools": {"name": {"any_": ["mergeflow-gpu"]}}})
    template = pools[0]["base_job_template"]
    assert template == json.loads(GPU_TEMPLATE.read_text())
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    job = apply_values(template["job_configuration"], defaults | {"gpu_count": 2, "name": "m"})
    container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["env"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert container["env"]["DVC_REMOTE_URL"].startswith("s3://")
