"""MuDSC cost versus model width: activation collection, zip and permute matching (activation
similarity, all merge points), and one weight-aware refinement iteration.

    python bench/bench_mudsc.py [--family mlp] [--widths 32 64 128 256 512] [--images 1000]

Random-init pairs suffice (cost does not depend on training); one thread, as on the shared CPU.
Ratios within one run are what to compare: the machine is shared.
"""

from __future__ import annotations

import argparse
import time

import torch

from mergeflow.mudsc.activations import collect_moments
from mergeflow.mudsc.graph import build_graph
from mergeflow.mudsc.matching import match
from mergeflow.mudsc.models import build_backbone
from mergeflow.mudsc.refine import solve
from mergeflow.mudsc.similarity import activation_correlation


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench(family: str, width: int, images: torch.Tensor) -> dict[str, float]:
    backbones = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        backbones.append(build_backbone(family, width).eval())
    graph = build_graph(backbones[0], images[:2])
    moments, t_act = timed(lambda: collect_moments(backbones, graph, images))
    s_act = [activation_correlation(m) for m in moments]
    row = {"points": len(graph.points), "units": sum(p.size for p in graph.points), "activations s": t_act}
    for matcher in ("zip", "permute"):
        _, row[f"{matcher} s"] = timed(lambda m=matcher: [match(s, 2, p.group_size, m) for s, p in zip(s_act, graph.points, strict=True)])
    sds = [b.state_dict() for b in backbones]
    _, row["refine iter s"] = timed(lambda: solve(sds, graph, s_act, alpha=0.5, matcher="zip", a=0.5, b=1.0,
                                                  max_iter=1, patience=1))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="mlp")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = torch.randn(args.images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    print(f"family {args.family}, {args.images} images, 2 models")
    cols = ["points", "units", "activations s", "zip s", "permute s", "refine iter s"]
    print(f"{'width':>6} " + " ".join(f"{c:>14}" for c in cols))
    for width in args.widths:
        row = bench(args.family, width, images)
        print(f"{width:>6} " + " ".join(f"{row[c]:>14.3f}" if isinstance(row[c], float) else f"{row[c]:>14}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
