"""The MuDSC pipeline for models trained from different initialisations:

    train pair -> collect activations -> merge (each method) -> evaluate -> record in MLflow
                                   output ensemble -> evaluate ----------------^

Every step is a cached task writing a content-addressed artifact (tasks/mudsc.py); the
activation statistics are computed once and shared by every method that uses them.

    python -m flows.mudsc --family vit --dataset mnist --store .artifacts
"""

from __future__ import annotations

import argparse
from typing import Any

from flows.cli import setup_environment

# Prefect reads its settings when imported: quiet, offline, PREFECT_HOME in the project, as
# `mergeflow run` sets them (only where the user has not).
setup_environment(".")
from prefect import flow  # noqa: E402

from tasks import mudsc as steps  # noqa: E402

DEFAULT_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("naive_average", {}),
    ("weight_matching", {}),
    ("zipit", {}),
    ("mudsc", {"matcher": "zip", "alpha": 0.5}),
    ("mudsc", {"matcher": "permute", "alpha": 0.5}),
]


@flow(name="mudsc-pipeline", log_prints=True)
def mudsc_pipeline(store: str, family: str, dataset: str, methods: list[tuple[str, dict[str, Any]]] | None = None,
                   images: int = 2000, width: int | None = None, steps_per_model: int | None = None,
                   tracking_uri: str | None = None, project_dir: str = ".") -> dict[str, dict[str, float]]:
    """Returns {label: accuracies} for the ensemble and every method; records each merge."""
    pair = steps.train_pair(store, family, dataset, width, steps_per_model)
    activations = steps.collect_activations(store, pair, images)
    ensemble = steps.evaluate_merged(store, pair, None)
    table = {"output ensemble": ensemble.summary}
    for method, hyperparams in methods or DEFAULT_METHODS:
        merged = steps.merge_pair(store, pair, activations, method, hyperparams, images)
        accuracy = steps.evaluate_merged(store, pair, merged)
        label = method + "".join(f" {k}={v}" for k, v in sorted(hyperparams.items()))
        table[label] = accuracy.summary
        if tracking_uri is not None:
            steps.record(method, hyperparams, accuracy, ensemble, pair, merged, tracking_uri, project_dir)
    for label, acc in table.items():
        print(f"{label:<36} joint {100 * acc['joint']:5.1f}  " +
              "  ".join(f"{k} {100 * v:5.1f}" for k, v in sorted(acc.items()) if k != "joint"))
    return table


def main(argv: list[str] | None = None) -> int:
    from mergeflow.mudsc.models import BACKBONES
    from tasks.tracking import default_tracking_uri

    parser = argparse.ArgumentParser(description="MuDSC pipeline on one pair of models trained from "
                                                 "different initialisations: naive average, weight matching, "
                                                 "ZipIt!, MuDSC (zip and permute), recorded in MLflow")
    parser.add_argument("--family", default="mlp", choices=sorted(BACKBONES), help="model family (default mlp)")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"],
                        help="the dataset the pair is trained on (default mnist)")
    parser.add_argument("--store", default=".artifacts", help="artifact store of the cached steps")
    parser.add_argument("--images", type=int, default=2000, help="unlabelled training images for activations")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: the project's, sqlite:///<cwd>/mlflow.db, as "
                             "`mergeflow run`; env MLFLOW_TRACKING_URI overrides)")
    args = parser.parse_args(argv)
    tracking_uri = args.tracking_uri or default_tracking_uri(".")
    mudsc_pipeline(args.store, args.family, args.dataset, images=args.images, tracking_uri=tracking_uri)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
