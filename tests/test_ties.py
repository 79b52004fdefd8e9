"""TIES-Merging: hand-checked cases for every rule, and agreement with the official code."""

from __future__ import annotations

import pytest
import torch

import mergeflow


def _models(base: dict, taus: list[dict]) -> list[dict]:
    return [{k: base[k] + tau[k] if k in tau else base[k].clone() for k in base} for tau in taus]


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


BASE = {"a": torch.zeros(3), "b": torch.zeros(2)}
# d = 5. Task 0: |tau| = 1,3,2 | 2,0.5; k = 0.4 -> int(2.0) = 2, kk = 3, 3rd smallest = 2 -> keeps
# -3, 2 and 2 (both entries tied at the threshold). Task 1: all |tau| >= its 3rd smallest (1).
TAUS = [{"a": _t(1, -3, 2), "b": _t(2, 0.5)}, {"a": _t(-1, 1, -4), "b": _t(1, 1)}]
# Trimmed: t0 = [0,-3,2 | 2,0], t1 = [-1,1,-4 | 1,1]; sums [-1,-2,-2 | 3,1] -> signs [-,-,- | +,+].


@pytest.mark.parametrize("agg, a, b", [
    ("mean", [-1, -3, -4], [1.5, 1]),
    ("sum", [-1, -3, -4], [3, 1]),
    ("max", [-1, -3, -4], [2, 1]),
])
def test_global_trim_keeps_threshold_ties_and_each_agg(agg, a, b):
    out = mergeflow.merge("ties", BASE, _models(BASE, TAUS), k=0.4, lam=1.0, agg=agg)
    assert torch.equal(out["a"], _t(*a))
    assert torch.equal(out["b"], _t(*b))


def test_lam_scales_the_merged_vector():
    base = {"a": torch.ones(3), "b": torch.ones(2)}
    out = mergeflow.merge("ties", base, _models(base, TAUS), k=0.4, lam=0.5)
    assert torch.equal(out["a"], 1 + 0.5 * _t(-1, -3, -4))
    assert torch.equal(out["b"], 1 + 0.5 * _t(1.5, 1))


def test_exact_cancellation_takes_the_whole_model_majority_sign():
    base = {"w": torch.zeros(3)}
    # Entry 0 cancels exactly (2 - 2 = 0); entries 1, 2 vote +, so the majority is + and task 0's
    # +2 is the only agreeing entry there.
    pos = mergeflow.merge("ties", base, _models(base, [{"w": _t(2, 1, 1)}, {"w": _t(-2, 1, 1)}]), k=1.0)
    assert torch.equal(pos["w"], _t(2, 1, 1))
    neg = mergeflow.merge("ties", base, _models(base, [{"w": _t(2, -1, -1)}, {"w": _t(-2, -1, -1)}]), k=1.0)
    assert torch.equal(neg["w"], _t(-2, -1, -1))


def test_majority_counts_signs_over_every_tensor():
    # The cancelling entry lives in "w"; the votes that decide the majority are in "v".
    base = {"v": torch.zeros(3), "w": torch.zeros(1)}
    taus = [{"v": _t(-1, -1, -1), "w": _t(5)}, {"v": _t(-1, -1, -1), "w": _t(-5)}]
    out = mergeflow.merge("ties", base, _models(base, taus), k=1.0, agg="sum")
    assert torch.equal(out["w"], _t(-5))


def test_dead_parameters_count_in_d_and_stay_at_the_base():
    base = {"w": torch.zeros(4), "dead": torch.full((4,), 7.0)}
    tau = {"w": _t(4, 3, 2, 1), "dead": torch.zeros(4)}
    # d = 8, k = 0.25: int(2) = 2, kk = 6; |tau| sorted 0,0,0,0,1,2,3,4 -> threshold 2 -> keeps 4,3,2.
    out = mergeflow.merge("ties", base, _models(base, [tau]), k=0.25)
    assert torch.equal(out["w"], _t(4, 3, 2, 0))
    assert torch.equal(out["dead"], base["dead"])
    # Without the dead tensor, d = 4: kk = 3, threshold 3 -> keeps 4 and 3 only.
    alone = mergeflow.merge("ties", {"w": base["w"]}, [{"w": tau["w"]}], k=0.25)
    assert torch.equal(alone["w"], _t(4, 3, 0, 0))


def test_integer_and_bool_buffers_are_copied_from_the_base():
    base = {"w": torch.zeros(2), "ids": torch.arange(3), "flag": torch.tensor([True, False])}
    fts = [{"w": _t(1, 1), "ids": torch.zeros(3, dtype=torch.int64), "flag": torch.tensor([False, True])}]
    out = mergeflow.merge("ties", base, fts, k=1.0)
    assert torch.equal(out["ids"], base["ids"]) and torch.equal(out["flag"], base["flag"])


def test_per_tensor_scope_keeps_int_k_numel_per_tensor():
    base = {"big": torch.zeros(7), "small": torch.zeros(3)}
    tau = {"big": _t(7, 6, 5, 4, 3, 2, 1), "small": _t(9, 8, 7)}
    # k = 0.3: big keeps int(2.1) = 2 entries; small's int(0.9) = 0 becomes 1, its largest, as
    # mergekit's sparsify.magnitude keeps at least one entry of a non-empty tensor.
    out = mergeflow.merge("ties", base, _models(base, [tau]), k=0.3, trim_scope="tensor")
    assert torch.equal(out["big"], _t(7, 6, 0, 0, 0, 0, 0))
    assert torch.equal(out["small"], _t(9, 0, 0))
    # k = 0 keeps nothing: every tensor stays at the base.
    none = mergeflow.merge("ties", base, _models(base, [tau]), k=0.0, trim_scope="tensor")
    assert torch.equal(none["big"], torch.zeros(7)) and torch.equal(none["small"], torch.zeros(3))
    # The global trim over d = 10 keeps int(3.0) + 1 = 4 entries: 9, 8, 7 and 7.
    glob = mergeflow.merge("ties", base, _models(base, [tau]), k=0.3)
    assert torch.equal(glob["small"], _t(9, 8, 7))
    assert torch.equal(glob["big"], _t(7, 0, 0, 0, 0, 0, 0))


def test_tensor_scope_keeps_ties_at_the_threshold():
    base = {"w": torch.zeros(5)}
    out = mergeflow.merge("ties", base, [{"w": _t(1, 2, 2, 2, 3)}], k=0.4, trim_scope="tensor")
    assert torch.equal(out["w"], _t(0, 2, 2, 2, 3))  # 2 kept by rank, all three 2s tie


def test_k_one_keeps_everything_and_k_zero_keeps_the_largest():
    base = {"w": torch.zeros(4)}
    tau = [{"w": _t(0.1, -0.2, 0.3, -0.4)}]
    assert torch.equal(mergeflow.merge("ties", base, tau, k=1.0)["w"], tau[0]["w"])
    assert torch.equal(mergeflow.merge("ties", base, tau, k=0.0)["w"], _t(0, 0, 0, -0.4))


def test_per_task_lam_applies_before_the_election():
    base = {"w": torch.zeros(2)}
    taus = [{"w": _t(1, 1)}, {"w": _t(-3, 1)}]
    # lam = [4, 1]: scaled trimmed [4, 4] and [-3, 1]; signs +, +; mean of agreeing: 4 and 2.5.
    out = mergeflow.merge("ties", base, _models(base, taus), k=1.0, lam=[4.0, 1.0])
    assert torch.equal(out["w"], _t(4, 2.5))
    # Without the coefficients task 1 wins entry 0.
    assert torch.equal(mergeflow.merge("ties", base, _models(base, taus), k=1.0)["w"], _t(-3, 1))
    with pytest.raises(ValueError, match="3 lam values for 2"):
        mergeflow.merge("ties", base, _models(base, taus), lam=[1.0, 1.0, 1.0])


def test_invalid_hyperparameters_name_the_field():
    with pytest.raises(ValueError, match="agg"):
        mergeflow.merge("ties", BASE, _models(BASE, TAUS), agg="median")
    with pytest.raises(ValueError, match="k"):
        mergeflow.merge("ties", BASE, _models(BASE, TAUS), k=1.5)


# ---- agreement with a literal transcription of the official code (prateeky2806/ties-merging) ----

def _official_ties(flat: torch.Tensor, k: float, agg: str) -> torch.Tensor:
    n, d = flat.shape
    kk = d - int(d * k)
    kth = flat.abs().kthvalue(kk, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = trimmed * torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    if agg == "mean":
        return selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
    if agg == "sum":
        return selected.sum(dim=0)
    return selected.abs().max(dim=0)[0] * sign


@pytest.mark.parametrize("agg", ["mean", "sum", "max"])
def test_matches_the_official_flattened_code(agg):
    g = torch.Generator().manual_seed(3)
    shapes = {"b.bias": (5,), "a.weight": (6, 4), "c.norm": (3,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    # Deltas on a coarse grid, so magnitudes tie and sums cancel exactly.
    taus = [{k: torch.randint(-3, 4, s, generator=g).float() / 4 for k, s in shapes.items()} for _ in range(3)]
    fts = _models(base, taus)
    out = mergeflow.merge("ties", base, fts, k=0.3, lam=0.7, agg=agg)
    keys = sorted(shapes)  # the official code flattens in sorted key order
    flat = torch.stack([torch.cat([(ft[k] - base[k]).reshape(-1) for k in keys]) for ft in fts])
    expected = torch.cat([base[k].reshape(-1) for k in keys]) + 0.7 * _official_ties(flat, 0.3, agg)
    got = torch.cat([out[k].reshape(-1) for k in keys])
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_weighted_mean_divides_by_the_agreeing_lams():
    base = {"w": torch.zeros(4)}
    fts = [{"w": torch.tensor([1.0, 2.0, -3.0, 0.0])}, {"w": torch.tensor([3.0, -1.0, -1.0, 2.0])}]
    out = mergeflow.merge("ties", base, fts, k=1.0, lam=[0.7, 0.3], agg="weighted_mean")
    # lam-scaled: [0.7, 1.4, -2.1, 0] and [0.9, -0.3, -0.3, 0.6]; elected +, +, -, +
    # (0.7 + 0.9) / 1.0, 1.4 / 0.7, -(2.1 + 0.3) / 1.0, 0.6 / 0.3
    assert torch.allclose(out["w"], torch.tensor([1.6, 2.0, -2.4, 2.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="give lam as a list"):
        mergeflow.merge("ties", base, fts, k=1.0, lam=0.5, agg="weighted_mean")


def test_weighted_mean_is_mergekits_normalized_ties():
    # mergekit's ties, normalize: true, unequal weights: sum_i(w t m) / sum_i(w m), m = agreeing
    # with the sign of sum_i w t (no exact zero sums in continuous data).
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(40, 30, generator=g)}
    fts = [{"w": base["w"] + torch.randn(40, 30, generator=g)} for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    out = mergeflow.merge("ties", base, fts, k=0.4, lam=weights, agg="weighted_mean", trim_scope="tensor")
    deltas = torch.stack([ft["w"] - base["w"] for ft in fts]).reshape(3, -1)
    keep = int(0.4 * deltas.shape[1])
    trimmed = torch.stack([torch.zeros_like(d).scatter_(0, d.abs().argsort(descending=True)[:keep],
                                                        d[d.abs().argsort(descending=True)[:keep]])
                           for d in deltas])
    weighted = trimmed * torch.tensor(weights).unsqueeze(1)
    mask = weighted.sign() == torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    divisor = (torch.tensor(weights).unsqueeze(1) * mask).sum(0)
    expected = base["w"].reshape(-1) + (weighted * mask).sum(0) / torch.where(divisor == 0, 1.0, divisor)
    assert torch.allclose(out["w"].reshape(-1), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_nonzero_positions_matches_torch_nonzero(dtype):
    # The engine's fast path (numpy on the CPU) must agree with torch: -0.0 is zero, NaN is not.
    from mergeflow.methods.base import nonzero_positions

    flat = torch.tensor([0.0, -0.0, 1.5, float("nan"), 0.0, -2.0, float("inf")]).to(dtype)
    assert torch.equal(nonzero_positions(flat), flat.nonzero().squeeze(1))


@pytest.mark.parametrize("agg", ["mean", "sum", "max"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_signed_zeros_match_the_official_code_bit_for_bit(agg, seed):
    """Where the base is -0.0 the sign of a zero aggregate shows in theta_0 + lam * tau_m; the
    official code's signed zeros (|selected|.max() is +0.0, say) must come out the same."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (8, 6), "b.bias": (12,)}
    base = {k: torch.randint(-2, 3, s, generator=g).float() / 2 for k, s in shapes.items()}
    base = {k: torch.where(v == 0, -0.0, v) for k, v in base.items()}
    taus = [{k: torch.randint(-2, 3, s, generator=g).float() / 4 for k, s in shapes.items()} for _ in range(3)]
    fts = _models(base, taus)
    keys = sorted(shapes)
    flat = torch.stack([torch.cat([(ft[k] - base[k]).reshape(-1) for k in keys]) for ft in fts])
    expected = torch.cat([base[k].reshape(-1) for k in keys]) + 0.7 * _official_ties(flat, 0.4, agg)
    out = mergeflow.merge("ties", base, fts, k=0.4, lam=0.7, agg=agg)
    got = torch.cat([out[k].reshape(-1) for k in keys])
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
