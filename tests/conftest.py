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
# Nor the user's cache of checkpoint content hashes (~/.cache/mergeflow/hashes): every test's
# temp checkpoints would add entries there.
os.environ["MERGEFLOW_HASH_CACHE"] = tempfile.mkdtemp(prefix="mergeflow-hash-cache-")
atexit.register(shutil.rmtree, os.environ["MERGEFLOW_HASH_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (sqlite, ephemeral server) for the whole session: it costs about
    14 s to start, so tests that run flows share it instead of starting their own."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture(autouse=True, scope="session")
def compiled_kernels():
    """Compile (or load) the fused CPU kernels once, before the first test.

    A fresh clone has no numba cache: the first merge compiles the kernels (~20 s of CPU here)
    on a background thread while the torch code serves. During the tests that background work
    slowed timing-sensitive ones (a flow killed mid-merge finished before the kill) on CI's
    fresh clones; done first, every test sees the same, loaded kernels."""
    import itertools

    from mergeflow import kernels

    pairs = set(itertools.product(kernels.STORAGE_DTYPES, repeat=2))
    kernels.prepare(pairs)
    for pair in pairs:
        kernels.wait_ready(*pair, timeout=600)
