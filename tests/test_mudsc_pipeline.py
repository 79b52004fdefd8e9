"""The MuDSC pipeline under the session's Prefect API: a tiny pair end to end, then a second
run where every step is Cached and the results are identical."""

from __future__ import annotations

import time

import pytest


def _states(flow_run_id) -> dict[str, list[str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        for _ in range(100):  # task states arrive from events, asynchronously
            runs = client.read_task_runs(flow_run_filter=runs_filter)
            if runs and all(r.state is not None and r.state.is_final() for r in runs):
                break
            time.sleep(0.1)
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


@pytest.mark.usefixtures("prefect_api")
def test_pipeline_runs_then_every_step_is_cached(tmp_path):
    from flows.mudsc import mudsc_pipeline

    methods = [("zipit", {}), ("mudsc", {"matcher": "permute", "max_iter": 2})]
    kwargs = dict(store=str(tmp_path / "store"), family="mlp", dataset="digits", methods=methods, images=64,
                  width=8, steps_per_model=5, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                  project_dir=str(tmp_path))
    first = mudsc_pipeline(**kwargs, return_state=True)
    table = first.result()
    assert set(table) == {"output ensemble", "zipit", "mudsc matcher=permute max_iter=2"}
    assert all(0.0 <= v <= 1.0 for acc in table.values() for v in acc.values())
    states = _states(first.state_details.flow_run_id)
    assert states["mudsc_pair"] == ["Completed"] and states["mudsc_activations"] == ["Completed"]
    second = mudsc_pipeline(**kwargs, return_state=True)
    assert second.result() == table
    states = _states(second.state_details.flow_run_id)
    assert states and all(s == "Cached" for runs in states.values() for s in runs), states
    assert sorted(states) == ["mudsc_activations", "mudsc_evaluate", "mudsc_merge", "mudsc_pair", "mudsc_record"]
