"""The `servers` fixture: real Prefect and MLflow servers, one pair for the integration session,
stopped even when a test fails."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_servers import Processes, Servers, start_servers, tiny_project

# Dask's workers spill into <tmp>/dask-scratch-space by default, and leave it there.
os.environ["DASK_TEMPORARY_DIRECTORY"] = tempfile.mkdtemp(prefix="mergeflow-dask-")
atexit.register(shutil.rmtree, os.environ["DASK_TEMPORARY_DIRECTORY"], ignore_errors=True)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("servers")
    procs = Processes(tmp)
    try:
        yield start_servers(tmp, procs)
    finally:
        procs.stop_all()


@pytest.fixture(scope="session")
def tiny_zoo_store(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact store holding the tiny zoo of TINY_PARAMS, built once by the real zoo flow.
    Tests copy its `zoo/` into their own store (live_servers.seed_store), where the zoo task finds it by
    its content address instead of training it again."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows.params import load_params
    from flows.zoo import zoo_flow

    project = tmp_path_factory.mktemp("zoo-project")
    params = load_params(tiny_project(project / "p"))
    with temporary_settings({PREFECT_API_URL: servers.prefect_api, PREFECT_HOME: project / "ph"}):
        zoo_flow(params)
    return params.path(params.artifacts)
