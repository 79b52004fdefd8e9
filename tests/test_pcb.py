"""PCB-Merging: the registered method against a literal transcription of the official flattened code,
plus hand-checkable cases for every step."""

from __future__ import annotations

import math

import pytest
import torch

from mergeflow.merging import global_stats, merge
from mergeflow.methods import TensorGroup, get_method
from mergeflow.methods.pcb import (
    CLIP_HIGH,
    CLIP_LOW,
    SCORE_CUT,
    SCORE_MAX,
    TANH_IS_IDENTITY_BELOW,
    clipped_and_scale,
    tanh_,
)

# ---- the official code, transcribed literally (flatten, sort, clamp, normalize, ...) -----------


def _flatten(sd):
    return torch.cat([sd[k].reshape(-1) for k in sorted(sd)])


def _unflatten(vec, like):
    out, at = {}, 0
    for k in sorted(like):
        size = like[k].numel()
        out[k] = vec[at : at + size].reshape(like[k].shape)
        at += size
    return out


def _normalize(x, dim=0):
    min_values, _ = torch.min(x, dim=dim, keepdim=True)
    max_values, _ = torch.max(x, dim=dim, keepdim=True)
    return (x - min_values) / (max_values - min_values)


def _clamp(x, min_ratio=0, max_ratio=0):
    d = x.size(1)
    sorted_x, _ = torch.sort(x, dim=1)
    low = sorted_x[:, int(d * min_ratio)].unsqueeze(1)
    high = sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    return torch.clamp(x, low, high)


def official_pcb(base, finetuned, ratio=0.1, lam=1.0, variant="nlp", clip=0.01):
    flat_ptm = _flatten(base)
    all_checks = torch.stack([_flatten(sd) - flat_ptm for sd in finetuned])
    n, d = all_checks.shape
    all_checks_abs = _clamp(torch.abs(all_checks), min_ratio=clip, max_ratio=clip)
    clamped_all_checks = torch.sign(all_checks) * all_checks_abs
    intra = torch.exp(n * _normalize(all_checks_abs, 1) ** 2)
    if variant == "nlp":
        inter = torch.tanh(all_checks * torch.sum(all_checks, dim=0))
    else:
        normalized = torch.sign(all_checks) * _normalize(all_checks_abs, dim=1)
        if variant == "vision":
            inter = torch.tanh(all_checks * torch.sum(normalized, dim=0))
        else:  # pcb_ES.py
            inter = torch.vstack([torch.sum(torch.tanh(normalized[i] * normalized), dim=0) for i in range(n)])
    balancing = intra * inter
    scale = _normalize(_clamp(balancing, 1 - ratio, 0), dim=1)
    if variant == "nlp":
        tvs = clamped_all_checks
        merged_tv = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
        merged = flat_ptm + lam * merged_tv
    else:
        lams = torch.tensor(lam if isinstance(lam, list) else [lam] * n).unsqueeze(1)
        tvs = clamped_all_checks * lams
        merged_tv = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
        merged = flat_ptm + merged_tv
    return _unflatten(merged, base)


# ---- inputs --------------------------------------------------------------------------------------

# d = 512: torch.sum(dim=0) in the official code adds the last d mod 32 columns in another order
# (see pcb.sum_over_tasks); with d a multiple of 32 the comparison can be bitwise.
SHAPES = {"w.a": (13, 7), "b.bias": (5,), "c.conv": (3, 4, 6), "d.scalar": (1,), "e.long": (343,)}


def random_models(n, seed, shapes=SHAPES, spread=None):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    finetuned = []
    for i in range(n):
        scale = 0.01 * (1 + i) if spread is None else spread[i]
        finetuned.append({k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()})
    return base, finetuned


def _stats(base, finetuned, **hp):
    m = get_method("pcb")
    params = m.params(**hp)
    groups = [
        TensorGroup(k, base[k].float(), torch.stack([sd[k].float() for sd in finetuned])) for k in sorted(base)
    ]
    return params, groups, global_stats(m, params, lambda: groups)


# ---- exactness against the official code ---------------------------------------------------------


@pytest.mark.parametrize("variant", ["nlp", "vision", "vision_es"])
@pytest.mark.parametrize(
    "n,ratio,clip,lam,seed",
    [(3, 0.1, 0.01, 1.0, 0), (5, 0.3, 0.0001, 1.7, 1), (2, 0.05, 0.1, 0.8, 2), (4, 1.0, 0.0, 1.2, 3)],
)
def test_matches_official_code_bitwise(variant, n, ratio, clip, lam, seed):
    base, finetuned = random_models(n, seed)
    ours = merge("pcb", base, finetuned, ratio=ratio, lam=lam, variant=variant, clip=clip)
    ref = official_pcb(base, finetuned, ratio=ratio, lam=lam, variant=variant, clip=clip)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


@pytest.mark.parametrize("variant", ["vision", "vision_es"])
def test_per_task_lams_match_official_vision_code(variant):
    base, finetuned = random_models(4, 7)
    lams = [0.8, 1.3, 1.05, 1.2]
    ours = merge("pcb", base, finetuned, ratio=0.2, lam=lams, variant=variant)
    ref = official_pcb(base, finetuned, ratio=0.2, lam=lams, variant=variant)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def test_bf16_storage_is_merged_in_fp32_and_cast_back():
    base, finetuned = random_models(3, 11)
    base16 = {k: v.bfloat16() for k, v in base.items()}
    ft16 = [{k: v.bfloat16() for k, v in sd.items()} for sd in finetuned]
    ours = merge("pcb", base16, ft16, ratio=0.2)
    ref = official_pcb(
        {k: v.float() for k, v in base16.items()}, [{k: v.float() for k, v in sd.items()} for sd in ft16], ratio=0.2
    )
    for k in ref:
        assert ours[k].dtype == torch.bfloat16
        assert torch.equal(ours[k], ref[k].bfloat16()), k


def test_integer_buffers_are_copied_and_not_counted_in_d():
    base, finetuned = random_models(3, 4)
    base["z.count"] = torch.tensor([7])
    for sd in finetuned:
        sd["z.count"] = torch.tensor([9])
    ours = merge("pcb", base, finetuned, ratio=0.2)
    ref = official_pcb(
        {k: v for k, v in base.items() if k != "z.count"},
        [{k: v for k, v in sd.items() if k != "z.count"} for sd in finetuned],
        ratio=0.2,
    )
    assert torch.equal(ours["z.count"], torch.tensor([7]))
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


# ---- hand-checkable steps ------------------------------------------------------------------------


def _one_task_split_over_two_tensors(values):
    """One task whose task vector is `values`, split over two tensors (so the stats must be global)."""
    values = torch.tensor(values, dtype=torch.float32)
    half = len(values) // 2
    base = {"a": torch.zeros(half), "b": torch.zeros(len(values) - half)}
    return base, [{"a": values[:half], "b": values[half:]}]


def test_clip_positions_are_the_official_sort_indices():
    # |tau| = 1..10 shuffled, d = 10, clip = 0.1: lo = sorted[int(1.0)] = 2, hi = sorted[int(9.0 - 1)] = 9.
    base, ft = _one_task_split_over_two_tensors([-5.0, 3.0, 10.0, -1.0, 7.0, 2.0, -9.0, 4.0, 8.0, -6.0])
    _, _, stats = _stats(base, ft, clip=0.1, ratio=0.3)  # 0.1 would keep one score of 10
    assert stats[CLIP_LOW].tolist() == [2.0] and stats[CLIP_HIGH].tolist() == [9.0]
    # clip = 0.01: int(0.1) = 0 -> the min; int(9.9 - 1) = 8 -> the 9th smallest, not the max.
    _, _, stats = _stats(base, ft, clip=0.01, ratio=0.3)  # 0.1 would keep one score of 10
    assert stats[CLIP_LOW].tolist() == [1.0] and stats[CLIP_HIGH].tolist() == [9.0]
    # clip = 0: int(0) = 0 and int(10 - 1) = 9: min and max, no clipping.
    _, _, stats = _stats(base, ft, clip=0.0, ratio=0.3)  # 0.1 would keep one score of 10
    assert stats[CLIP_LOW].tolist() == [1.0] and stats[CLIP_HIGH].tolist() == [10.0]


def test_clipped_vectors_keep_sign_and_zeros_and_min_max_normalisation():
    # One task, nlp: score = exp(1 * ((A - lo) / (hi - lo))**2) * tanh(tau * tau).
    tau = [0.0, -1.0, 2.0, -3.0, 4.0, 5.0, -6.0, 7.0, 8.0, 100.0]
    base, ft = _one_task_split_over_two_tensors(tau)
    params, groups, stats = _stats(base, ft, clip=0.1, ratio=1.0)
    assert stats[CLIP_LOW].tolist() == [1.0] and stats[CLIP_HIGH].tolist() == [8.0]
    clipped, scale = clipped_and_scale(groups[0], params, stats)  # tensor "a": the first 5 entries
    # sign(0) = 0, so a zero stays zero although |0| is clipped up to lo = 1.
    assert clipped.tolist() == [[0.0, -1.0, 2.0, -3.0, 4.0]]
    clipped_b, _ = clipped_and_scale(groups[1], params, stats)
    assert clipped_b.tolist() == [[5.0, -6.0, 7.0, 8.0, 8.0]]  # 100 clipped down to hi = 8
    # A = |tau| clipped to [1, 8]; the inter term uses the raw tau (tanh(100 * 100) = 1).
    expected_scores = [math.exp(((min(max(abs(t), 1.0), 8.0) - 1) / 7) ** 2) * math.tanh(t * t) for t in tau]
    # ratio = 1: cut = sorted[int(0)] = the minimum score (0, from tau = 0), so scale = score / max.
    assert stats[SCORE_CUT].item() == pytest.approx(0.0)
    assert stats[SCORE_MAX].item() == pytest.approx(max(expected_scores), rel=1e-6)
    assert scale[0].tolist() == pytest.approx([s / max(expected_scores) for s in expected_scores[:5]], rel=1e-5)


def test_drop_keeps_entries_above_the_cut_quantile():
    # d = 10, ratio = 0.3: cut = sorted(score)[int(10 * 0.7)] = the 8th smallest; the two entries
    # above it get scale > 0, the top one 1, everything else exactly 0.
    tau = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    base, ft = _one_task_split_over_two_tensors(tau)
    params, groups, stats = _stats(base, ft, clip=0.0, ratio=0.3)
    scale = torch.cat([clipped_and_scale(g, params, stats)[1] for g in groups], dim=1)[0]
    assert (scale > 0).tolist() == [False] * 8 + [True, True]
    assert scale[-1].item() == 1.0
    merged = merge("pcb", base, ft, clip=0.0, ratio=0.3)
    # One task: kept entries move to theta_0 + scale * tau / scale = tau exactly; dropped stay at 0.
    assert torch.cat([merged["a"], merged["b"]]).tolist() == pytest.approx([0.0] * 8 + [0.9, 1.0])


def test_entries_whose_scores_are_all_zero_stay_at_the_base():
    base, finetuned = random_models(3, 5, spread=[0.01, 0.02, 0.03])
    merged = merge("pcb", base, finetuned, ratio=0.05)
    params, groups, stats = _stats(base, finetuned, ratio=0.05)
    for g in groups:
        _, scale = clipped_and_scale(g, params, stats)
        all_zero = (scale.sum(dim=0) == 0).reshape(g.base.shape)
        assert torch.equal(merged[g.name][all_zero], base[g.name][all_zero])
        assert not torch.equal(merged[g.name][~all_zero], base[g.name][~all_zero]) or (~all_zero).sum() == 0


def test_lam_placement_nlp_after_mean_vision_per_task_before_it():
    base, finetuned = random_models(2, 6)
    one = merge("pcb", base, finetuned, ratio=0.3, variant="vision", lam=[1.0, 1.0])
    nlp_two = merge("pcb", base, finetuned, ratio=0.3, variant="nlp", lam=2.0)
    vis_both_two = merge("pcb", base, finetuned, ratio=0.3, variant="vision", lam=[2.0, 2.0])
    vis_first_two = merge("pcb", base, finetuned, ratio=0.3, variant="vision", lam=[2.0, 1.0])
    params, groups, stats = _stats(base, finetuned, ratio=0.3, variant="vision")
    for g in groups:
        k = g.name
        clipped, scale = clipped_and_scale(g, params, stats)
        shape = g.base.shape
        # nlp and vision share intra and the weighted mean; equal lams act the same way.
        assert torch.allclose(vis_both_two[k] - base[k], 2 * (one[k] - base[k]), atol=1e-6)
        # Where only task 0 is kept the weights cancel: theta_0 + lam_0 * T_c,0.
        only_first = ((scale[0] > 0) & (scale[1] == 0)).reshape(shape)
        expect = base[k] + 2.0 * clipped[0].reshape(shape)
        assert torch.allclose(vis_first_two[k][only_first], expect[only_first], atol=1e-6)
        only_second = ((scale[1] > 0) & (scale[0] == 0)).reshape(shape)
        expect = base[k] + 1.0 * clipped[1].reshape(shape)
        assert torch.allclose(vis_first_two[k][only_second], expect[only_second], atol=1e-6)
    nlp_one = merge("pcb", base, finetuned, ratio=0.3, variant="nlp", lam=1.0)
    for k in base:
        assert torch.allclose(nlp_two[k] - base[k], 2 * (nlp_one[k] - base[k]), atol=1e-6)


# ---- validation errors ---------------------------------------------------------------------------


def test_errors_name_the_problem():
    base, finetuned = random_models(2, 8)
    with pytest.raises(ValueError, match="per-task lam"):
        merge("pcb", base, finetuned, lam=[1.0, 1.0])
    with pytest.raises(ValueError, match="3 lam values for 2"):
        merge("pcb", base, finetuned, variant="vision", lam=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="ratio"):
        merge("pcb", base, finetuned, ratio=0.0)
    with pytest.raises(ValueError, match="clip"):
        merge("pcb", base, finetuned, clip=0.5)
    with pytest.raises(ValueError, match="constant"):
        merge("pcb", base, [finetuned[0], {k: v.clone() for k, v in base.items()}])


def test_any_model_size_matches_official_code_to_the_last_bits():
    # d = 470: official torch.sum adds the last 22 columns in another order (a last-bit difference).
    shapes = {"w.a": (13, 7), "b.bias": (5,), "c.conv": (3, 4, 6), "e.long": (302,)}
    base, finetuned = random_models(5, 9, shapes=shapes)
    for variant in ["nlp", "vision", "vision_es"]:
        ours = merge("pcb", base, finetuned, ratio=0.2, variant=variant)
        ref = official_pcb(base, finetuned, ratio=0.2, variant=variant)
        for k in ref:
            assert torch.allclose(ours[k], ref[k], rtol=1e-6, atol=1e-7), (variant, k)
            if k != "e.long":
                assert torch.equal(ours[k], ref[k]), (variant, k)


# ---- streaming engine == in-memory ---------------------------------------------------------------


@pytest.mark.parametrize("variant,dtype,cap", [("nlp", torch.float32, None), ("vision_es", torch.bfloat16, None),
                                               ("nlp", torch.float32, 200), ("vision", torch.bfloat16, 200)])
def test_streaming_engine_matches_in_memory(tmp_path, variant, dtype, cap):
    from mergeflow.checkpoint import load_state_dict
    from mergeflow.checkpoint_writer import save_checkpoint
    from mergeflow.engine import merge_checkpoints

    shapes = {"w.a": (13, 7), "b.bias": (5,), "c.conv": (3, 4, 6), "e.long": (40, 9)}
    base, finetuned = random_models(3, 12, shapes=shapes)
    base = {k: v.to(dtype) for k, v in base.items()}
    finetuned = [{k: v.to(dtype) for k, v in sd.items()} for sd in finetuned]
    save_checkpoint(base, tmp_path / "base")
    for i, sd in enumerate(finetuned):
        save_checkpoint(sd, tmp_path / f"ft{i}")
    hp = {"ratio": 0.1, "variant": variant, "lam": 1.0 if variant == "nlp" else [0.9, 1.2, 1.0]}
    # chunk_elems = 50 splits the larger tensors into row chunks (the engine's bounded-memory units)
    # cap 200: the exact selections use sampled windows, and the score pass marks the entries that
    # can reach the cut, so the merge computes scores only there (`TensorGroup.candidates`)
    limits = {} if cap is None else {"kth_cap": cap, "kth_sample": 120}
    merge_checkpoints("pcb", tmp_path / "base", [tmp_path / f"ft{i}" for i in range(3)], tmp_path / "out",
                      hp, progress=False, chunk_elems=50, workers=2, input_hashes=["0"] * 4, **limits)
    streamed = load_state_dict(tmp_path / "out")
    in_memory = merge("pcb", base, finetuned, **hp)
    assert sorted(streamed) == sorted(in_memory)
    for k in in_memory:
        assert streamed[k].dtype == dtype
        assert torch.equal(streamed[k], in_memory[k]), k


def test_recipe_gives_the_in_memory_numbers(tmp_path):
    import argparse

    import yaml

    from mergeflow.checkpoint import load_state_dict
    from mergeflow.checkpoint_writer import save_checkpoint
    from mergeflow.recipe_cli import main

    base, finetuned = random_models(2, 13)
    save_checkpoint(base, tmp_path / "base")
    for i, sd in enumerate(finetuned):
        save_checkpoint(sd, tmp_path / f"ft{i}")
    hp = {"ratio": 0.2, "variant": "vision", "lam": [1.1, 0.9], "clip": 0.05}
    recipe = {"method": "pcb", "base": "./base", "models": ["./ft0", "./ft1"], "hyperparameters": hp}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    args = argparse.Namespace(recipe=str(tmp_path / "recipe.yaml"), out=str(tmp_path / "out"), device=None, quiet=True)
    assert main(args) == 0
    merged = load_state_dict(tmp_path / "out")
    expected = merge("pcb", base, finetuned, **hp)
    for k in expected:
        assert torch.equal(merged[k], expected[k]), k


@pytest.mark.parametrize("ratio", [1 / 1000, 1e-17])  # d = 512: keeps one score; keeps none
def test_a_ratio_that_keeps_at_most_one_score_is_refused_before_any_read(tmp_path, capsys, ratio):
    # With one kept score the official cut is the maximum, and its scale is 0/0 everywhere.
    import argparse

    import yaml

    from mergeflow.checkpoint_writer import save_checkpoint
    from mergeflow.engine import MergeConfigError
    from mergeflow.engine.plan import plan_merge
    from mergeflow.recipe_cli import main

    base, finetuned = random_models(2, 13)
    assert sum(v.numel() for v in base.values()) == 512
    for i, sd in enumerate([base, *finetuned]):
        save_checkpoint(sd, tmp_path / f"m{i}")
    with pytest.raises(ValueError, match="raise ratio"):
        merge("pcb", base, finetuned, ratio=ratio)
    with pytest.raises(MergeConfigError, match="raise ratio to at least 0.00391"):
        plan_merge("pcb", tmp_path / "m0", [tmp_path / "m1", tmp_path / "m2"], {"ratio": ratio})
    recipe = {"method": "pcb", "base": "./m0", "models": ["./m1", "./m2"], "hyperparameters": {"ratio": ratio}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    args = argparse.Namespace(recipe=str(tmp_path / "r.yaml"), out=str(tmp_path / "out"), device=None, quiet=True)
    assert main(args) == 2
    assert "raise ratio" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert torch.isfinite(merge("pcb", base, finetuned, ratio=2 / 512)["w.a"]).all()  # two kept: valid


def test_score_pass_marks_the_entries_that_can_reach_the_cut(tmp_path):
    from mergeflow.checkpoint_writer import save_checkpoint
    from mergeflow.engine import compute_global_stats
    from mergeflow.engine.plan import plan_merge

    base, finetuned = random_models(3, 40, shapes={"w": (40, 30)})
    for i, sd in enumerate([base, *finetuned]):
        save_checkpoint(sd, tmp_path / f"m{i}")
    plan = plan_merge("pcb", tmp_path / "m0", [tmp_path / f"m{i}" for i in (1, 2, 3)], {"ratio": 0.1},
                      chunk_elems=300)
    stats = compute_global_stats(plan, kth_cap=1000, kth_sample=1000)
    assert plan.candidates is not None and len(plan.candidates) == 4  # one mark set per row chunk
    _, scale = clipped_and_scale(TensorGroup("w", base["w"], torch.stack([f["w"] for f in finetuned])),
                                 get_method("pcb").params(ratio=0.1), stats)
    import numpy as np
    marked = np.concatenate([np.unpackbits(plan.candidates[("w", off)], count=300) for off in (0, 300, 600, 900)])
    kept = (scale.reshape(3, -1) > 0).any(dim=0).numpy()
    assert marked[kept].all()  # every entry with a non-zero scale was marked ...
    assert marked.mean() < 0.6  # ... and a superset smaller than the model (ratio 0.1 per task)
    # and the merge that computed scores only on the marked entries equals the in-memory one
    from mergeflow.checkpoint import load_state_dict
    from mergeflow.engine import merge_checkpoints

    merge_checkpoints("pcb", tmp_path / "m0", [tmp_path / f"m{i}" for i in (1, 2, 3)], tmp_path / "out",
                      {"ratio": 0.1}, progress=False, chunk_elems=300, kth_cap=1000, kth_sample=1000,
                      input_hashes=["0"] * 4)
    assert torch.equal(load_state_dict(tmp_path / "out")["w"], merge("pcb", base, finetuned, ratio=0.1)["w"])


@pytest.mark.parametrize("variant", ["nlp", "vision"])
def test_merge_on_candidates_only_equals_the_full_formula_bitwise(variant):
    # The streaming merge computes only the candidate entries and copies the base elsewhere.
    # Where the base is -0.0 the full formula gives base + (+0.0) = +0.0 unless every clipped tau
    # there is negative; those entries must be computed too, so the sign of zero matches.
    from mergeflow.methods.pcb import pcb

    base, finetuned = random_models(3, 21, shapes={"w": (40, 25)})
    taus = [sd["w"] - base["w"] for sd in finetuned]
    zero_at = torch.tensor([3, 77, 500, 999])
    base["w"].view(-1)[zero_at] = -0.0
    signs = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]])
    for i, sd in enumerate(finetuned):  # tiny taus there, so those entries are not candidates
        sd["w"] = base["w"] + taus[i]
        sd["w"].view(-1)[zero_at] = signs[:, i] * 1e-6
    hp = {"ratio": 0.1, "variant": variant, "lam": 1.3 if variant == "nlp" else [1.3, 0.7, 1.0]}
    params, groups, stats = _stats(base, finetuned, **hp)
    full = pcb(groups[0], params, stats)
    _, scale = clipped_and_scale(groups[0], params, stats)
    candidates = torch.nonzero((scale > 0).any(dim=0).reshape(-1)).squeeze(1)
    assert not set(zero_at.tolist()) & set(candidates.tolist())
    g = groups[0]
    on_candidates = pcb(TensorGroup(g.name, g.base, g.models, candidates=candidates), params, stats)
    assert torch.equal(on_candidates.view(torch.int32), full.view(torch.int32))
    # and the zero entries really differ in sign: +0.0 unless all three taus were negative
    assert full.view(-1)[zero_at].view(torch.int32).tolist() == [0, -(2**31), 0, 0]


def _float32_bits_between(low_bits: int, high_bits: int, step: int) -> torch.Tensor:
    return torch.arange(low_bits, high_bits, step, dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("fraction_large", [0.0, 0.1, 0.9])
def test_tanh_shortcut_is_bitwise_torch_tanh(fraction_large):
    """pcb's tanh_ skips |x| < 2**-12, where tanh(x) rounds to x; it must match torch.tanh on
    every bit pattern, on both of its branches (few entries to compute, or most)."""
    def bits(x: float) -> int:
        return torch.tensor(x, dtype=torch.float32).view(torch.int32).item()
    edge = bits(TANH_IS_IDENTITY_BELOW)
    tiny = _float32_bits_between(0, bits(2.0**-8), 997)  # a spread of every float32 up to past the edge
    around = _float32_bits_between(edge - 4096, edge + 4096, 1)  # both sides of the edge
    specials = torch.tensor([0.0, math.inf, math.nan, 1e-45, 0.5, 3.0, 20.0])
    g = torch.Generator().manual_seed(0)
    large = torch.randn(int(fraction_large * len(tiny) / (1 - fraction_large)), generator=g)
    values = torch.cat([tiny, around, specials, large])
    values = torch.cat([values, -values])[torch.randperm(2 * len(values), generator=g)]
    got = tanh_(values.clone())
    assert torch.equal(got.view(torch.int32), torch.tanh(values).view(torch.int32))
