"""Static checks of infra/: the files parse and agree with each other and with the code.

What cannot run here (no image pulls, no Kubernetes cluster) is checked structurally: the
compose services wire up, the Kubernetes GPU job template renders to a Job requesting
nvidia.com/gpu, and every deployment entrypoint is a flow that exists. The servers themselves
run for real in tests/integration/test_servers.py.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
REPO = INFRA.parent


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


@pytest.fixture(scope="module")
def gpu_template() -> dict:
    return json.loads((INFRA / "k8s-gpu-base-job-template.json").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _flow_functions(path: Path) -> set[str]:
    """Names of functions decorated with @flow(...) in a source file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if getattr(target, "id", None) == "flow":
                    names.add(node.name)
    return names


def test_deployments_point_at_existing_flows(prefect_yaml: dict) -> None:
    names = [d["name"] for d in prefect_yaml["deployments"]]
    assert {"merge-on-demand", "merge-nightly", "sweep-gpu"} <= set(names)
    assert len(names) == len(set(names))
    for dep in prefect_yaml["deployments"]:
        path, _, fn = dep["entrypoint"].partition(":")
        assert fn in _flow_functions(REPO / path), f"{dep['name']}: no @flow {fn} in {path}"
        assert set(dep.get("parameters", {})) <= {"params_path", "overrides"}


def test_wrapped_pipeline_flows_exist() -> None:
    """The deployment flows call these; a rename in flows/ must fail here, not at 03:00."""
    source = (INFRA / "deployment_flows.py").read_text()
    for module, fn in re.findall(r"from flows\.(\w+) import (\w+)", source):
        if module in ("cli", "params"):
            continue
        assert fn in _flow_functions(REPO / "flows" / f"{module}.py"), f"flows/{module}.py lacks @flow {fn}"


def test_cron_schedule_is_valid(prefect_yaml: dict) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    nightly = next(d for d in prefect_yaml["deployments"] if d["name"] == "merge-nightly")
    (schedule,) = nightly["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises if invalid
    assert schedule["active"] is True


def test_pools_and_pull_step(prefect_yaml: dict) -> None:
    pools = {d["name"]: d["work_pool"]["name"] for d in prefect_yaml["deployments"]}
    assert pools["merge-on-demand"] == pools["merge-nightly"] == "mergeflow-local"
    assert pools["sweep-gpu"] == "mergeflow-gpu"
    (step,) = prefect_yaml["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $MERGEFLOW_ROOT }}"


def test_gpu_template_placeholders_are_declared(gpu_template: dict) -> None:
    text = json.dumps(gpu_template["job_configuration"])
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))
    declared = set(gpu_template["variables"]["properties"])
    assert used <= declared, f"undeclared variables: {used - declared}"


def test_gpu_template_renders_a_gpu_job(gpu_template: dict) -> None:
    from prefect.utilities.templating import apply_values

    props = gpu_template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v} | {"name": "merge", "command": "x"}
    job = apply_values(gpu_template["job_configuration"], values)
    manifest = job["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("mergeflow-runner:latest")
    assert {"MLFLOW_TRACKING_URI", "DVC_REMOTE_URL", "AWS_ENDPOINT_URL_S3", "MERGEFLOW_ROOT"} <= set(container["env"])
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["restartPolicy"] == "Never"


def test_compose_services_wire_up(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "minio", "minio-buckets"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        assert "image" in svc or "build" in svc, name
    host_ports = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), host_ports
    prefect_env = services["prefect-server"]["environment"]
    assert prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in mlflow_cmd
    assert "--artifacts-destination=s3://mergeflow-mlflow" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # the DVC remote bucket is created beside MLflow's
    assert "store/mergeflow-dvc" in " ".join(services["minio-buckets"]["command"])


def test_compose_variables_have_example_values(compose: dict) -> None:
    text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used <= set(example), f"missing from .env.example: {used - set(example)}"


def test_dockerfile_copies_existing_files_and_uses_cuda_index() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu" in text
    for line in re.findall(r"^COPY (.+) \./?$", text, re.M):
        for src in line.split():
            assert src == "." or (REPO / src).exists(), src
