"""The zoo flow: build (or reuse from the cache) the embedded model zoo and publish it."""

from __future__ import annotations

from prefect import flow

from flows.params import Params
from tasks.publish import publish
from tasks.zoo import build_zoo


@flow(name="zoo", log_prints=True)
def zoo_flow(params: Params) -> str:
    """Returns the published zoo directory (params `zoo.dir`)."""
    zoo = build_zoo(str(params.path(params.artifacts)), params.zoo.zoo_spec())
    return str(publish(zoo, params.path(params.zoo.dir)))
