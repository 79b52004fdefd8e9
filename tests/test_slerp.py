"""SLERP: endpoints, a hand-computed midpoint, the parallel fallback, exactly two models."""

from __future__ import annotations

import math

import pytest
import torch

import mergeflow


def _pair(v0: list[float], v1: list[float]) -> tuple[dict, list[dict]]:
    base = {"w": torch.zeros(len(v0)), "ids": torch.arange(3)}
    return base, [{"w": torch.tensor(v0), "ids": torch.arange(3) + 1}, {"w": torch.tensor(v1), "ids": torch.arange(3) + 2}]


def test_endpoints_are_the_models():
    base, fts = _pair([0.3, -1.2, 2.0], [1.0, 0.5, -0.7])
    assert torch.equal(mergeflow.merge("slerp", base, fts, t=0.0)["w"], fts[0]["w"])
    assert torch.equal(mergeflow.merge("slerp", base, fts, t=1.0)["w"], fts[1]["w"])
    assert torch.equal(mergeflow.merge("slerp", base, fts, t=0.5)["ids"], base["ids"])


def test_midpoint_of_orthogonal_unit_vectors():
    base, fts = _pair([1.0, 0.0], [0.0, 1.0])
    out = mergeflow.merge("slerp", base, fts, t=0.5)["w"]
    # omega = pi/2: both coefficients are sin(pi/4) / sin(pi/2) = sqrt(2)/2.
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-7)
    # t = 1/3: coefficients sin(pi/3) and sin(pi/6).
    third = mergeflow.merge("slerp", base, fts, t=1 / 3)["w"]
    assert torch.allclose(third, torch.tensor([math.sqrt(3) / 2, 0.5]), atol=1e-6)


def test_norms_are_interpolated_on_the_arc_not_the_chord():
    base, fts = _pair([2.0, 0.0], [0.0, 2.0])
    out = mergeflow.merge("slerp", base, fts, t=0.5)["w"]
    assert abs(out.norm().item() - 2.0) < 1e-6  # linear interpolation would give sqrt(2)


def test_nearly_parallel_tensors_fall_back_to_linear_interpolation():
    base, fts = _pair([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    out = mergeflow.merge("slerp", base, fts, t=0.25)["w"]
    assert torch.allclose(out, 0.75 * fts[0]["w"] + 0.25 * fts[1]["w"])


def test_needs_exactly_two_models():
    base, fts = _pair([1.0], [2.0])
    with pytest.raises(ValueError, match="2"):
        mergeflow.merge("slerp", base, fts + [fts[0]], t=0.5)
