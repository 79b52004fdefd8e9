"""Real servers on loopback ports for the integration tests, stopped on every exit path.

Each server runs in its own process group (start_new_session), so stopping it also stops the
children it spawned (uvicorn workers, flow-run subprocesses of a worker).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Processes:
    """Every process a test starts; `stop_all` ends their whole process groups."""

    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: list = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # closed by stop_all
        self.logs.append(log)
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # the group may outlive its leader
            proc.wait()
        for log in self.logs:
            log.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_http_ok(url: str, proc: subprocess.Popen, procs: Processes, name: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.log(name)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{name} not healthy at {url} after {STARTUP_TIMEOUT_S}s:\n{procs.log(name)}")


@dataclass
class Servers:
    prefect_api: str
    mlflow_uri: str
    env: dict[str, str]  # the environment every client command of the test uses
    procs: Processes
    tmp: Path


def start_servers(tmp: Path, procs: Processes) -> Servers:
    """Start prefect server and mlflow server; return once both answer their health checks."""
    prefect_port, mlflow_port = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base.update({
        "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
    })
    prefect_env = base | {
        "PREFECT_HOME": str(tmp / "prefect-server-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        # Fire schedules of new deployments promptly.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
    }
    mlflow_env = base | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    prefect = procs.start("prefect-server", [
        str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
        "--port", str(prefect_port)], prefect_env, cwd=tmp)
    mlflow = procs.start("mlflow-server", [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
        "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--artifacts-destination", str(tmp / "mlflow-artifacts"),
        "--workers", "1"], mlflow_env, cwd=tmp)
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    wait_http_ok(f"{prefect_api}/health", prefect, procs, "prefect-server")
    wait_http_ok(f"{mlflow_uri}/health", mlflow, procs, "mlflow-server")
    client_env = base | {
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(tmp / "prefect-client-home"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "10",
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MERGEFLOW_ROOT": str(REPO),
    }
    return Servers(prefect_api, mlflow_uri, client_env, procs, tmp)


# A zoo small enough to build in seconds: two tasks, a one-block ViT, a few training steps.
TINY_PARAMS = {
    "zoo": {"dir": "outputs/zoo", "spec": {
        "tasks": ["digits", "mnist"], "pretrain_sources": ["digits"],
        "pretrain_images_per_source": 256, "pretrain_steps": 3, "probe_steps": 3,
        "finetune_steps": 3, "train_size": 256, "batch_size": 64, "eval_limit": 128,
        "vit": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}}},
    "merge": {"method": "task_arithmetic", "lam": 0.3},
    "compare": [],
    "evaluation": {"split": "val", "batch_size": 256, "limit": 128},
    "device": "cpu",
    "tracking": {"experiment": "mergeflow-integration"},
}


def tiny_project(project: Path, **sections: object) -> Path:
    """A project folder holding only params.yaml (TINY_PARAMS, sections replaced); outputs and
    artifacts land beside it. Returns the params file."""
    project.mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump({**TINY_PARAMS, **sections}, sort_keys=False))
    return project / "params.yaml"


def seed_store(zoo_store: Path, params_file: Path) -> None:
    """Copy the tiny zoo into the artifact store of the project of `params_file`."""
    shutil.copytree(zoo_store / "zoo", params_file.parent / TINY_PARAMS.get("artifacts", ".artifacts") / "zoo")
