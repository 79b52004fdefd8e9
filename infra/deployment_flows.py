"""Deployment entrypoints: the pipeline flows, fed from a params file on the worker.

`flows.merge.merge_pipeline` takes a validated `Params` object. A deployment (and its cron
schedule) should instead run whatever params.yaml the checkout holds *when the run starts*,
validated there, so these thin flows read the file on the worker and call the pipeline flow
as a subflow. Relative paths resolve against the params file's folder, as with `mergeflow run`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.cli import setup_environment
from flows.params import load_params


@flow(name="merge-from-params", log_prints=True)
def merge_from_params(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """`mergeflow run PARAMS -S key=value ...` as a deployment."""
    from flows.merge import merge_pipeline

    params = load_params(params_path, overrides or [])
    setup_environment(params.project)
    return merge_pipeline(params)


@flow(name="sweep-from-params", log_prints=True)
def sweep_from_params(params_path: str = "params.yaml", overrides: list[str] | None = None) -> Any:
    """`mergeflow sweep PARAMS -S key=value ...` as a deployment."""
    from flows.sweep import sweep_flow

    params = load_params(params_path, overrides or [])
    setup_environment(params.project)
    return sweep_flow(params)
