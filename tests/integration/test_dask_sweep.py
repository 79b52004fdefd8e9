"""A sweep over methods and hyperparameters on a local Dask cluster of 2 worker processes,
with prefect-dask's DaskTaskRunner, gives the same merged models as the sequential run.

flows/ has no sweep flow yet (`flows/sweep.py`, B1), so the sweep here is the smallest honest
one: the real `merge_models` task (cache keys, artifact store, streaming engine) submitted once
per grid point; only the task runner differs between the two runs. Each run writes to its own
artifact store so nothing is a cache hit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bad_inputs import corpus
from live_servers import Servers

from mergeflow.checkpoint import load_state_dict

pytestmark = pytest.mark.integration

GRID = [
    ("average", {}),
    ("task_arithmetic", {"lam": 0.3}),
    ("task_arithmetic", {"lam": 1.0}),
    ("ties", {"k": 0.2, "lam": 1.0}),
    ("ties", {"k": 0.5, "lam": 0.7}),
    ("dare_ties", {"p": 0.5, "lam": 1.0, "seed": 3}),
]


def _sweep_flow():
    from prefect import flow

    from tasks.merge import merge_models

    @flow(name="dask-sweep-check")
    def sweep(store: str, base, models: list) -> dict[str, str]:
        futures = {f"{m}{sorted(hp.items())}": merge_models.submit(store, m, hp, base, models, {}, "cpu")
                   for m, hp in GRID}
        return {label: f.result().path for label, f in futures.items()}

    return sweep


def test_sweep_on_two_dask_workers_matches_sequential(servers: Servers, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster, get_task_stream
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from mergeflow.sources import resolve_checkpoint

    root = tmp_path / "models"
    base_dir, model_dirs = corpus.family(root, n_models=3)
    base = resolve_checkpoint(str(base_dir))
    models = [resolve_checkpoint(str(d)) for d in model_dirs]
    sweep = _sweep_flow()

    with temporary_settings({PREFECT_API_URL: servers.prefect_api, PREFECT_HOME: tmp_path / "ph"}):
        sequential = sweep.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(
            str(tmp_path / "store-seq"), base, models)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          host="127.0.0.1") as cluster, Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            with get_task_stream(client) as stream:
                distributed = sweep.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(
                    str(tmp_path / "store-dask"), base, models)
            workers = {t["worker"] for t in stream.data}

    assert len(workers) == 2, f"the sweep ran on {workers}, not on both workers"
    assert sequential.keys() == distributed.keys() and len(sequential) == len(GRID)
    for label in sequential:
        assert sequential[label] != distributed[label]  # two separate stores: both computed
        a, b = load_state_dict(sequential[label]), load_state_dict(distributed[label])
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{label}: {name} differs between runners"
