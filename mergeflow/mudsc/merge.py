"""Public entry: merge classifiers trained from different initialisations.

    result = mudsc([model_a, model_b], images)                 # zip, alpha = 0.5
    result = mudsc(models, images, matcher="permute", alpha=0.3)
    result = zipit(models, images)                             # activation only (alpha = 0)
    result = weight_matching(models, images)                   # weight only, Hungarian
    result.model(x)  # merged backbone + every model's own head; logits over all their classes

Each model is a `Classifier` (a `backbone` and a `head`); backbones share one architecture.
`images` are unlabelled training images: activation statistics and the BatchNorm resets use them.

The heads stay out of the weight-space similarity. Each model's head is over its own task's
classes, so column c of one head and column c of another are unrelated classes; the official
code adds the head's input columns to the backbone output's unit vectors (unless `ignore_head`),
which compares like with like only when every model has the same classes. Each head is then
unmerged onto the merged features (W_k U_k), never averaged.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergeflow.mudsc.activations import Moments, collect_moments
from mergeflow.mudsc.apply import merge_state_dicts, unmerge_head
from mergeflow.mudsc.bn_reset import has_batchnorm, reset_bn_stats
from mergeflow.mudsc.graph import MergeGraph, build_graph
from mergeflow.mudsc.matching import merge_unmerge
from mergeflow.mudsc.models import MultiHeadModel
from mergeflow.mudsc.refine import MatchingResult, identity_assignment, solve
from mergeflow.mudsc.similarity import activation_correlation


@dataclass
class MergeResult:
    model: MultiHeadModel
    graph: MergeGraph
    matching: MatchingResult | None  # None for the plain average


def _check_models(models: Sequence[nn.Module]) -> None:
    if len(models) < 2:
        raise ValueError(f"merging needs at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(getattr(m, "backbone", None), nn.Module) or not isinstance(getattr(m, "head", None), nn.Linear):
            raise TypeError(f"model {i} must have a `backbone` module and a Linear `head` (see mudsc.models.Classifier)")
    ref = {k: v.shape for k, v in models[0].backbone.state_dict().items()}
    for i, m in enumerate(models[1:], start=1):
        other = {k: v.shape for k, v in m.backbone.state_dict().items()}
        if other != ref:
            diff = sorted(set(ref.items()) ^ set(other.items()))[:3]
            raise ValueError(f"model {i}'s backbone differs from model 0's (first differences: {diff})")


def _checked_graph(models: Sequence[nn.Module], images: torch.Tensor) -> MergeGraph:
    """Same architecture, supported modules: checked before any pass over the data."""
    _check_models(models)
    return build_graph(models[0].backbone, images[:2])


def prepare_backbones(models: Sequence[nn.Module], images: torch.Tensor, reset_bn: bool = True) -> list[nn.Module]:
    """Copies of the backbones in eval mode, BatchNorm statistics re-estimated on `images`."""
    backbones = [copy.deepcopy(m.backbone) for m in models]
    for b in backbones:
        if reset_bn and has_batchnorm(b):
            reset_bn_stats(b, images)
        b.eval()
    return backbones


def activation_stats(models: Sequence[nn.Module], images: torch.Tensor, batch_size: int = 256,
                     progress: bool = False) -> list[Moments]:
    """Per-merge-point moments of the models' concatenated features (the cacheable step)."""
    graph = _checked_graph(models, images)
    backbones = prepare_backbones(models, images)
    return collect_moments(backbones, graph, images, batch_size, progress)


def _assemble(models: Sequence[nn.Module], backbones: Sequence[nn.Module], graph: MergeGraph, mats,
              images: torch.Tensor, reset_bn: bool) -> MultiHeadModel:
    merged = copy.deepcopy(backbones[0])
    merged.load_state_dict(merge_state_dicts([b.state_dict() for b in backbones], graph, mats))
    if reset_bn and has_batchnorm(merged):
        reset_bn_stats(merged, images)
    heads = []
    for k, m in enumerate(models):
        head = copy.deepcopy(m.head)
        with torch.no_grad():
            head.weight.copy_(unmerge_head(m.head.weight, graph, mats, k))
        heads.append(head)
    return MultiHeadModel(merged, heads, [list(m.classes) for m in models]).eval()


def merge_models(models: Sequence[nn.Module], images: torch.Tensor, *, matcher: str = "zip",
                 alpha: float = 0.5, a: float = 0.5, b: float = 1.0, max_iter: int = 100,
                 patience: int = 5, seed: int = 0, stats: Sequence[Moments] | None = None,
                 reset_bn: bool = True, progress: bool = False) -> MergeResult:
    """MuDSC: match units on S = alpha S_weight + (1 - alpha) S_act, merge, reset BatchNorm.

    matcher: "zip" (ZipIt! greedy, discount `a`, same-model budget `b`) or "permute"
    (Hungarian). `stats`: precomputed `activation_stats(models, images)` (else computed here).
    """
    if matcher not in ("zip", "permute"):
        raise ValueError(f"unknown matcher {matcher!r}; use 'zip' or 'permute'")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    graph = _checked_graph(models, images)
    backbones = prepare_backbones(models, images, reset_bn)
    s_act = None
    if alpha < 1:
        if stats is None:
            stats = collect_moments(backbones, graph, images, progress=progress)
        if len(stats) != len(graph.points):
            raise ValueError(f"stats have {len(stats)} merge points, the model has {len(graph.points)}")
        s_act = [activation_correlation(s) for s in stats]
    result = solve([bb.state_dict() for bb in backbones], graph, s_act, alpha=alpha, matcher=matcher,
                   a=a, b=b, max_iter=max_iter, patience=patience, seed=seed, progress=progress)
    return MergeResult(_assemble(models, backbones, graph, result.matrices, images, reset_bn), graph, result)


def mudsc(models: Sequence[nn.Module], images: torch.Tensor, matcher: str = "zip", alpha: float = 0.5,
          **kwargs) -> MergeResult:
    """MuDSC (Xu et al., CVPR 2024): dual-space similarity, zip or permute matcher."""
    return merge_models(models, images, matcher=matcher, alpha=alpha, **kwargs)


def zipit(models: Sequence[nn.Module], images: torch.Tensor, **kwargs) -> MergeResult:
    """ZipIt! (Stoica et al., 2024): activation similarity only, greedy zip."""
    return merge_models(models, images, matcher=kwargs.pop("matcher", "zip"), alpha=0.0, **kwargs)


def weight_matching(models: Sequence[nn.Module], images: torch.Tensor, **kwargs) -> MergeResult:
    """Git Re-Basin weight matching (Ainsworth et al., 2023): weight similarity only, Hungarian."""
    return merge_models(models, images, matcher=kwargs.pop("matcher", "permute"), alpha=1.0, **kwargs)


def naive_average(models: Sequence[nn.Module], images: torch.Tensor, reset_bn: bool = True) -> MergeResult:
    """Baseline: unit i of every model averaged with no matching (BatchNorm reset like the rest)."""
    graph = _checked_graph(models, images)
    backbones = prepare_backbones(models, images, reset_bn)
    mats = [merge_unmerge(identity_assignment(p.size, len(models)), len(models)) for p in graph.points]
    return MergeResult(_assemble(models, backbones, graph, mats, images, reset_bn), graph, None)
