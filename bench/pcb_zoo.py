"""PCB (with and without the coefficient search) next to TIES and Task Arithmetic on a zoo.

Every scalar lam is chosen on the validation split from a grid; the searched per-task lams come
from the coefficient-search flow (NGOpt on validation). Reported: test accuracy per task and the
average normalized accuracy (merged / expert, per task, averaged).

    python bench/pcb_zoo.py --zoo outputs/zoo [--budget 100] [--search-limit 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

GRIDS = {
    "task_arithmetic": ({}, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]),
    "ties": ({"k": 0.2, "agg": "mean"}, [0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]),
    "pcb": ({"variant": "nlp", "ratio": 0.1}, [0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]),
}
PCB_SEARCHED = {"variant": "vision_es", "ratio": 0.05}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--search-limit", type=int, default=None, help="validation examples per task in the search")
    parser.add_argument("--search-methods", nargs="*", default=["pcb"], choices=["pcb", "task_arithmetic", "ties"])
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from mergeflow.checkpoint import load_state_dict
    from mergeflow.evaluation import evaluate, format_accuracy_table, normalized_accuracy
    from mergeflow.merging import merge
    from mergeflow.zoo import Zoo

    zoo = Zoo.open(args.zoo)
    tasks = sorted(zoo.tasks)
    base = load_state_dict(zoo.pretrained_dir)
    experts = [load_state_dict(zoo.expert_dir(t)) for t in tasks]
    expert_test = {t: evaluate(zoo.expert_dir(t), zoo, [t], split="test")[t] for t in tasks}
    rows: dict[str, dict] = {}

    def record(label: str, hp: dict, val_mean: float | None, extra: dict | None = None) -> None:
        acc = evaluate(merge(hp.pop("method"), base, experts, **hp), zoo, tasks, split="test")
        norm = normalized_accuracy(acc, expert_test)
        rows[label] = {"test": acc, "test_avg": sum(acc.values()) / len(acc),
                       "normalized_avg": sum(norm.values()) / len(norm), "val_mean": val_mean, **(extra or {})}
        print(f"{label}: test avg {100 * rows[label]['test_avg']:.2f}  normalized avg "
              f"{100 * rows[label]['normalized_avg']:.2f}", flush=True)

    for method, (fixed, grid) in GRIDS.items():
        scored = []
        for lam in grid:
            val = evaluate(merge(method, base, experts, **fixed, lam=lam), zoo, tasks, split="val",
                           limit=args.search_limit)
            scored.append((sum(val.values()) / len(val), lam))
        best_val, best_lam = max(scored, key=lambda s: (s[0], -grid.index(s[1])))
        record(f"{method}{fixed} lam={best_lam} (val grid)", {"method": method, **fixed, "lam": best_lam}, best_val,
               {"grid": scored})
    record("pcb{'variant': 'vision_es', 'ratio': 0.05} lam=1.0 (no search)",
           {"method": "pcb", **PCB_SEARCHED, "lam": 1.0}, None)

    from flows.coefficient_search import coefficient_search

    with tempfile.TemporaryDirectory() as tmp:
        for method in args.search_methods:
            hp = PCB_SEARCHED if method == "pcb" else GRIDS[method][0]
            bounds = {"lower": 0.1, "upper": 0.6, "init": 0.3} if method == "task_arithmetic" else {}
            started = time.perf_counter()
            found = coefficient_search(zoo_dir=str(zoo.root), store=str(Path(tmp) / "store"), method=method,
                                       hparams=dict(hp), budget=args.budget, eval_limit=args.search_limit,
                                       track=False, **bounds)
            record(f"{method}{hp} + search (budget {args.budget})", {"method": method, **hp, "lam": found["lams"]},
                   found["val_mean"], {"lams": found["lams_by_task"], "search_s": time.perf_counter() - started})

    print(format_accuracy_table({k: v["test"] for k, v in rows.items()}, tasks))
    print("experts:", {t: round(100 * a, 2) for t, a in expert_test.items()})
    results = {"zoo": str(zoo.root), "experts_test": expert_test, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
