"""MuDSC's matching loop: activation-initialised matrices, then iterative weight-aware refinement.

1. With activation similarity (alpha < 1), every point is first matched on S_act alone;
   weight-only matching (alpha = 1) starts from the identity (unit i of every model together).
2. Each iteration visits the points in a seeded random order; for point p it recomputes S_weight
   given the current matrices of all other points, matches S = alpha S_w + (1 - alpha) S_act,
   and records the mean similarity of the chosen merges. The best iteration (mean over points)
   is kept, and an iteration that does not beat it is undone (the next starts from the best),
   as in the official code; the loop stops after `patience` iterations without improvement or
   `max_iter`.
With alpha = 0 (ZipIt!) the weights never enter, so step 1 is the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergeflow.mudsc.apply import Matrices, unit_vectors
from mergeflow.mudsc.graph import MergeGraph
from mergeflow.mudsc.matching import match, merge_unmerge
from mergeflow.mudsc.similarity import mix, weight_correlation


@dataclass
class MatchingResult:
    matrices: list[tuple[torch.Tensor, torch.Tensor]]  # per point: (merge, unmerge)
    assignments: list[torch.Tensor]
    objective: float  # mean similarity of chosen merges, best iteration
    history: list[float]  # objective of each iteration (empty without refinement)


def identity_assignment(size: int, num_models: int) -> torch.Tensor:
    return torch.arange(size).repeat(num_models)


def solve(state_dicts: Sequence[Mapping[str, torch.Tensor]], graph: MergeGraph,
          s_act: Sequence[torch.Tensor] | None, *, alpha: float, matcher: str, a: float, b: float,
          max_iter: int = 100, patience: int = 5, seed: int = 0, progress: bool = False) -> MatchingResult:
    """Match every merge point; see the module docstring."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha < 1 and s_act is None:
        raise ValueError("activation similarity is needed for alpha < 1")
    m = len(state_dicts)
    points = graph.points

    def solve_point(p: int, mats: Matrices) -> tuple[torch.Tensor, float]:
        s_w = weight_correlation(unit_vectors(state_dicts, graph, mats, p)) if alpha > 0 else None
        sim = mix(s_w, None if s_act is None else s_act[p], alpha)
        return match(sim, m, points[p].group_size, matcher, a, b)

    if alpha < 1:
        assigns = [match(s_act[p], m, pt.group_size, matcher, a, b)[0] for p, pt in enumerate(points)]
    else:
        assigns = [identity_assignment(pt.size, m) for pt in points]
    mats = [merge_unmerge(x, m) for x in assigns]
    if alpha == 0:
        values = [match(s_act[p], m, pt.group_size, matcher, a, b)[1] for p, pt in enumerate(points)]
        return MatchingResult(mats, assigns, sum(values) / len(values), [])

    order_generator = torch.Generator().manual_seed(seed)  # the official visiting order for a seed
    best, best_assigns, best_obj, history, stale = list(mats), list(assigns), float("-inf"), [], 0
    iterations = range(max_iter)
    if progress:
        from tqdm import tqdm

        iterations = tqdm(iterations, desc="refine", leave=False)
    for _ in iterations:
        values = {}
        for p in torch.randperm(len(points), generator=order_generator).tolist():
            assigns[p], values[p] = solve_point(p, mats)
            mats[p] = merge_unmerge(assigns[p], m)
        objective = sum(values.values()) / len(values)
        history.append(objective)
        if objective > best_obj:
            best, best_assigns, best_obj, stale = list(mats), list(assigns), objective, 0
        else:
            stale += 1
            if stale >= patience:
                break
            mats, assigns = list(best), list(best_assigns)  # as the official code: go on from the best
    return MatchingResult(best, best_assigns, best_obj, history)
