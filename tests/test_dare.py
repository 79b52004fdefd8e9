"""DARE and DARE-TIES: rescale, determinism, order and chunk independence, hand-checked merges."""

from __future__ import annotations

import pytest
import torch

import mergeflow
from mergeflow.methods.base import TensorGroup
from mergeflow.methods.dare import WORDS_PER_BLOCK, DareParams, drop_and_rescale, keep_mask


def _ones_model(n: int = 4000) -> tuple[dict, list[dict]]:
    base = {"w": torch.zeros(n), "v": torch.zeros(10)}
    return base, [{"w": torch.ones(n), "v": torch.ones(10)}]


def test_dropped_entries_are_zero_and_kept_ones_rescaled_by_one_over_one_minus_p():
    base, fts = _ones_model()
    out = mergeflow.merge("dare", base, fts, p=0.75, lam=1.0, seed=1)["w"]
    values = set(out.unique().tolist())
    assert values == {0.0, 4.0}  # 1 / (1 - 0.75) = 4
    kept = (out != 0).float().mean().item()
    assert 0.2 < kept < 0.3  # about 1 - p of the entries survive


def test_p_zero_is_task_arithmetic():
    base = {"w": torch.tensor([1.0, 2.0])}
    fts = [{"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([1.0, 5.0])}]
    dare = mergeflow.merge("dare", base, fts, p=0.0, lam=0.5)
    ta = mergeflow.merge("task_arithmetic", base, fts, lam=0.5)
    assert torch.equal(dare["w"], ta["w"])


def test_same_seed_same_result_and_seed_changes_it():
    base, fts = _ones_model()
    a = mergeflow.merge("dare", base, fts, p=0.5, seed=7)
    b = mergeflow.merge("dare", base, fts, p=0.5, seed=7)
    c = mergeflow.merge("dare", base, fts, p=0.5, seed=8)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])


def test_mask_depends_on_tensor_name_and_task_not_on_order_or_other_tensors():
    base, fts = _ones_model()
    full = mergeflow.merge("dare", base, fts, p=0.5, seed=3)
    only_w = mergeflow.merge("dare", {"w": base["w"]}, [{"w": fts[0]["w"]}], p=0.5, seed=3)
    reordered = mergeflow.merge("dare", dict(reversed(base.items())), [dict(reversed(fts[0].items()))], p=0.5, seed=3)
    assert torch.equal(full["w"], only_w["w"]) and torch.equal(full["w"], reordered["w"])
    # A fresh mask per task: two identical fine-tunes get different masks.
    g = TensorGroup("w", torch.zeros(1000), torch.ones(2, 1000))
    dropped = drop_and_rescale(g, 0.5, 0)
    assert not torch.equal(dropped[0], dropped[1])
    # A different tensor name gives a different mask.
    assert not torch.equal(keep_mask(0, "w", 0, 1000, 0, 1000, 0.5), keep_mask(0, "v", 0, 1000, 0, 1000, 0.5))


def test_mask_of_any_row_range_equals_the_slice_of_the_whole_mask():
    block = 2 * WORDS_PER_BLOCK  # entries `draws` computes at a time
    total = 2 * block + 5000
    whole = keep_mask(5, "layer.weight", 1, total, 0, total, 0.3)
    for start, count in [(0, 10), (1, 1), (block - 7, 20), (1233, block + 2), (total - 3, 3), (7, total - 7)]:
        part = keep_mask(5, "layer.weight", 1, total, start, count, 0.3)
        assert torch.equal(part, whole[start:start + count])
    # And through TensorGroup.offset, as the engine calls it on row chunks:
    tau = torch.randn(2, 40, 30)
    full = drop_and_rescale(TensorGroup("t", torch.zeros(40, 30), tau), 0.4, 9)
    chunk = drop_and_rescale(TensorGroup("t", torch.zeros(10, 30), tau[:, 20:30], offset=20 * 30), 0.4, 9)
    assert torch.equal(chunk, full[:, 20:30])


def _splitmix64(key: int, k: int) -> int:
    """Word k of the SplitMix64 stream seeded with `key`, in Python integers (the published
    algorithm: state += golden ratio, then the output mix)."""
    m = (1 << 64) - 1
    z = (key + (k + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_mask_is_the_splitmix64_draws_compared_with_p():
    import numpy as np

    from mergeflow.methods.dare import mask_key

    # The reference above is SplitMix64: its published first outputs for seed 0.
    assert [_splitmix64(0, k) for k in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    p, start, count = 0.3, 2 * WORDS_PER_BLOCK - 3, 11  # an odd start, across a block of `draws`
    key = mask_key(7, "w", 2)
    words = [_splitmix64(key, k) for k in range(start // 2, (start + count + 1) // 2)]
    halves = [h for w in words for h in (w & 0xFFFFFFFF, w >> 32)]  # low half first
    u = np.array(halves[start % 2: start % 2 + count], dtype=np.float64)
    expected = torch.from_numpy((u / 2.0**32 >= p).astype(np.float32))
    assert torch.equal(keep_mask(7, "w", 2, start + count, start, count, p), expected)
    assert 0 < expected.sum() < count  # the case has both kept and dropped entries
    for p in (0.1, 0.5, 0.9):
        kept = keep_mask(1, "v", 0, 1 << 20, 0, 1 << 20, p).mean().item()
        assert abs(kept - (1 - p)) < 0.002  # 4+ standard errors at 1M draws


def test_masks_of_many_small_tensors_are_uniform_and_independent_between_tasks():
    # Biases and norms are short, so their masks use only the first words of many streams:
    # each position must still be uniform, and two tasks' masks of one tensor unrelated.
    import numpy as np

    from mergeflow.methods.dare import draws

    n = 5000
    first = np.stack([draws(0, f"layers.{i}.bias", 0, 0, 8) for i in range(n)]) / 2.0**32
    second = np.stack([draws(0, f"layers.{i}.bias", 1, 0, 8) for i in range(n)]) / 2.0**32
    standard_error = 1 / np.sqrt(12 * n)
    assert np.all(np.abs(first.mean(axis=0) - 0.5) < 5 * standard_error)
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 5 / np.sqrt(first.size)


def test_dare_ties_with_no_drop_is_ties_without_trim():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, generator=g)}
    fts = [{"w": base["w"] + torch.randn(50, generator=g)} for _ in range(3)]
    for agg in ("mean", "sum", "max"):
        dt = mergeflow.merge("dare_ties", base, fts, p=0.0, agg=agg, lam=0.5)
        ties = mergeflow.merge("ties", base, fts, k=1.0, agg=agg, lam=0.5)
        assert torch.equal(dt["w"], ties["w"])


def test_dare_ties_hand_checked():
    base = {"w": torch.zeros(2)}
    fts = [{"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([1.0, 3.0])}]
    # p = 0: signs +, +; agg sum: [2, 3]; agg mean: [1, 3]; lam 0.5 scales.
    assert torch.equal(mergeflow.merge("dare_ties", base, fts, p=0.0, agg="sum", lam=0.5)["w"], torch.tensor([1.0, 1.5]))
    assert torch.equal(mergeflow.merge("dare_ties", base, fts, p=0.0, agg="mean")["w"], torch.tensor([1.0, 3.0]))


def test_p_must_be_below_one():
    with pytest.raises(ValueError):
        DareParams(p=1.0)
    with pytest.raises(ValueError, match="lam"):
        DareParams(lam=[])
