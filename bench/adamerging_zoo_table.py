"""Accuracy table on a built zoo: Task Arithmetic, TIES, and AdaMerging (task-/layer-wise, ++).

    python bench/adamerging_zoo_table.py --zoo DIR [--steps 500 --lr 1e-3] [--limit N]
        [--variants lw,tw,lw++,tw++]

Unlabelled inputs are the test images without labels (transductive, as in the paper); accuracy
is measured on the test split (its first --limit examples per task, all by default).
"""

from __future__ import annotations

import argparse
import time

from mergeflow import merge
from mergeflow.adamerging import AdaMergingConfig, apply_coefficients, tune_coefficients
from mergeflow.checkpoint import load_state_dict
from mergeflow.evaluation import evaluate, format_accuracy_table
from mergeflow.task_vectors import task_vector
from mergeflow.zoo import Zoo

VARIANTS = {"tw": ("task_wise", False), "lw": ("layer_wise", False),
            "tw++": ("task_wise", True), "lw++": ("layer_wise", True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--variants", default="lw,tw,lw++,tw++")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    zoo = Zoo.open(args.zoo)
    tasks = zoo.tasks
    base = load_state_dict(zoo.pretrained_dir)
    experts = [load_state_dict(zoo.expert_dir(t)) for t in tasks]
    tvs = {t: task_vector(base, e) for t, e in zip(tasks, experts, strict=True)}
    heads = {t: zoo.head(t) for t in tasks}
    unlabelled = {t: zoo.load_task(t).test.images for t in tasks}

    def acc(weights):
        return evaluate(weights, zoo, tasks, split="test", limit=args.limit, device=args.device)

    rows = {"pretrained": acc(base)}
    rows["experts"] = {t: evaluate(e, zoo, [t], split="test", limit=args.limit)[t]
                       for t, e in zip(tasks, experts, strict=True)}
    rows["task_arithmetic(0.3)"] = acc(merge("task_arithmetic", base, experts, lam=0.3))
    rows["ties(k=0.2,mean,lam=1.0)"] = acc(merge("ties", base, experts, k=0.2, lam=1.0, agg="mean"))
    rows["ties(k=0.2,sum,lam=0.3)"] = acc(merge("ties", base, experts, k=0.2, lam=0.3, agg="sum"))
    for name in args.variants.split(","):
        mode, plus = VARIANTS[name]
        config = AdaMergingConfig(mode=mode, ties_filter=plus, steps=args.steps, lr=args.lr)
        started = time.perf_counter()
        result = tune_coefficients(zoo.encoder(), tvs, heads, unlabelled, config, device=args.device)
        seconds = time.perf_counter() - started
        c = result.coefficients
        label = f"adamerging{'++' if plus else ''} {mode}"
        rows[label] = acc(apply_coefficients(base, [tvs[t] for t in tasks], c))
        print(f"{label}: {seconds:.0f} s, loss {result.loss[0]:.4f} -> {result.loss[-1]:.4f}, "
              f"coefficients min {float(c.values.min()):.3f} max {float(c.values.max()):.3f} "
              f"mean {float(c.values.mean()):.3f}, exact zeros {int((c.values == 0).sum())}", flush=True)
        print(format_accuracy_table(rows, tasks), flush=True)
    print(format_accuracy_table(rows, tasks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
