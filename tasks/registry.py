"""The MLflow model registry: register merged models, and name the best one `champion`.

    from tasks.registry import register_merged_model, promote_champion

    version = register_merged_model(merged.path, run_id, val_accuracy=0.91)  # per merge
    champion = promote_champion()                                            # after a sweep

Each merged model becomes a version of one registered model (default `mergeflow-merged`): its
safetensors directory is logged as the `model` artifact of the merge's MLflow run, and the
version points there, so the registry, the run's metrics and the lineage tags stay together.
The version carries the validation accuracy it was chosen on (tag `mergeflow.val_accuracy`)
and the output's content hash. `promote_champion` moves the alias `champion` to the version
with the highest validation accuracy (the earliest version wins a tie, so the alias does not
move on a re-run of the same merge). Test accuracy is never used to choose.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import default_tracking_uri

MODEL_NAME = "mergeflow-merged"
CHAMPION = "champion"
MODEL_ARTIFACT = "model"
VAL_ACCURACY_TAG = "mergeflow.val_accuracy"
OUTPUT_HASH_TAG = "mergeflow.output_hash"


def _client(tracking_uri: str | None):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    # The registry lives in the same store as the runs (sqlite file or server).
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def validation_accuracy(run_id: str, *, metric: str = "accuracy_avg", tracking_uri: str | None = None) -> float:
    """The run's `metric`, if the run evaluated on the validation split (else an error)."""
    run = _client(tracking_uri).get_run(run_id)
    split = run.data.params.get("evaluation.split")
    if split != "val":
        raise ValueError(f"run {run_id} evaluated on {split!r}, not 'val'; choosing a champion on "
                         "test accuracy would leak the test set. Pass val_accuracy explicitly.")
    if metric not in run.data.metrics:
        raise ValueError(f"run {run_id} has no metric {metric!r}; it has {sorted(run.data.metrics)}")
    return float(run.data.metrics[metric])


def register_merged_model(
    model_dir: str | Path,
    run_id: str,
    *,
    val_accuracy: float | None = None,
    name: str = MODEL_NAME,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
):
    """Log `model_dir` as the run's `model` artifact and register it as a new version of `name`.

    `val_accuracy` defaults to the run's `accuracy_avg` when the run evaluated on `val`.
    Returns the MLflow `ModelVersion`.
    """
    from mlflow.exceptions import MlflowException

    model_dir = Path(model_dir)
    weights = list(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not weights:
        raise ValueError(f"{model_dir}: no *.safetensors files; register the merged model directory")
    client = _client(tracking_uri)
    if val_accuracy is None:
        val_accuracy = validation_accuracy(run_id, tracking_uri=tracking_uri)
    client.log_artifacts(run_id, str(model_dir), artifact_path=MODEL_ARTIFACT)
    try:
        client.create_registered_model(name, description="Merged models from mergeflow runs.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run = client.get_run(run_id)
    version_tags = {VAL_ACCURACY_TAG: repr(float(val_accuracy)), **(tags or {})}
    if "mergeflow.output_hash" in run.data.tags:
        version_tags[OUTPUT_HASH_TAG] = run.data.tags["mergeflow.output_hash"]
    return client.create_model_version(
        name, source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id, tags=version_tags,
        description=f"merged model of run {run.info.run_name or run_id}")


def promote_champion(name: str = MODEL_NAME, *, tracking_uri: str | None = None):
    """Point the alias `champion` at the version with the best validation accuracy; return it."""
    client = _client(tracking_uri)
    versions = client.search_model_versions(f"name = '{name}'")
    scored = [(float(v.tags[VAL_ACCURACY_TAG]), -int(v.version), v)
              for v in versions if VAL_ACCURACY_TAG in v.tags]
    if not scored:
        raise ValueError(f"no version of {name!r} has a validation accuracy ({VAL_ACCURACY_TAG}); "
                         "register models with register_merged_model first")
    best = max(scored, key=lambda s: (s[0], s[1]))[2]
    client.set_registered_model_alias(name, CHAMPION, best.version)
    return best


def champion(name: str = MODEL_NAME, *, tracking_uri: str | None = None):
    """The `champion` version of `name` (raises if no alias is set)."""
    return _client(tracking_uri).get_model_version_by_alias(name, CHAMPION)


@task(name="register-model", cache_policy=NO_CACHE)
def register_model(model_dir: str, run_id: str, val_accuracy: float | None = None,
                   name: str = MODEL_NAME, tracking_uri: str | None = None) -> str:
    """`register_merged_model` as a flow step (never cached: registering is a side effect).
    Returns the new version number."""
    return str(register_merged_model(model_dir, run_id, val_accuracy=val_accuracy, name=name,
                                     tracking_uri=tracking_uri).version)


@task(name="promote-champion", cache_policy=NO_CACHE)
def promote_champion_task(name: str = MODEL_NAME, tracking_uri: str | None = None) -> str:
    """`promote_champion` as a flow step; returns the champion's version number."""
    return str(promote_champion(name, tracking_uri=tracking_uri).version)
