"""The comparison table of one family: each model alone, output ensemble, naive average,
weight matching, ZipIt!, MuDSC (zip and permute); joint and per-task test accuracy.

    python -m mergeflow.mudsc.compare --family mlp --dataset mnist --root .zoo/mudsc
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mergeflow import datasets
from mergeflow.mudsc import zoo
from mergeflow.mudsc.alpha_sweep import sweep_alpha
from mergeflow.mudsc.evaluation import alone, ensemble, evaluate
from mergeflow.mudsc.merge import mudsc, naive_average, weight_matching, zipit


def sample_images(dataset: str, n: int, seed: int = 0) -> torch.Tensor:
    """`n` unlabelled training images of the dataset (all classes), a fixed random sample."""
    train = datasets.load(dataset).train
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return train.images[idx]


def labelled_sample(dataset: str, n: int, seed: int = 1) -> datasets.Split:
    """`n` labelled training images (another sample than the activation images) for alpha."""
    train = datasets.load(dataset).train
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return datasets.Split(train.images[idx], train.labels[idx])


def methods(alpha: float = 0.5, train: datasets.Split | None = None) -> dict[str, Callable]:
    rows = {
        "naive average": lambda ms, x: naive_average(ms, x).model,
        "weight matching": lambda ms, x: weight_matching(ms, x).model,
        "ZipIt!": lambda ms, x: zipit(ms, x).model,
        f"MuDSC zip alpha={alpha}": lambda ms, x: mudsc(ms, x, matcher="zip", alpha=alpha).model,
        f"MuDSC permute alpha={alpha}": lambda ms, x: mudsc(ms, x, matcher="permute", alpha=alpha).model,
    }
    if train is not None:
        for matcher in ("zip", "permute"):
            def swept(ms, x, matcher=matcher):
                best, result, scores = sweep_alpha(ms, x, train, matcher=matcher)
                print(f"  sweep {matcher}: train joint acc {scores} -> alpha {best}", flush=True)
                return result.model
            rows[f"MuDSC {matcher} alpha swept"] = swept
    return rows


def compare(models: Sequence[nn.Module], images: torch.Tensor, test: datasets.Split,
            alpha: float = 0.5, train: datasets.Split | None = None) -> list[tuple[str, dict[str, float], float]]:
    """Rows (name, accuracies, merge seconds); with `train`, also MuDSC with alpha swept on it."""
    tasks = [m.classes for m in models]
    rows = []
    for k, m in enumerate(models):
        acc = evaluate(alone(m), test, tasks)  # its one head is "task0" to the evaluator
        rows.append((f"model {k} alone", {"joint": acc["joint"], f"task{k}": acc["task0"]}, 0.0))
    rows.append(("output ensemble", evaluate(ensemble(models), test, tasks), 0.0))
    for name, fn in methods(alpha, train).items():
        start = time.perf_counter()
        merged = fn(models, images)
        rows.append((name, evaluate(merged, test, tasks), time.perf_counter() - start))
    return rows


def format_table(title: str, rows) -> str:
    lines = [title, f"{'method':<30} {'joint':>6} {'task0':>6} {'task1':>6} {'merge s':>8}"]
    for name, acc, seconds in rows:
        cells = [f"{100 * acc[k]:6.1f}" if k in acc else f"{'-':>6}" for k in ("joint", "task0", "task1")]
        lines.append(f"{name:<30} {' '.join(cells)} {seconds:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=zoo.FAMILIES, action="append")
    parser.add_argument("--dataset", choices=zoo.DATASETS, action="append")
    parser.add_argument("--root", default=".zoo/mudsc")
    parser.add_argument("--images", type=int, default=2000, help="unlabelled training images")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--sweep", type=int, default=0, metavar="N",
                        help="also sweep alpha on N labelled training images (0: no sweep)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for dataset in args.dataset or zoo.DATASETS:
        for family in args.family or zoo.FAMILIES:
            start = time.perf_counter()
            models = [zoo.load(p) for p in zoo.build_pair(family, dataset, args.root)]
            trained = time.perf_counter() - start
            train = labelled_sample(dataset, args.sweep) if args.sweep else None
            rows = compare(models, sample_images(dataset, args.images), datasets.load(dataset).test, args.alpha, train)
            print(format_table(f"\n{family} on {dataset} (zoo ready in {trained:.0f} s)", rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
