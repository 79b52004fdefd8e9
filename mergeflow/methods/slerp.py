"""SLERP: spherical linear interpolation between two models, tensor by tensor (as mergekit).

For each float tensor, with v0 = model 0 and v1 = model 1 (the base is not used; mergekit's
`base_model` is the t = 0 end, which a recipe expresses by listing it first):
  dot = <v0/|v0|, v1/|v1|> (a norm below 1e-8 leaves the vector as is);
  if |dot| > 0.9995 the tensors are nearly parallel and the result is the linear
  interpolation (1 - t) v0 + t v1; otherwise, with omega = arccos(dot),
  result = sin((1 - t) omega) / sin(omega) * v0 + sin(t omega) / sin(omega) * v1.
The dot product and the coefficients are computed in float64; t = 0 and t = 1 give v0 and v1.
mergekit computes them in float32, so its outputs differ from these by a few ulps on small
tensors and by hundreds on tensors of ~10**6 entries, where a float32 dot product loses the most:
on a small Llama, mergekit's were up to 1.66e-6 from a float64 reference, mergeflow's 7e-9.
mergekit's float32 sums also change with the number of threads torch uses; float64 keeps these
stable.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mergeflow.methods.base import GlobalStats, Hyperparams, TensorGroup
from mergeflow.methods.registry import register

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


class SlerpParams(Hyperparams):
    t: float = Field(0.5, ge=0.0, le=1.0, description="interpolation factor: 0 gives model 0, 1 gives model 1")


def slerp_coefficients(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[float, float]:
    """(c0, c1) with result = c0 * v0 + c1 * v1."""
    a, b = v0.reshape(-1).to(torch.float64), v1.reshape(-1).to(torch.float64)
    na, nb = a.norm().item(), b.norm().item()
    dot = torch.dot(a, b).item() / ((na if na > NORM_EPS else 1.0) * (nb if nb > NORM_EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(max(-1.0, min(1.0, dot)))
    sin_omega = math.sin(omega)
    return math.sin(omega - omega * t) / sin_omega, math.sin(omega * t) / sin_omega


@register(
    "slerp",
    hyperparams=SlerpParams,
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985 (as used by mergekit)",
    summary="spherical interpolation between exactly two models, per tensor",
    min_models=2,
    max_models=2,
    task_vectors=False,
)
def slerp(group: TensorGroup, params: SlerpParams, stats: GlobalStats) -> torch.Tensor:
    v0, v1 = group.models[0], group.models[1]
    if params.t == 0.0:
        return v0.clone()
    if params.t == 1.0:
        return v1.clone()
    c0, c1 = slerp_coefficients(v0, v1, params.t)
    return c0 * v0 + c1 * v1
