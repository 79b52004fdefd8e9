"""The comparison table of one family: each model alone, output ensemble, naive average,
weight matching, ZipIt!, MuDSC (zip and permute); joint and per-task test accuracy.

    python -m mergeflow.mudsc.compare --family mlp --dataset mnist --root artifacts/mudsc_zoo
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mergeflow import datasets
from mergeflow.mudsc import zoo
from mergeflow.mudsc.evaluation import alone, ensemble, evaluate
from mergeflow.mudsc.merge import mudsc, naive_average, weight_matching, zipit


def sample_images(dataset: str, n: int, seed: int = 0) -> torch.Tensor:
    """`n` unlabelled training images of the dataset (all classes), a fixed random sample."""
    train = datasets.load(dataset).train
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return train.images[idx]


def methods(alpha: float = 0.5) -> dict[str, Callable]:
    return {
        "naive average": lambda ms, x: naive_average(ms, x).model,
        "weight matching": lambda ms, x: weight_matching(ms, x).model,
        "ZipIt!": lambda ms, x: zipit(ms, x).model,
        f"MuDSC zip a={alpha}": lambda ms, x: mudsc(ms, x, matcher="zip", alpha=alpha).model,
        f"MuDSC permute a={alpha}": lambda ms, x: mudsc(ms, x, matcher="permute", alpha=alpha).model,
    }


def compare(models: Sequence[nn.Module], images: torch.Tensor, test: datasets.Split,
            alpha: float = 0.5) -> list[tuple[str, dict[str, float], float]]:
    """Rows (name, accuracies, merge seconds)."""
    tasks = [m.classes for m in models]
    rows = []
    for k, m in enumerate(models):
        acc = evaluate(alone(m), test, tasks)  # its one head is "task0" to the evaluator
        rows.append((f"model {k} alone", {"joint": acc["joint"], f"task{k}": acc["task0"]}, 0.0))
    rows.append(("output ensemble", evaluate(ensemble(models), test, tasks), 0.0))
    for name, fn in methods(alpha).items():
        start = time.perf_counter()
        merged = fn(models, images)
        rows.append((name, evaluate(merged, test, tasks), time.perf_counter() - start))
    return rows


def format_table(title: str, rows) -> str:
    lines = [title, f"{'method':<26} {'joint':>6} {'task0':>6} {'task1':>6} {'merge s':>8}"]
    for name, acc, seconds in rows:
        cells = [f"{100 * acc[k]:6.1f}" if k in acc else f"{'-':>6}" for k in ("joint", "task0", "task1")]
        lines.append(f"{name:<26} {' '.join(cells)} {seconds:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=zoo.FAMILIES, action="append")
    parser.add_argument("--dataset", choices=zoo.DATASETS, action="append")
    parser.add_argument("--root", default="artifacts/mudsc_zoo")
    parser.add_argument("--images", type=int, default=2000, help="unlabelled training images")
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for dataset in args.dataset or zoo.DATASETS:
        for family in args.family or zoo.FAMILIES:
            start = time.perf_counter()
            models = [zoo.load(p) for p in zoo.build_pair(family, dataset, args.root)]
            trained = time.perf_counter() - start
            rows = compare(models, sample_images(dataset, args.images), datasets.load(dataset).test, args.alpha)
            print(format_table(f"\n{family} on {dataset} (zoo ready in {trained:.0f} s)", rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
