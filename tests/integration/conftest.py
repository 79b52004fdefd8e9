"""The `servers` fixture: real Prefect and MLflow servers, one pair for the integration session,
stopped even when a test fails."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_servers import Processes, Servers, start_servers


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("servers")
    procs = Processes(tmp)
    try:
        yield start_servers(tmp, procs)
    finally:
        procs.stop_all()
