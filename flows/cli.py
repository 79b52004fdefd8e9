"""`mergeflow run | zoo | sweep`: load and validate params, set up a quiet offline Prefect, run.

Environment first: Prefect reads its settings at import, so the quiet/offline variables below
(QUIET_OFFLINE) and PREFECT_HOME (inside the project) are set here, before anything imports prefect,
unless the user already set them. PREFECT_API_URL, when set, sends the runs to that server;
otherwise Prefect starts its ephemeral API for the duration of the command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from flows.params import Params, ParamsError, load_params

QUIET_OFFLINE = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # The ephemeral API server logs cancellation tracebacks when it is stopped at exit while
    # still flushing events; its real failures reach the client as API errors anyway.
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
}


def setup_environment(project: str | Path) -> None:
    for key, value in QUIET_OFFLINE.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path(project).resolve() / ".prefect"))


def _load(args: argparse.Namespace) -> Params | None:
    try:
        params = load_params(args.params, getattr(args, "set", []) or [])
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    setup_environment(params.project)
    return params


def run(args: argparse.Namespace) -> int:
    params = _load(args)
    if params is None:
        return 2
    from flows.merge import merge_pipeline

    started = time.perf_counter()
    report = merge_pipeline(params)
    print(_summary(params, report, time.perf_counter() - started))
    return 0


def zoo(args: argparse.Namespace) -> int:
    params = _load(args)
    if params is None:
        return 2
    from flows.zoo import zoo_flow
    from mergeflow.evaluation import print_zoo_table
    from mergeflow.zoo import Zoo

    path = zoo_flow(params)
    print_zoo_table(Zoo.open(path))
    print(f"zoo: {path}")
    return 0


def sweep(args: argparse.Namespace) -> int:
    params = _load(args)
    if params is None:
        return 2
    from flows.sweep import format_sweep, run_sweep

    result = run_sweep(params)
    print(format_sweep(result))
    return 0


def _summary(params: Params, report: dict, seconds: float) -> str:
    from flows.report import format_report_table

    out = params.outputs
    where = [
        f"accuracy on the {report['split']} split (%); norm = accuracy / expert accuracy, averaged",
        format_report_table(report),
        "",
        f"done in {seconds:.1f} s. Where to look:",
        f"  MLflow runs (chart, report, lineage): make ui  -> http://127.0.0.1:5000  "
        f"(store {params.tracking_uri()})",
        f"  merged model ({report['merges'][0]['label']}): {params.path(out.merged)}",
        f"  metrics: {params.path(out.metrics)}   plots data: {params.path(out.per_task)}",
        f"  report: {params.path(out.report)}   zoo: {params.path(params.zoo.dir)}",
    ]
    return "\n".join(where)
