"""Benchmark the in-memory contract `mergeflow.merge` on state dicts, as FusionBench users call it.

A CLIP-shaped model (110M parameters in float32: 12 blocks of ViT-B attention and MLP
weights plus CLIP's 49408 x 512 token embedding, random values) and T fine-tunes (base + small random deltas)
are built in memory; each method runs in its own process, so its peak RSS is its own. The
table shows wall time and the peak RSS above the inputs (base + T fine-tunes, which the caller
holds anyway).

    python bench/bench_in_memory.py              # 8 tasks, the usual vision setting
    python bench/bench_in_memory.py --tasks 4 --blocks 6
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = {
    "task_arithmetic": {"lam": 0.3},
    "ties": {"k": 0.2, "lam": 0.3},
    "dare_ties": {"p": 0.9, "lam": 0.3, "seed": 0},
    "pcb": {"ratio": 0.1},
}


def build(tasks: int, blocks: int) -> tuple[dict, list[dict]]:
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = {"token_embedding.weight": (49408, 512)}
    for b in range(blocks):
        shapes |= {f"blocks.{b}.attn.in_proj_weight": (2304, 768), f"blocks.{b}.attn.in_proj_bias": (2304,),
                   f"blocks.{b}.attn.out_proj.weight": (768, 768), f"blocks.{b}.mlp.c_fc.weight": (3072, 768),
                   f"blocks.{b}.mlp.c_proj.weight": (768, 3072), f"blocks.{b}.ln_1.weight": (768,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    finetuned = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(tasks)]
    return base, finetuned


def child(method: str, tasks: int, blocks: int) -> None:
    import mergeflow

    base, finetuned = build(tasks, blocks)
    inputs_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    mergeflow.merge(method, base, finetuned, **CASES[method])
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(v.numel() for v in base.values())
    print(json.dumps({"method": method, "wall_s": wall, "extra_rss": peak - inputs_rss, "params": params}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.tasks, a.blocks)
        return
    rows = []
    for method in a.cases.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--tasks", str(a.tasks),
                               "--blocks", str(a.blocks)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"{method} failed (exit status {proc.returncode})")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    inputs_gib = rows[0]["params"] * 4 * (a.tasks + 1) / 2**30
    print(f"\nin-memory merge: {rows[0]['params'] / 1e6:.0f}M parameters (float32), {a.tasks} fine-tunes; "
          f"the inputs take {inputs_gib:.1f} GiB")
    print(f"{'method':<18}{'wall s':>9}{'peak RSS above the inputs, GiB':>32}")
    for r in rows:
        print(f"{r['method']:<18}{r['wall_s']:>9.2f}{r['extra_rss'] / 2**30:>32.2f}")


if __name__ == "__main__":
    main()
