"""Accuracy table on a built zoo: Task Arithmetic, TIES, and AdaMerging (task-/layer-wise, ++).

    python bench/adamerging_zoo_table.py --zoo DIR [--steps 500 --lr 1e-3] [--limit N]
        [--variants lw,tw,lw++,tw++,oracle-lw] [--tasks mnist,digits,...]
        [--log-every 50] [--out results.json] [--plot traces.png] [--set clamp_max=null ...]

Unlabelled inputs are the test images without labels (transductive, as in the paper); accuracy
is measured on the test split (its first --limit examples per task, all by default). Two tables
are printed: accuracy and normalized accuracy (merged / expert, per task), each with its average.

Diagnostics (why AdaMerging does or does not help on a zoo):
- `--log-every N`: every N steps, the per-task accuracy AND mean prediction entropy on the
  evaluation split of the weights that step ran with, so one sees whether lower entropy goes with
  higher accuracy. The weights are read by a forward pre-hook on the encoder (functional_call
  swaps the merged tensors in by name); tuning itself is untouched. With `--plot`, one PNG.
- `oracle-lw`: the same layer-wise parameterisation, clamp, Adam schedule and batches, but the
  loss is the cross-entropy with the TRUE test labels. Not a method: an upper bound that shows how
  much the coefficient space can give when the objective is right.
- `--set KEY=VALUE` overrides any AdaMergingConfig field (JSON values: `clamp_max=null`, `prior=0.2`).
- `--ta-sweep 0,0.1,...`: along the Task Arithmetic line theta_0 + lam * sum_k tau_k, the summed
  entropy (AdaMerging's objective, on the evaluation split) next to the normalized accuracy: does
  the objective's minimum sit where the accuracy peaks?
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mergeflow import merge
from mergeflow.adamerging import (
    AdaMergingConfig,
    Coefficients,
    DifferentiableMerge,
    apply_coefficients,
    clamp_coefficients,
    merged_parameter_names,
    softmax_entropy,
    tune_coefficients,
)
from mergeflow.adamerging.coefficients import initial_raw
from mergeflow.checkpoint import load_state_dict
from mergeflow.evaluation import format_accuracy_table
from mergeflow.task_vectors import task_vector
from mergeflow.zoo import Zoo

VARIANTS = {"tw": ("task_wise", False), "lw": ("layer_wise", False),
            "tw++": ("task_wise", True), "lw++": ("layer_wise", True)}
ORACLE = "oracle-lw"


@torch.inference_mode()
def measure(zoo: Zoo, state: dict, tasks: list[str], limit: int | None, device: str,
            batch_size: int = 1024) -> dict[str, dict[str, float]]:
    """Per task, on the test split (first `limit` examples): accuracy, mean prediction entropy, the
    mean L2 norm of the encoder's features (the logits' scale: a plain linear head gets more
    confident when it grows, without any change of its argmax), and the entropy of the histogram
    of predicted classes (ln 10 = 2.30 for balanced predictions; it falls when predictions
    collapse onto a few classes, Tent's known failure)."""
    encoder = zoo.encoder({k: v.cpu() for k, v in state.items()}).to(device)
    out: dict[str, dict[str, float]] = {"accuracy": {}, "entropy": {}, "feature_norm": {}, "class_entropy": {}}
    for t in tasks:
        split = zoo.load_task(t).test
        n = len(split) if limit is None else min(limit, len(split))
        head = zoo.head(t).to(device)
        correct, entropy, norm, counts = 0, 0.0, 0.0, 0
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            feats = encoder(split.images[s:e].to(device))
            logits = head(feats)
            predicted = logits.argmax(1).cpu()
            correct += int((predicted == split.labels[s:e]).sum())
            counts = counts + torch.bincount(predicted, minlength=logits.shape[1])
            entropy += float(softmax_entropy(logits).sum())
            norm += float(feats.norm(dim=1).sum())
        out["accuracy"][t], out["entropy"][t], out["feature_norm"][t] = correct / n, entropy / n, norm / n
        out["class_entropy"][t] = float(softmax_entropy(torch.log(counts.double() + 1e-12)))
    return out


class ScaleInvariantHead(nn.Module):
    """head(s * f / |f|) with s fixed: the CLIP head's property (it normalises the features), so
    entropy cannot be lowered by scaling the features up. s = the pretrained features' mean norm on
    the task, so at the start it predicts almost exactly as `head` does."""

    def __init__(self, head: nn.Module, scale: float) -> None:
        super().__init__()
        self.head, self.scale = head, scale

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale * feats / feats.norm(dim=-1, keepdim=True))


class MergedWeightsTap:
    """The merged weights the encoder last ran with. functional_call swaps them in by name, so a
    forward pre-hook can read them back; nothing in the tuning changes."""

    def __init__(self, encoder: nn.Module) -> None:
        self.names = [n for n, _ in encoder.named_parameters()]
        self.latest: dict[str, torch.Tensor] | None = None
        encoder.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, _args) -> None:
        self.latest = {n: operator.attrgetter(n)(module).detach() for n in self.names}


def tune_supervised(encoder: nn.Module, tvs: dict, heads: dict, labelled: dict, config: AdaMergingConfig,
                    device: str, on_step=None) -> Coefficients:
    """The oracle: AdaMerging's parameterisation, clamp, optimizer and batches, with the
    cross-entropy on true labels (sum over tasks of the per-batch means) instead of the entropy."""
    tasks = list(tvs)
    encoder.to(device).eval().requires_grad_(False)
    names = merged_parameter_names(encoder)
    params = dict(encoder.named_parameters())
    merged = DifferentiableMerge({n: params[n] for n in names}, [tvs[t] for t in tasks], device=device)
    raw = nn.Parameter(initial_raw(config.mode, len(tasks), len(names), config.prior).to(device))
    optimizer = torch.optim.Adam([raw], lr=config.lr, betas=config.betas, eps=config.eps)
    generator = torch.Generator().manual_seed(config.seed)
    heads = {t: heads[t].to(device) for t in tasks}
    for step in range(config.steps):
        theta = merged.merged(clamp_coefficients(raw, config.clamp_min, config.clamp_max))
        loss = 0.0
        for t in tasks:
            images, labels = labelled[t]
            order = torch.randperm(len(labels), generator=generator)
            for b in range(config.batches_per_step):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                logits = heads[t](functional_call(encoder, theta, (images[idx].to(device),)))
                loss = loss + F.cross_entropy(logits, labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        optimizer.step()
        if on_step is not None:
            on_step(step, loss.item(), {})
    values = clamp_coefficients(raw.detach(), config.clamp_min, config.clamp_max).cpu()
    return Coefficients(mode=config.mode, task_names=tuple(tasks), tensor_names=tuple(names),
                        values=values.contiguous(), raw=raw.detach().cpu().contiguous(),
                        metadata={"variant": ORACLE})


def pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def summarize_trace(label: str, trace: list[dict], tasks: list[str]) -> str:
    """Start -> end of eval entropy and accuracy per task, and their correlation over the trace."""
    lines = [f"{label}: eval entropy, accuracy, feature norm, step {trace[0]['step']} -> {trace[-1]['step']}"]
    for t in tasks:
        ent, acc, norm = ([p[k][t] for p in trace] for k in ("entropy", "accuracy", "feature_norm"))
        lines.append(f"  {t:14s} entropy {ent[0]:.3f} -> {ent[-1]:.3f}   accuracy {100 * acc[0]:.2f} -> "
                     f"{100 * acc[-1]:.2f}   feature norm {norm[0]:.2f} -> {norm[-1]:.2f}   class entropy "
                     f"{trace[0]['class_entropy'][t]:.2f} -> {trace[-1]['class_entropy'][t]:.2f}   "
                     f"corr(entropy, accuracy) {pearson(ent, acc):+.2f}")
    return "\n".join(lines)


def plot_traces(traces: dict[str, list[dict]], tasks: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(traces), 3, figsize=(15, 3.2 * len(traces)), squeeze=False)
    for row, (label, trace) in enumerate(traces.items()):
        steps = [p["step"] for p in trace]
        for t in tasks:
            axes[row, 0].plot(steps, [p["entropy"][t] for p in trace], label=t)
            axes[row, 1].plot(steps, [100 * p["accuracy"][t] for p in trace], label=t)
            axes[row, 2].plot(steps, [p["feature_norm"][t] for p in trace], label=t)
        axes[row, 0].set_title(f"{label}: mean entropy (eval split)", fontsize=9)
        axes[row, 1].set_title(f"{label}: accuracy % (eval split)", fontsize=9)
        axes[row, 2].set_title(f"{label}: mean feature norm", fontsize=9)
        for ax in axes[row]:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE (JSON value), got {item!r}")
        out[key] = json.loads(value)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--limit", type=int, default=None, help="evaluation examples per task (all by default)")
    ap.add_argument("--variants", default="lw,tw,lw++,tw++", help=f"comma list of {[*VARIANTS, ORACLE]}")
    ap.add_argument("--tasks", default=None, help="comma list: a subset of the zoo's tasks (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="AdaMergingConfig field override (JSON value); repeatable")
    ap.add_argument("--log-every", type=int, default=0, help="evaluate entropy and accuracy every N steps")
    ap.add_argument("--plot", default=None, help="PNG of the traces (with --log-every)")
    ap.add_argument("--out", default=None, help="JSON with the tables, timings and traces")
    ap.add_argument("--scale-invariant-heads", action="store_true",
                    help="tune through ScaleInvariantHead(head) (evaluation keeps the zoo's heads)")
    ap.add_argument("--coefficients-dir", default=None, help="save each variant's coefficients here")
    ap.add_argument("--ta-sweep", default=None, metavar="LAMS", help="comma list of lambdas (see above)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    unknown = [v for v in filter(None, args.variants.split(",")) if v not in VARIANTS and v != ORACLE]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {[*VARIANTS, ORACLE]}")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.overrides)
    zoo = Zoo.open(args.zoo)
    tasks = args.tasks.split(",") if args.tasks else zoo.tasks
    base = load_state_dict(zoo.pretrained_dir)
    experts = [load_state_dict(zoo.expert_dir(t)) for t in tasks]
    tvs = {t: task_vector(base, e) for t, e in zip(tasks, experts, strict=True)}
    heads = {t: zoo.head(t) for t in tasks}
    test = {t: zoo.load_task(t).test for t in tasks}
    unlabelled = {t: test[t].images for t in tasks}
    tuning_heads = heads
    if args.scale_invariant_heads:  # the scale is measured on the unlabelled inputs only
        scale = measure(zoo, base, tasks, args.limit, args.device)["feature_norm"]
        tuning_heads = {t: ScaleInvariantHead(heads[t], scale[t]) for t in tasks}

    def acc(weights):
        return measure(zoo, weights, tasks, args.limit, args.device)["accuracy"]

    rows = {"pretrained": acc(base)}
    expert_acc = {t: measure(zoo, e, [t], args.limit, args.device)["accuracy"][t]
                  for t, e in zip(tasks, experts, strict=True)}
    rows["experts"] = expert_acc
    rows["task_arithmetic(0.3)"] = acc(merge("task_arithmetic", base, experts, lam=0.3))
    rows["ties(k=0.2,mean,lam=1.0)"] = acc(merge("ties", base, experts, k=0.2, lam=1.0, agg="mean"))
    rows["ties(k=0.2,sum,lam=0.3)"] = acc(merge("ties", base, experts, k=0.2, lam=0.3, agg="sum"))
    if args.ta_sweep:
        print("Task Arithmetic line: lam, summed entropy (AdaMerging's objective), normalized accuracy (%)")
        for lam in (float(x) for x in args.ta_sweep.split(",")):
            m = measure(zoo, merge("task_arithmetic", base, experts, lam=lam), tasks, args.limit, args.device)
            norm = 100 * sum(m["accuracy"][t] / expert_acc[t] for t in tasks) / len(tasks)
            print(f"  {lam:4.2f}  {sum(m['entropy'].values()):.3f}  {norm:6.2f}", flush=True)
    traces: dict[str, list[dict]] = {}
    timings: dict[str, float] = {}
    for name in filter(None, args.variants.split(",")):
        mode, plus = VARIANTS.get(name, ("layer_wise", False))
        config = AdaMergingConfig(**{"mode": mode, "ties_filter": plus, "steps": args.steps, "lr": args.lr,
                                     **overrides})
        encoder = zoo.encoder()
        tap = MergedWeightsTap(encoder)
        trace: list[dict] = []

        def record(step, _total, _per_task, tap=tap, trace=trace):
            if args.log_every and step % args.log_every == 0 and tap.latest is not None:
                trace.append({"step": step, **measure(zoo, tap.latest, tasks, args.limit, args.device)})

        started = time.perf_counter()
        if name == ORACLE:
            labelled = {t: (test[t].images, test[t].labels) for t in tasks}
            c = tune_supervised(encoder, tvs, heads, labelled, config, args.device, on_step=record)
            summary = ""
        else:
            result = tune_coefficients(encoder, tvs, tuning_heads, unlabelled, config, device=args.device,
                                       on_step=record)
            c = result.coefficients
            summary = f"loss {result.loss[0]:.4f} -> {result.loss[-1]:.4f}, "
        seconds = time.perf_counter() - started
        label = name if name == ORACLE else f"adamerging{'++' if plus else ''} {mode}"
        if args.scale_invariant_heads and name != ORACLE:
            label += " (scale-inv heads)"
        if args.coefficients_dir:
            c.save(Path(args.coefficients_dir) / f"{name}.safetensors")
        final = apply_coefficients(base, [tvs[t] for t in tasks], c)
        final_metrics = measure(zoo, final, tasks, args.limit, args.device)
        rows[label] = final_metrics["accuracy"]
        timings[label] = seconds / max(config.steps, 1)
        if args.log_every:
            trace.append({"step": config.steps, **final_metrics})
            traces[label] = trace
        traced = ", trace evaluation included" if args.log_every else ""
        print(f"{label}: {seconds:.1f} s ({timings[label]:.3f} s/step{traced}), {summary}"
              f"coefficients min {float(c.values.min()):.3f} max {float(c.values.max()):.3f} "
              f"mean {float(c.values.mean()):.3f}, exact zeros {int((c.values == 0).sum())}/{c.values.numel()}",
              flush=True)
        if args.log_every:
            print(summarize_trace(label, trace, tasks), flush=True)
    normalized = {r: {t: v[t] / expert_acc[t] for t in tasks} for r, v in rows.items()}
    print("accuracy (%)\n" + format_accuracy_table(rows, tasks))
    print("normalized accuracy (% of the expert)\n" + format_accuracy_table(normalized, tasks))
    if args.plot and traces:
        plot_traces(traces, tasks, args.plot)
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"command": " ".join(sys.argv), "tasks": tasks, "accuracy": rows, "normalized": normalized,
             "seconds_per_step": timings, "traces": traces, "overrides": overrides}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
