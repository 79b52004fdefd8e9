"""Model-level merge methods: they need the models' graphs and data, not just their tensors,
so they live beside the tensorwise registry (`mergeflow.methods`) rather than in it.
`mergeflow methods` lists them after the tensorwise ones."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from mergeflow.methods.base import Hyperparams


class ZipParams(Hyperparams):
    a: float = Field(0.5, description="zip merge discount (ZipIt!'s alpha; ZipIt! paper 0.3)")
    b: float = Field(1.0, ge=0, description="zip same-model budget (ZipIt!'s beta; ZipIt! paper 0.125)")


class MudscParams(ZipParams):
    matcher: Literal["zip", "permute"] = Field("zip", description="greedy zip or Hungarian alignment")
    alpha: float = Field(0.5, ge=0, le=1, description="weight-space share: S = alpha S_w + (1-alpha) S_act")
    max_iter: int = Field(100, ge=1, description="refinement iterations at most")
    patience: int = Field(5, ge=1, description="stop after this many iterations without improvement")
    seed: int = Field(0, description="seed of the refinement loop's point order")


class ZipitParams(ZipParams):
    matcher: Literal["zip", "permute"] = Field("zip", description="zip, or permute (activation alignment)")


class WeightMatchingParams(Hyperparams):
    max_iter: int = Field(100, ge=1, description="refinement iterations at most")
    patience: int = Field(5, ge=1, description="stop after this many iterations without improvement")
    seed: int = Field(0, description="seed of the refinement loop's point order")


@dataclass(frozen=True)
class ModelMethod:
    name: str
    summary: str
    paper: str
    hyperparams: type[Hyperparams]
    fn: Callable


def _mudsc(models, images, p: MudscParams, stats):
    from mergeflow.mudsc.merge import mudsc

    return mudsc(models, images, **p.model_dump(), stats=stats)


def _zipit(models, images, p: ZipitParams, stats):
    from mergeflow.mudsc.merge import zipit

    return zipit(models, images, **p.model_dump(), stats=stats)


def _weight_matching(models, images, p: WeightMatchingParams, stats):
    from mergeflow.mudsc.merge import weight_matching

    return weight_matching(models, images, **p.model_dump())


def _average(models, images, p: Hyperparams, stats):
    from mergeflow.mudsc.merge import naive_average

    return naive_average(models, images)


MODEL_METHODS = {m.name: m for m in [
    ModelMethod("mudsc", "unit matching on weight+activation similarity, zip or permute (different inits)",
                "Xu et al., Training-Free Pretrained Model Merging, CVPR 2024", MudscParams, _mudsc),
    ModelMethod("zipit", "unit matching on activation correlation, greedy zip (different inits)",
                "Stoica et al., ZipIt! Merging Models from Different Tasks without Training, ICLR 2024",
                ZipitParams, _zipit),
    ModelMethod("weight_matching", "Hungarian unit alignment on weight correlation (different inits)",
                "Ainsworth et al., Git Re-Basin, ICLR 2023", WeightMatchingParams, _weight_matching),
    ModelMethod("naive_average", "average unit i of every model, no matching (baseline)",
                "baseline", Hyperparams, _average),
]}


def run_method(name: str, models: Sequence[torch.nn.Module], images: torch.Tensor,
               hyperparams: Mapping[str, Any], stats=None):
    """Validate `hyperparams` (unknown names are errors) and run the model-level method."""
    if name not in MODEL_METHODS:
        raise ValueError(f"unknown model-level method {name!r}; available: {', '.join(MODEL_METHODS)}")
    method = MODEL_METHODS[name]
    return method.fn(models, images, method.hyperparams(**hyperparams), stats)
