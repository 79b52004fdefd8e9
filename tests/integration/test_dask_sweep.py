"""The sweep flow (flows/sweep.py) on a local Dask cluster of 2 worker processes, through
prefect-dask's DaskTaskRunner, chooses the same settings and produces the same merged models
and accuracies as the sequential run.

The two runs use separate projects and artifact stores, so every merge and evaluation is
computed by both. Only the zoo is shared (the session's tiny zoo, copied into each store, where
the zoo task finds it by its content address): training it again checks nothing about runners.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from live_servers import Servers, seed_store, tiny_project

pytestmark = pytest.mark.integration

GRID = {
    "task_arithmetic": {"lam": [0.3, 1.0]},
    "ties": {"k": [0.2, 0.5], "lam": [1.0]},
    "average": {},
}


def _summary(result: dict) -> dict:
    """What must not depend on the task runner: choices, merged bytes, accuracies."""
    return {m: {"chosen": r["chosen"], "test": r["test"],
                "points": [(p["label"], p["merged"]["content_hash"], p["val"]) for p in r["points"]]}
            for m, r in result["methods"].items()}


def test_sweep_on_two_dask_workers_matches_sequential(servers: Servers, tiny_zoo_store: Path,
                                                     tmp_path: Path) -> None:
    from distributed import Client, LocalCluster, get_task_stream
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.params import load_params
    from flows.sweep import sweep_flow

    sections = {"sweep": {"workers": 2, "grid": GRID}, "tracking": {"enabled": False}}
    seq_file, dask_file = (tiny_project(tmp_path / name, **sections) for name in ("sequential", "dask"))
    for params_file in (seq_file, dask_file):
        seed_store(tiny_zoo_store, params_file)
    seq_params, dask_params = load_params(seq_file), load_params(dask_file)

    with temporary_settings({PREFECT_API_URL: servers.prefect_api, PREFECT_HOME: tmp_path / "ph"}):
        sequential = sweep_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(seq_params)
        dask_store = dask_params.path(dask_params.artifacts)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          host="127.0.0.1") as cluster, Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            with get_task_stream(client) as stream:
                distributed = sweep_flow.with_options(
                    task_runner=DaskTaskRunner(address=cluster.scheduler_address))(dask_params)
            workers = {t["worker"] for t in stream.data}

    assert len(workers) == 2, f"the sweep ran on {workers}, not on both Dask workers"
    assert sorted(p.name for p in (dask_store / "merged").iterdir()), "the Dask run merged nothing"
    assert _summary(distributed) == _summary(sequential)
    n_points = sum(len(r["points"]) for r in sequential["methods"].values())
    assert n_points == 2 + 2 + 1
