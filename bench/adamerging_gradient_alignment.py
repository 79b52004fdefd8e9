"""Does lowering AdaMerging's entropy lower the true loss? Gradient alignment on a built zoo.

    python bench/adamerging_gradient_alignment.py --zoo DIR [--limit N] [--coefficients FILE]

At a point of coefficient space (default: the official start, every lambda = 0.3, i.e. Task
Arithmetic 0.3; or a saved coefficients file), for every task i it computes, over the task's
test split, the gradients with respect to the coefficients of
  H_i  = mean prediction entropy (AdaMerging's term for task i; no labels), and
  CE_i = mean cross-entropy with the true labels (what one would want to lower).
AdaMerging descends sum_i H_i; it helps only if that direction also lowers sum_i CE_i.
Printed: the cosine between -grad H and -grad CE (layer-wise and task-wise coefficients), per
task and for the sums, and the task-wise 4x4 sign table d H_i / d lambda_k vs d CE_i / d lambda_k
(which task vectors each objective wants more of, per task's inputs). Gradients are taken with
respect to the clamped coefficients (the values the merge uses).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mergeflow.adamerging import (
    Coefficients,
    DifferentiableMerge,
    merged_parameter_names,
    softmax_entropy,
)
from mergeflow.adamerging.coefficients import initial_raw
from mergeflow.checkpoint import load_state_dict
from mergeflow.task_vectors import task_vector
from mergeflow.zoo import Zoo


def gradients(zoo: Zoo, tasks: list[str], raw: torch.Tensor, limit: int | None,
              batch_size: int = 1000) -> dict[str, dict[str, torch.Tensor]]:
    """{task: {"entropy": d H_i / d raw, "ce": d CE_i / d raw}}, means over the task's test split."""
    base = load_state_dict(zoo.pretrained_dir)
    tvs = [task_vector(base, load_state_dict(zoo.expert_dir(t))) for t in tasks]
    encoder = zoo.encoder().requires_grad_(False)
    names = merged_parameter_names(encoder)
    merge = DifferentiableMerge({n: base[n] for n in names}, [{n: tv[n] for n in names} for tv in tvs])
    out = {}
    for t in tasks:
        split, head = zoo.load_task(t).test, zoo.head(t)
        n = len(split) if limit is None else min(limit, len(split))
        grads = {"entropy": torch.zeros_like(raw), "ce": torch.zeros_like(raw)}
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            coefs = raw.detach().clamp(0, 1).requires_grad_(True)
            logits = head(functional_call(encoder, merge.merged(coefs), (split.images[s:e],)))
            weight = (e - s) / n  # batch sums -> mean over the split
            losses = {"entropy": softmax_entropy(logits).mean(), "ce": F.cross_entropy(logits, split.labels[s:e])}
            for key, loss in losses.items():
                (g,) = torch.autograd.grad(weight * loss, coefs, retain_graph=key == "entropy")
                grads[key] += g
        out[t] = grads
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--limit", type=int, default=None, help="test examples per task (all by default)")
    ap.add_argument("--coefficients", default=None, help="a layer-wise coefficients file (default: all 0.3)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = Zoo.open(args.zoo)
    tasks = zoo.tasks
    n_tensors = len(merged_parameter_names(zoo.encoder()))
    if args.coefficients:
        c = Coefficients.load(args.coefficients)
        if c.mode != "layer_wise" or list(c.task_names) != tasks:
            raise SystemExit(f"{args.coefficients}: need layer-wise coefficients for tasks {tasks}")
        raw = c.values.clone()
    else:
        raw = initial_raw("layer_wise", len(tasks), n_tensors)
    g = gradients(zoo, tasks, raw, args.limit)
    # Layer-wise gradients summed over rows give the task-wise gradients at the same point
    # (a task-wise lambda_k scales every row's lambda_k), exact where no row is clamped.
    print(f"point: {args.coefficients or 'every lambda = 0.3 (Task Arithmetic 0.3)'}")
    print("cosine(-grad entropy, -grad cross-entropy)   layer-wise   task-wise")
    for t in tasks:
        h, ce = g[t]["entropy"], g[t]["ce"]
        print(f"  {t:14s}                               {cosine(h, ce):+.3f}       {cosine(h.sum(0), ce.sum(0)):+.3f}")
    h_sum = sum(g[t]["entropy"] for t in tasks)
    ce_sum = sum(g[t]["ce"] for t in tasks)
    print(f"  sum over tasks (the objective)               {cosine(h_sum, ce_sum):+.3f}       "
          f"{cosine(h_sum.sum(0), ce_sum.sum(0)):+.3f}")
    print("task-wise: which lambda_k each objective wants RAISED on task i's inputs (- d/d lambda_k > 0 -> '+')")
    print("  inputs of      " + "  ".join(f"{k[:12]:>12s}" for k in tasks) + "    (entropy / cross-entropy)")
    for t in tasks:
        h, ce = -g[t]["entropy"].sum(0), -g[t]["ce"].sum(0)
        cells = [f"{'+' if h[k] > 0 else '-'}{abs(float(h[k])):.3f}/{'+' if ce[k] > 0 else '-'}{abs(float(ce[k])):.3f}"
                 for k in range(len(tasks))]
        print(f"  {t:14s}" + "  ".join(f"{c:>12s}" for c in cells))
    h, ce = -h_sum.sum(0), -ce_sum.sum(0)
    print("  sum           " + "  ".join(
        f"{'+' if h[k] > 0 else '-'}{abs(float(h[k])):.3f}/{'+' if ce[k] > 0 else '-'}{abs(float(ce[k])):.3f}".rjust(12)
        for k in range(len(tasks))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
