"""The MLflow model registry against a temp sqlite store: versions, and the champion alias."""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_inputs import corpus

from mergeflow.checkpoint import load_state_dict
from mergeflow.checkpoint_writer import save_checkpoint


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module: creating one runs MLflow's migrations (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


def _merge_run(store: str, tmp_path: Path, label: str, val_acc: float, split: str = "val") -> tuple[str, Path]:
    from tasks.tracking import Tracker

    tracker = Tracker("registry-test", tracking_uri=store, artifact_root=tmp_path / "mlartifacts",
                      project_dir=tmp_path)
    run_id = tracker.log_merge_run(method="average", hyperparams={}, accuracy={"digits": val_acc},
                                   params={"evaluation": {"split": split}}, run_name=label,
                                   output_hash=f"hash-{label}")
    model = save_checkpoint(corpus.state_dict(len(label)), tmp_path / "models" / label)
    return run_id, model


def test_register_versions_and_champion_is_best_on_validation(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from tasks.registry import (
        CHAMPION,
        MODEL_NAME,
        VAL_ACCURACY_TAG,
        champion,
        promote_champion,
        register_merged_model,
    )

    runs = [_merge_run(store, tmp_path, label, acc) for label, acc in
            [("ta", 0.80), ("ties", 0.91), ("avg", 0.85), ("ties-again", 0.91)]]
    versions = [register_merged_model(model, run_id, tracking_uri=store) for run_id, model in runs]
    assert [str(v.version) for v in versions] == ["1", "2", "3", "4"]
    assert versions[1].tags[VAL_ACCURACY_TAG] == "0.91"  # read from the run's val accuracy_avg
    assert versions[1].tags["mergeflow.output_hash"] == "hash-ties"

    best = promote_champion(tracking_uri=store)
    assert str(best.version) == "2"  # 0.91; the earlier of the tied versions
    assert str(champion(tracking_uri=store).version) == "2"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert {k: str(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()} == {CHAMPION: "2"}

    # The champion's source is the merged safetensors directory, logged with its run.
    source = client.get_model_version_download_uri(MODEL_NAME, champion(tracking_uri=store).version)
    local = download_artifacts(artifact_uri=source, tracking_uri=store, dst_path=str(tmp_path / "download"))
    got, want = load_state_dict(local), load_state_dict(runs[1][1])
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)

    # A better merge later takes the alias.
    run_id, model = _merge_run(store, tmp_path, "pcb", 0.95)
    register_merged_model(model, run_id, tracking_uri=store)
    assert str(promote_champion(tracking_uri=store).version) == "5"
    assert str(champion(tracking_uri=store).version) == "5"


def test_registry_refuses_test_split_and_non_models(store: str, tmp_path: Path) -> None:
    from tasks.registry import promote_champion, register_merged_model

    run_id, model = _merge_run(store, tmp_path, "ta", 0.8, split="test")
    with pytest.raises(ValueError, match="not 'val'"):
        register_merged_model(model, run_id, name="other", tracking_uri=store)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        register_merged_model(tmp_path, run_id, val_accuracy=0.8, name="other", tracking_uri=store)
    with pytest.raises(ValueError, match="no version"):
        promote_champion("no-such-model", tracking_uri=store)
    # explicit validation accuracy (e.g. from a sweep's own validation pass) is accepted
    version = register_merged_model(model, run_id, val_accuracy=0.8, name="other", tracking_uri=store)
    assert str(version.version) == "1"
