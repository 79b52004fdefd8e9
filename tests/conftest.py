"""Test-wide settings: offline, quiet, and every piece of run state inside a temp dir."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Set before anything imports prefect/mlflow/huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never touch the project's .prefect/: Prefect's home (settings, result store) is a temp dir.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="mergeflow-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (sqlite, ephemeral server) for the whole session: it costs about
    14 s to start, so tests that run flows share it instead of starting their own."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield
