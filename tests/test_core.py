"""Library core: checkpoint I/O, the merge contract, the simplest methods."""

from __future__ import annotations

import json

import pytest
import torch

import mergeflow
from mergeflow.checkpoint import Checkpoint, CheckpointError
from mergeflow.checkpoint_writer import CheckpointWriter, save_checkpoint
from mergeflow.compatibility import IncompatibleCheckpoints
from mergeflow.hashing import hash_checkpoint
from mergeflow.task_vectors import apply_task_vector, task_vector


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(8, 4, generator=g),
        "enc.bias": torch.randn(8, generator=g),
        "norm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(6),
        "mask": torch.tensor([True, False]),
    }


def test_single_and_sharded_round_trip(tmp_path):
    sd = _state(0)
    single = save_checkpoint(sd, tmp_path / "single")
    sharded = save_checkpoint(sd, tmp_path / "sharded", max_shard_bytes=64)
    assert (single / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for path in (single, sharded):
        ckpt = Checkpoint(path)
        assert ckpt.names == sorted(sd)
        for k, v in sd.items():
            assert ckpt.info(k).shape == tuple(v.shape) and ckpt.info(k).dtype == v.dtype
            assert torch.equal(ckpt.get(k), v)
    # The content hash ignores the file layout.
    assert hash_checkpoint(single) == hash_checkpoint(sharded)
    sd2 = dict(sd, **{"enc.bias": sd["enc.bias"] + 1})
    assert hash_checkpoint(save_checkpoint(sd2, tmp_path / "other")) != hash_checkpoint(single)


def test_content_hash_streams_blocks_of_the_defined_bytes(tmp_path):
    # hash_checkpoint = sha256 over [name, dtype, shape] and the tensor's bytes, in name order;
    # it reads safetensors in row blocks, which must add up to exactly those bytes.
    import hashlib

    from mergeflow.engine.reader import TensorSource

    sd = dict(_state(0), wide=torch.randn(3, 1000), empty=torch.zeros(0, 5), scalar=torch.tensor(2.5),
              long=torch.arange(5000, dtype=torch.int64))
    path = save_checkpoint(sd, tmp_path / "m", max_shard_bytes=8000)
    expected = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        expected.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        expected.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert hash_checkpoint(path) == expected.hexdigest()
    source = TensorSource(path)
    try:
        for name, t in sd.items():  # blocks of at most 1000 bytes, or of one row that is larger
            blocks = [b.reshape(-1) for b in source.read_blocks(name, block_bytes=1000)]
            assert torch.equal(torch.cat(blocks) if blocks else t.new_empty(0), t.reshape(-1))
            rows_per_block = [len(b) // max(1, t[0].numel()) if t.dim() else 1 for b in blocks]
            assert all(len(b) * t.element_size() <= 1000 or rows == 1
                       for b, rows in zip(blocks, rows_per_block, strict=True))
        assert len(list(source.read_blocks("long", block_bytes=1000))) == 40  # 125 rows of 8 bytes each
    finally:
        source.close()

def test_lazy_metadata_reads_no_tensor(tmp_path):
    path = save_checkpoint(_state(0), tmp_path / "m")
    ckpt = Checkpoint(path)
    assert ckpt.signature()["enc.weight"] == ((8, 4), torch.float32)
    assert ckpt._handles == {}  # headers only: no file opened for data yet
    ckpt.get("enc.bias")
    assert len(ckpt._handles) == 1


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "out") as w:
            w.add("a", torch.ones(3))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_output_bytes_are_deterministic(tmp_path):
    a = save_checkpoint(_state(1), tmp_path / "a")
    b = save_checkpoint(_state(1), tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_pickle_refused_unless_opted_in(tmp_path):
    path = tmp_path / "model.bin"
    torch.save(_state(0), path)
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(path)
    assert torch.equal(Checkpoint(path, allow_pickle=True).get("enc.weight"), _state(0)["enc.weight"])


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = save_checkpoint(_state(0), tmp_path / "m") / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Checkpoint(path.parent)


def test_task_vector_round_trip_skips_integer_buffers():
    base, ft = _state(0), _state(1)
    tau = task_vector(base, ft)
    assert "position_ids" not in tau and "mask" not in tau
    back = apply_task_vector(base, tau)
    assert torch.allclose(back["enc.weight"], ft["enc.weight"])
    assert torch.equal(back["position_ids"], base["position_ids"])


def test_task_vectors_of_bf16_models_are_exact():
    base = {"w": torch.tensor([1.0, -0.5], dtype=torch.bfloat16)}
    ft = {"w": torch.tensor([258.0, 3.0], dtype=torch.bfloat16)}
    tau = task_vector(base, ft)
    assert tau["w"].dtype == torch.float32
    assert tau["w"].tolist() == [257.0, 3.5]  # 257 has no bf16 (it would round to 256)


def test_task_arithmetic_and_average_by_hand():
    base = {"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([7, 8])}
    fts = [{"w": torch.tensor([2.0, 2.0]), "ids": torch.tensor([0, 0])},
           {"w": torch.tensor([1.0, 5.0]), "ids": torch.tensor([1, 1])}]
    ta = mergeflow.merge("task_arithmetic", base, fts, lam=0.5)
    # tau = [1, 0] and [0, 3]; base + 0.5 * [1, 3]
    assert torch.equal(ta["w"], torch.tensor([1.5, 3.5]))
    assert torch.equal(ta["ids"], base["ids"])  # integer buffers come from the base
    avg = mergeflow.merge("average", base, fts)
    assert torch.equal(avg["w"], torch.tensor([1.5, 3.5]))
    # weighted (mergekit's linear): (3 * [2, 2] + 1 * [1, 5]) / 4
    weighted = mergeflow.merge("average", base, fts, weights=[3.0, 1.0])
    assert torch.equal(weighted["w"], torch.tensor([1.75, 2.75])) and torch.equal(weighted["ids"], base["ids"])
    with pytest.raises(ValueError, match="got 3 weights for 2 models"):
        mergeflow.merge("average", base, fts, weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights: \[1.0, -1.0\] sum to 0"):
        mergeflow.merge("average", base, fts, weights=[1.0, -1.0])


def test_weighted_average_rounds_like_mergekits_linear():
    """mergekit's linear adds each w_i * theta_i with a fused multiply-add (addcmul_), then
    divides by sum_i w_i: the product is not rounded on its own, so a separate multiply and
    add differ in the last bit of some entries. The reference is exact float64 arithmetic,
    rounded where the fused operations round."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    w = torch.tensor([1.0, 0.3])
    first = (a.double() * w[0].double()).float()  # 0 + a * w0: one rounding
    fused = (first.double() + b.double() * w[1].double()).float()  # + b * w1, rounded once
    if not torch.equal(torch.zeros(4096).addcmul_(a, w[0]).addcmul_(b, w[1]), fused):
        pytest.skip("this CPU's addcmul_ does not fuse (no FMA): mergekit's rounding is a plain multiply-add here")
    expected = fused / w.sum()
    unfused = (w[0] * a + w[1] * b) / w.sum()
    assert not torch.equal(expected, unfused)  # the test tells the two apart
    got = mergeflow.merge("average", {"x": torch.zeros(4096)}, [{"x": a}, {"x": b}], weights=[1.0, 0.3])["x"]
    assert torch.equal(got, expected)


def test_merge_keeps_dtype_and_refuses_mismatches():
    base, ft = _state(0), _state(1)
    out = mergeflow.merge("task_arithmetic", base, [ft])
    assert out["norm.weight"].dtype == torch.bfloat16
    bad = dict(ft, **{"enc.weight": torch.randn(8, 5)})
    with pytest.raises(IncompatibleCheckpoints, match=r"enc.weight has shape \[8, 5\]"):
        mergeflow.merge("task_arithmetic", base, [bad])
    with pytest.raises(ValueError, match="unknown merge method 'tie'"):
        mergeflow.merge("tie", base, [ft])
    with pytest.raises(ValueError, match="lamb"):
        mergeflow.merge("task_arithmetic", base, [ft], lamb=1.0)


def _signature(names: dict[str, tuple[int, ...]]) -> dict:
    return {n: (shape, torch.float32) for n, shape in names.items()}


LLAMA_NAMES = {"model.embed_tokens.weight": (32, 8), "model.layers.0.mlp.up_proj.weight": (16, 8)}


@pytest.mark.parametrize("base, model, hint", [
    (LLAMA_NAMES, {f"base_model.{n}": s for n, s in LLAMA_NAMES.items()},
     "m: its names carry the prefix 'base_model.' that the base's lack"),
    ({f"base_model.{n}": s for n, s in LLAMA_NAMES.items()}, LLAMA_NAMES,
     "m: the base's names carry the prefix 'base_model.' that its names lack"),
    (LLAMA_NAMES, {**LLAMA_NAMES, "lm_head.weight": (32, 8)},
     "m: lm_head.weight has the shape of model.embed_tokens.weight: the base ties its output head"),
    ({**LLAMA_NAMES, "lm_head.weight": (32, 8)}, LLAMA_NAMES,
     "m: lm_head.weight has the shape of model.embed_tokens.weight: the model ties its output head"),
])
def test_mismatched_names_say_why_where_the_names_tell(base, model, hint):
    """A wrapper's prefix, or an output head tied on one side, is named, and the advice to copy
    the base's tensors (wrong for a tied head) is not given."""
    from mergeflow.compatibility import check_compatible

    with pytest.raises(IncompatibleCheckpoints) as err:
        check_compatible(_signature(base), [_signature(model)], ["m"])
    assert hint in str(err.value) and "base_only_tensors" not in str(err.value)


def test_names_that_differ_otherwise_get_no_guess():
    from mergeflow.compatibility import check_compatible

    model = {**LLAMA_NAMES, "lm_head.weight": (30, 8)}  # not the embeddings' shape: no tied head
    with pytest.raises(IncompatibleCheckpoints) as err:
        check_compatible(_signature(LLAMA_NAMES), [_signature(model)], ["m"])
    assert "ties" not in str(err.value) and "prefix" not in str(err.value)
    with pytest.raises(IncompatibleCheckpoints) as err:  # one renamed tensor is not a prefix
        check_compatible(_signature(LLAMA_NAMES), [_signature({"x.model.embed_tokens.weight": (32, 8),
                                                               "model.layers.0.mlp.up_proj.weight": (16, 8)})], ["m"])
    assert "prefix" not in str(err.value)


def test_finite_check_sees_every_nan_and_inf_and_trusts_large_finite_values():
    # check_finite sums first; a sum that overflows from finite values must not be an error,
    # and NaN/inf must be found in every float dtype (float8 has no isfinite of its own).
    from mergeflow.compatibility import NonFiniteInput, check_finite

    check_finite("w", [torch.full((10,), 3e38), torch.full((4,), 6e4).half()], ["a", "b"])
    check_finite("w", [torch.ones(3).to(torch.float8_e4m3fn)], ["a"])
    bad = [torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 1.0]).bfloat16(),
           torch.tensor([1e38, float("-inf")]).half(), torch.tensor([float("nan")]).to(torch.float8_e4m3fn),
           torch.tensor([3e38, -3e38, float("nan")]).double()]
    for t in bad:
        with pytest.raises(NonFiniteInput, match="model 1: tensor w contains NaN or inf"):
            check_finite("w", [torch.zeros(2), t], ["model 0", "model 1"])


def test_whole_model_reductions_row_by_row_equal_the_concatenation():
    # reduce_all reduces one task row at a time (memory) and must give what reducing the
    # concatenated (tasks, whole model) matrix gives.
    from mergeflow.methods import Reduce
    from mergeflow.statistics import reduce_all, reduce_rows

    # k-th values go through the engine's exact selection: small rows fit its window whole; the
    # large ones (over 2x its sample size) get a sampled window, with ties at its bounds (a coarse grid).
    g = torch.Generator().manual_seed(0)
    small = [torch.randint(-3, 4, (3, *s), generator=g).float() for s in [(5, 4), (7,), (1,), (2, 3, 2)]]
    grid = [torch.randint(-50, 51, (3, n), generator=g).float() / 8 for n in (1_100_000, 5, 1_000_001)]
    smooth = [torch.randn(3, n, generator=g) for n in (250_000, 250_000)]
    for parts in (small, grid, smooth):
        how = {"kth": Reduce("v", "kth", rank=lambda d: d - int(0.2 * d)), "min": Reduce("v", "min"),
               "max": Reduce("v", "max"), "sum": Reduce("v", "sum")}
        got = reduce_all({"v": parts}, how)
        whole = torch.cat([p.reshape(3, -1) for p in parts], dim=1)
        for name, h in how.items():
            assert torch.equal(got[name], reduce_rows(whole, h)), name


def test_in_memory_stat_passes_rebuild_groups_instead_of_holding_every_tensor():
    # Holding every tensor's float32 group across passes took TIES past 24 GB at 110M params x 8
    # tasks; each pass must build them afresh, one tensor at a time, and give the same stats.
    import gc
    import weakref

    from mergeflow.merging import global_stats
    from mergeflow.methods import TensorGroup, get_method
    from mergeflow.methods.ties import kept_rank

    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(50, 40, generator=g) for i in range(4)}
    fts = [{k: v + torch.randn(v.shape, generator=g) / 8 for k, v in base.items()} for _ in range(3)]
    method = get_method("ties")
    params = method.params(k=0.2)
    calls, alive, refs = [], [], []

    def groups():
        calls.append(1)
        for k in sorted(base):
            group = TensorGroup(k, base[k], torch.stack([sd[k] for sd in fts]))
            gc.collect()
            alive.append(sum(ref() is not None for ref in refs))
            refs.append(weakref.ref(group.models))
            yield group
    stats = global_stats(method, params, groups)
    assert len(calls) == len(method.stat_passes) == 2
    assert max(alive) <= 1  # at most the previous tensor's group is still referenced
    magnitudes = torch.cat([torch.stack([sd[k] - base[k] for sd in fts]).abs().reshape(3, -1) for k in sorted(base)], 1)
    expected = magnitudes.kthvalue(kept_rank(magnitudes.shape[1], 0.2), dim=1).values
    assert torch.equal(stats["ties_threshold"], expected)
