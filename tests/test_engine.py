"""The streaming engine: bitwise equal to the in-memory merge, exact streaming statistics,
checks before any output, atomic output with manifest, model card and side files."""

from __future__ import annotations

import json

import pytest
import torch

import mergeflow
from mergeflow.checkpoint import load_state_dict
from mergeflow.checkpoint_writer import save_checkpoint
from mergeflow.engine import MergeConfigError, NonFiniteInput, merge_checkpoints
from mergeflow.engine.selection import PassReduction, _window_cpu, _window_device
from mergeflow.hashing import hash_checkpoint
from mergeflow.methods import Reduce
from mergeflow.statistics import reduce_rows

SHAPES = {
    "embed.weight": (40, 8), "layers.0.attn.weight": (24, 16), "layers.0.attn.bias": (24,),
    "layers.0.norm.weight": (8,), "dead.weight": (6, 5), "scale": (),
}
CONFIG = {"model_type": "toy", "vocab_size": 40}


def _state(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in SHAPES.items():
        if base is None:
            sd[k] = torch.randn(s, generator=g)
        elif k == "dead.weight":
            sd[k] = base[k].clone()  # a tensor no fine-tune moves: tau exactly 0
        else:  # deltas on a coarse grid: ties at thresholds, exact cancellations
            sd[k] = base[k] + torch.randint(-4, 5, s, generator=g).float() / 8
    sd["lm_head.bf16"] = (torch.randn(10, 8, generator=g) if base is None
                          else base["lm_head.bf16"].float() + 0.25 * torch.randn(10, 8, generator=g)).to(torch.bfloat16)
    sd["position_ids"] = torch.arange(7) if base is None else torch.arange(7) * (seed + 2)
    sd["mask"] = torch.tensor([True, False]) if base is None else torch.tensor([False, True])
    return sd


def _write(sd: dict, path, config: dict | None = CONFIG):
    save_checkpoint(sd, path, config=config, max_shard_bytes=1500)  # several shards
    (path / "tokenizer_config.json").write_text('{"model_max_length": 16}\n')
    return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_zoo")
    base = _state(0)
    fts = [_state(i + 1, base) for i in range(3)]
    dirs = [_write(base, root / "base")] + [_write(ft, root / f"ft{i}") for i, ft in enumerate(fts)]
    return {"root": root, "base": base, "fts": fts, "base_dir": dirs[0], "ft_dirs": dirs[1:]}


CASES = [
    ("task_arithmetic", {"lam": 0.3}, 3),
    ("task_arithmetic", {"lam": [0.2, 0.5, 1.0]}, 3),
    ("ties", {"k": 0.2, "lam": 1.0, "agg": "mean"}, 3),
    ("ties", {"k": 0.35, "lam": 0.8, "agg": "sum"}, 3),
    ("ties", {"k": 0.5, "lam": [1.0, 0.5, 2.0], "agg": "max"}, 3),
    ("ties", {"k": 0.2, "trim_scope": "tensor"}, 3),
    ("dare", {"p": 0.5, "lam": 0.7, "seed": 3}, 3),
    ("dare_ties", {"p": 0.3, "agg": "mean", "seed": 1}, 3),
    ("slerp", {"t": 0.3}, 2),
    ("average", {}, 3),
    ("average", {"weights": [0.5, 0.3, 1.7]}, 3),
]


@pytest.mark.parametrize("method, hp, n", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_streaming_equals_in_memory_bitwise(zoo, tmp_path, method, hp, n):
    out = tmp_path / "out"
    # Tiny chunks force row-chunked units; two workers finish them out of order.
    result = merge_checkpoints(method, zoo["base_dir"], zoo["ft_dirs"][:n], out, hp, progress=False,
                               workers=2, chunk_elems=50, input_hashes=["h"] * (n + 1))
    expected = mergeflow.merge(method, zoo["base"], zoo["fts"][:n], **hp)
    got = load_state_dict(out)
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        assert torch.equal(got[k], expected[k]), k
    assert result.output_hash == hash_checkpoint(out)


@pytest.mark.parametrize("method, hp", [("ties", {"k": 0.3}), ("task_arithmetic", {"lam": 0.4})])
def test_fine_tunes_in_another_float_precision_merge_in_float32(zoo, tmp_path, method, hp):
    # A float16 fine-tune and a bfloat16 one of a float32 base (bf16 lm_head: one fp32 fine-tune):
    # each model's stored values are read into float32, as the in-memory path does, and the
    # output keeps the base's dtypes. The plan says so; integer buffers stay strict.
    fts = [{k: v.half() if v.is_floating_point() else v for k, v in zoo["fts"][0].items()},
           {k: v.bfloat16() if v.is_floating_point() else v for k, v in zoo["fts"][1].items()},
           {k: v.float() if v.is_floating_point() else v for k, v in zoo["fts"][2].items()}]
    dirs = [_write(ft, tmp_path / f"mixed{i}") for i, ft in enumerate(fts)]
    result = merge_checkpoints(method, zoo["base_dir"], dirs, tmp_path / "out", hp, workers=2,
                               chunk_elems=50, input_hashes=["h"] * 4)
    expected = mergeflow.merge(method, zoo["base"], fts, **hp)
    got = load_state_dict(tmp_path / "out")
    for k in expected:
        assert got[k].dtype == zoo["base"][k].dtype == expected[k].dtype, k
        assert torch.equal(got[k], expected[k]), k
    assert not torch.equal(got["embed.weight"], mergeflow.merge(method, zoo["base"], zoo["fts"], **hp)["embed.weight"])
    # The plan's notes (printed with the estimate) are recorded in the manifest; read there, not
    # from stderr, which a live display left over from another test can take from capsys.
    notes = "\n".join(result.manifest["notes"])
    assert "stores 6 float tensor(s) as torch.float16, the base as torch.float32" in notes
    assert "stores 1 float tensor(s) as torch.float32, the base as torch.bfloat16" in notes


@pytest.mark.parametrize("cap, sample", [(10**6, 10**6), (150, 60), (40, 10**6), (1, 10**6)],
                         ids=["keep-all", "sampled-window", "radix-collect", "radix-low-bits"])
def test_ties_thresholds_exact_in_every_selection_mode(zoo, tmp_path, cap, sample):
    hp = {"k": 0.3}
    result = merge_checkpoints("ties", zoo["base_dir"], zoo["ft_dirs"], tmp_path / "o", hp, progress=False,
                               chunk_elems=64, kth_cap=cap, kth_sample=sample, input_hashes=["h"] * 4)
    expected = mergeflow.merge("ties", zoo["base"], zoo["fts"], **hp)
    got = load_state_dict(tmp_path / "o")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert len(result.stats["ties_threshold"]) == 3


@pytest.mark.parametrize("cap, sample", [(10**6, 10**6), (150, 60), (40, 10**6), (1, 10**6)],
                         ids=["keep-all", "sampled-window", "radix-collect", "radix-low-bits"])
@pytest.mark.parametrize("k", [0.3, 0.02])  # 0.02: int(k * numel) = 0 in small tensors, which keep 1
def test_per_tensor_thresholds_exact_in_row_chunks(zoo, tmp_path, cap, sample, k):
    # trim_scope="tensor" streams large tensors in row chunks too: its thresholds are per-tensor
    # statistics, selected exactly in bounded memory like the global ones.
    hp = {"k": k, "trim_scope": "tensor"}
    result = merge_checkpoints("ties", zoo["base_dir"], zoo["ft_dirs"], tmp_path / "o", hp, progress=False,
                               chunk_elems=64, kth_cap=cap, kth_sample=sample, input_hashes=["h"] * 4)
    expected = mergeflow.merge("ties", zoo["base"], zoo["fts"], **hp)
    got = load_state_dict(tmp_path / "o")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    embed = result.stats["ties_tensor_threshold@embed.weight"]
    mags = torch.stack([ft["embed.weight"] - zoo["base"]["embed.weight"] for ft in zoo["fts"]]).abs().reshape(3, -1)
    kept = int(k * mags.shape[1])
    assert embed == mags.kthvalue(mags.shape[1] - kept + 1, dim=1).values.tolist()
    if k == 0.02:  # 6 x 5 = 30 entries: int(0.6) = 0, and mergekit keeps at least 1: the largest
        dead = torch.stack([ft["dead.weight"] - zoo["base"]["dead.weight"] for ft in zoo["fts"]]).abs()
        assert result.stats["ties_tensor_threshold@dead.weight"] == dead.reshape(3, -1).amax(dim=1).tolist()


def _chunks(values: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(values, sizes, dim=1))


@pytest.mark.parametrize("cap", [10**6, 500, 3, 1])
def test_streaming_reductions_equal_the_in_memory_reference(cap):
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-50, 50, (3, 2000), generator=g).float() / 7  # many ties
    values[0, :300] = -0.0
    values[1, 100:200] = 0.0
    reductions = {
        "lo": Reduce("x", "kth", rank=lambda d: 1), "q": Reduce("x", "kth", rank=lambda d: d - int(0.2 * d)),
        "hi": Reduce("x", "kth", rank=lambda d: d), "mid": Reduce("x", "kth", rank=lambda d: d // 2),
        "min": Reduce("x", "min"), "max": Reduce("x", "max"), "n": Reduce("s", "sum"),
    }
    signs = torch.sign(values)
    red = PassReduction(reductions, cap=cap)
    rounds = 0
    while True:
        for part, s in zip(_chunks(values, [700, 1, 999, 300]), _chunks(signs, [700, 1, 999, 300]), strict=True):
            red.absorb(red.summarize({"x": part, "s": s}))
        rounds += 1
        if red.finish_round():
            break
    assert rounds <= 3
    for name, how in reductions.items():
        ref = reduce_rows(signs if how.source == "s" else values, how)
        assert torch.equal(red.results[name], ref), name


def test_sampled_window_finds_the_quantile_in_one_pass():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2, 100_000, generator=g).abs()
    how = {"t": Reduce("x", "kth", rank=lambda d: d - int(0.2 * d))}
    red = PassReduction(how, cap=20_000)
    red.set_windows({"x": values[:, ::50]}, {"x": 100_000})
    for part in torch.split(values, 7_000, dim=1):
        red.absorb(red.summarize({"x": part}))
    assert red.finish_round()  # one pass
    assert torch.equal(red.results["t"], values.kthvalue(100_000 - 20_000, dim=1).values)


@pytest.mark.parametrize("rank_at", [0.8, 0.3])
def test_window_counts_values_tied_at_its_bounds_instead_of_keeping_them(rank_at):
    # Quantised values (like bf16 task vectors) put big atoms of equal values at the sampled
    # bounds; counting them keeps the one-pass window within a cap far below the atom sizes.
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, 12, (2, 120_000), generator=g).float() / 16
    d = values.shape[1]
    how = {"t": Reduce("x", "kth", rank=lambda n: int(rank_at * n))}
    red = PassReduction(how, cap=3_000)  # each atom holds ~10,000 values
    red.set_windows({"x": values[:, ::7]}, {"x": d})
    for part in torch.split(values, 5_000, dim=1):
        red.absorb(red.summarize({"x": part}))
    assert red.finish_round()  # one pass, no radix fallback
    assert torch.equal(red.results["t"], values.kthvalue(int(rank_at * d), dim=1).values)


def test_device_window_counts_equal_the_cpu_ones():
    # The torch path serves CUDA (tests/test_cuda.py); run here on CPU tensors it must give the
    # numpy path's counts, kept values and candidate marks, including values tied at the bounds.
    g = torch.Generator().manual_seed(5)
    values = torch.randint(0, 40, (4, 10_000), generator=g).float() / 8
    # the last row's window is one value (lo == hi), as bf16 task vectors often give
    lo, hi = torch.tensor([1.0, 2.0, 0.5, 1.5]), torch.tensor([2.0, 2.5, 4.0, 1.5])
    counts, kept, marks = _window_cpu(values, lo, hi, mark=True)
    d_counts, d_kept, d_marks = _window_device(values, lo, hi, mark=True)
    assert (counts == d_counts).all() and (marks == d_marks).all()
    assert all(torch.equal(a, b) for a, b in zip(kept, d_kept, strict=True))
    below = (values < lo.unsqueeze(1)).sum(dim=1)
    assert counts[0].tolist() == below.tolist()
    assert counts[1].tolist() == (values == lo.unsqueeze(1)).sum(dim=1).tolist()
    assert counts[2].tolist()[:3] == (values == hi.unsqueeze(1)).sum(dim=1).tolist()[:3]
    assert counts[2, 3] == 0 and counts[1, 3] > 0  # a one-value window counts its atom once
    assert [k.numel() for k in kept] == ((values > lo.unsqueeze(1)) & (values < hi.unsqueeze(1))).sum(dim=1).tolist()


def test_sample_rows_are_evenly_spread_and_never_empty(zoo, tmp_path):
    from mergeflow.engine.plan import plan_merge
    from mergeflow.engine.stat_passes import _systematic_rows

    plan = plan_merge("ties", zoo["base_dir"], zoo["ft_dirs"], {"k": 0.2}, out_dir=tmp_path / "o", chunk_elems=64)
    try:
        units = [u for u in plan.units if u.name in plan.float_names]
        def rows(name):
            shape = plan.base.checkpoint.info(name).shape
            return shape[0] if shape else 1
        names = {u.name for u in units}
        sample = _systematic_rows(plan, units, 0.25)
        taken = sum((u.row_end - u.row_start) if u.row_start is not None else rows(u.name) for u in sample)
        assert abs(taken - 0.25 * sum(rows(n) for n in names)) <= 1  # a share of every unit, carried over
        assert {n for n in names if rows(n) >= 4} <= {u.name for u in sample}  # spread over every tensor
        # a share below one row overall still samples one row, not nothing (that would fall back
        # to radix passes)
        (one,) = _systematic_rows(plan, units, 1e-9)
        assert one.elems > 0 and (one.row_end - one.row_start == 1 or one.row_start is None)
    finally:
        plan.close()


def _listing(path):
    return sorted(p.name for p in path.iterdir())


def test_mismatched_checkpoints_are_refused_before_any_output(zoo, tmp_path):
    bad = dict(zoo["fts"][0], **{"layers.0.attn.weight": torch.zeros(24, 17)})
    bad_dir = _write(bad, tmp_path / "bad")
    before = _listing(tmp_path)
    with pytest.raises(MergeConfigError, match=r"layers.0.attn.weight has shape \[24, 17\]"):
        merge_checkpoints("ties", zoo["base_dir"], [bad_dir], tmp_path / "out", {}, progress=False)
    assert _listing(tmp_path) == before


def test_padded_vocabulary_is_a_clear_error(zoo, tmp_path):
    padded = dict(zoo["fts"][0], **{"embed.weight": torch.zeros(48, 8)})
    with pytest.raises(MergeConfigError, match="vocab_size 48"):
        merge_checkpoints("ties", zoo["base_dir"], [_write(padded, tmp_path / "p", dict(CONFIG, vocab_size=48))],
                          tmp_path / "out", {}, progress=False)
    with pytest.raises(MergeConfigError, match="never truncates"):
        merge_checkpoints("ties", zoo["base_dir"], [_write(padded, tmp_path / "q", None)],
                          tmp_path / "out", {}, progress=False)
    assert not (tmp_path / "out").exists()


BASE_ONLY = ("layers.0.norm.weight", "lm_head.bf16")  # what vision-only experts of a full CLIP lack


def test_tensors_no_model_has_are_refused_or_copied_from_the_base_when_asked(zoo, tmp_path):
    fts = [{k: v for k, v in ft.items() if k not in BASE_ONLY} for ft in zoo["fts"][:2]]
    dirs = [_write(ft, tmp_path / f"vision_only{i}") for i, ft in enumerate(fts)]
    with pytest.raises(MergeConfigError, match=r"lacks 2 tensor\(s\) of the base(.|\n)*base_only_tensors: copy"):
        merge_checkpoints("ties", zoo["base_dir"], dirs, tmp_path / "out", {}, progress=False)
    with pytest.raises(ValueError, match="lacks 2 tensor"):
        mergeflow.merge("ties", zoo["base"], fts)

    result = merge_checkpoints("ties", zoo["base_dir"], dirs, tmp_path / "out", {"k": 0.5}, progress=False,
                               input_hashes=["h"] * 3, base_only_tensors="copy", out_dtype=torch.float32)
    got = load_state_dict(tmp_path / "out")
    expected = mergeflow.merge("ties", zoo["base"], fts, k=0.5, base_only_tensors="copy")
    assert set(got) == set(expected) == set(zoo["base"])
    for name in BASE_ONLY:  # copied (the bf16 one cast to the asked float32), not merged
        assert torch.equal(got[name], zoo["base"][name].float())
        assert torch.equal(expected[name], zoo["base"][name])
    # The rest is merged as if the base had never had them: the global trim threshold too.
    without = {k: v for k, v in zoo["base"].items() if k not in BASE_ONLY}
    assert all(torch.equal(got[k], v) for k, v in mergeflow.merge("ties", without, fts, k=0.5).items())
    assert result.manifest["merged_tensors"] == 5 and "copied from the base" in result.manifest["notes"][-1]
    # A tensor only some models lack is a broken input, whatever the option says.
    with pytest.raises(MergeConfigError, match=r"lacks 2 tensor") as err:
        merge_checkpoints("ties", zoo["base_dir"], [dirs[0], zoo["ft_dirs"][2]], tmp_path / "o2", {},
                          progress=False, base_only_tensors="copy")
    assert "base_only_tensors" not in str(err.value)  # no hint to set what is set
    with pytest.raises(MergeConfigError, match="base_only_tensors='keep'; use 'error'"):
        merge_checkpoints("ties", zoo["base_dir"], dirs, tmp_path / "o3", {}, progress=False,
                          base_only_tensors="keep")
    assert _listing(tmp_path) == ["out", "vision_only0", "vision_only1"]


def test_nan_input_is_refused_and_leaves_no_output(zoo, tmp_path):
    broken = {k: v.clone() for k, v in zoo["fts"][1].items()}
    broken["layers.0.attn.weight"][3, 4] = float("nan")
    broken_dir = _write(broken, tmp_path / "nan")
    for method in ("task_arithmetic", "ties"):
        with pytest.raises(NonFiniteInput, match="layers.0.attn.weight contains NaN"):
            merge_checkpoints(method, zoo["base_dir"], [zoo["ft_dirs"][0], broken_dir], tmp_path / "out", {},
                              progress=False, input_hashes=["h"] * 3)
        assert _listing(tmp_path) == ["nan"]  # no output, no temp dir


def test_bad_hyperparameters_and_lam_lists_are_refused_first(zoo, tmp_path):
    with pytest.raises(MergeConfigError, match="agg"):
        merge_checkpoints("ties", zoo["base_dir"], zoo["ft_dirs"], tmp_path / "o", {"agg": "median"}, progress=False)
    with pytest.raises(MergeConfigError, match="2 lam values for"):
        merge_checkpoints("ties", zoo["base_dir"], zoo["ft_dirs"], tmp_path / "o", {"lam": [1, 2]}, progress=False)
    with pytest.raises(MergeConfigError, match="overlaps input"):
        merge_checkpoints("ties", zoo["base_dir"], zoo["ft_dirs"], zoo["ft_dirs"][0] / "sub", {}, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(MergeConfigError, match="not an earlier mergeflow output"):
        merge_checkpoints("ties", zoo["base_dir"], zoo["ft_dirs"], tmp_path / "mine", {}, progress=False)
    assert _listing(tmp_path) == ["mine"]


def test_output_has_manifest_card_side_files_and_is_deterministic(zoo, tmp_path):
    hp = {"k": 0.2, "lam": 1.0}
    a = merge_checkpoints("ties", zoo["base_dir"], zoo["ft_dirs"], tmp_path / "a", hp, progress=False,
                          input_hashes=["b0", "m1", "m2", "m3"])
    b = merge_checkpoints("ties", zoo["base_dir"], zoo["ft_dirs"], tmp_path / "b", hp, progress=False,
                          workers=1, chunk_elems=10**6, input_hashes=["b0", "m1", "m2", "m3"])
    assert a.output_hash == b.output_hash == hash_checkpoint(tmp_path / "a")
    files = _listing(tmp_path / "a")
    assert {"config.json", "tokenizer_config.json", "README.md", "mergeflow_manifest.json"} <= set(files)
    assert "model.safetensors.index.json" not in files or len([f for f in files if f.endswith(".safetensors")]) > 1
    manifest = json.loads((tmp_path / "a" / "mergeflow_manifest.json").read_text())
    assert manifest["method"] == "ties" and manifest["hyperparameters"]["k"] == 0.2
    assert manifest["base"]["content_hash"] == "b0" and [m["content_hash"] for m in manifest["models"]] == ["m1", "m2", "m3"]
    assert manifest["output_hash"] == a.output_hash and manifest["mergeflow_version"] == mergeflow.__version__
    card = (tmp_path / "a" / "README.md").read_text()
    assert "ties" in card and a.output_hash in card
    assert "library_name" not in card  # a toy config, not a transformers architecture
    assert "merged from Python (`merge_checkpoints`), not from a recipe" in card  # no recipe to point to
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == CONFIG
    # Re-running onto an earlier mergeflow output replaces it atomically.
    c = merge_checkpoints("ties", zoo["base_dir"], zoo["ft_dirs"], tmp_path / "a", hp, progress=False,
                          input_hashes=["b0", "m1", "m2", "m3"])
    assert c.output_hash == a.output_hash and _listing(tmp_path) == ["a", "b"]


def test_sharded_output_and_out_dtype(zoo, tmp_path):
    merge_checkpoints("task_arithmetic", zoo["base_dir"], zoo["ft_dirs"], tmp_path / "o", {"lam": 0.5},
                      progress=False, max_shard_bytes=1000, out_dtype=torch.bfloat16, input_hashes=["h"] * 4)
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    got = load_state_dict(tmp_path / "o")
    expected = mergeflow.merge("task_arithmetic", zoo["base"], zoo["fts"], lam=0.5)
    assert got["embed.weight"].dtype == torch.bfloat16
    assert torch.equal(got["embed.weight"], expected["embed.weight"].to(torch.bfloat16))
    assert torch.equal(got["position_ids"], zoo["base"]["position_ids"])


def test_dry_run_checks_and_writes_nothing(zoo, tmp_path, capsys):
    plan = merge_checkpoints("ties", zoo["base_dir"], zoo["ft_dirs"], tmp_path / "o", {}, dry_run=True)
    assert plan.n == 3 and not (tmp_path / "o").exists()
    assert "estimated time" in capsys.readouterr().err


def test_the_estimate_counts_passes_workers_and_what_the_process_holds(zoo, tmp_path, monkeypatch):
    import re

    from mergeflow.engine import run
    from mergeflow.engine.memory import resident_bytes

    def estimate(method: str, workers: int) -> tuple[float, float]:
        plan = merge_checkpoints(method, zoo["base_dir"], zoo["ft_dirs"], tmp_path / "o", {}, dry_run=True,
                                 progress=False)
        found = re.search(r"estimated time ~(\d+) s, peak memory ~(\d+) MiB", run.estimate(plan, workers))
        return float(found[1]), float(found[2])

    monkeypatch.setattr(run, "ASSUMED_BYTES_PER_SECOND_PER_WORKER", 1e3)  # seconds for the tiny zoo
    monkeypatch.setattr(run.MergePlan, "inputs_in_page_cache", lambda self: True)
    ta, ta_peak = estimate("task_arithmetic", 1)
    ties, _ = estimate("ties", 1)
    assert ties >= 2 * ta - 1  # TIES reads the inputs twice (trim pass, merge), TA once
    assert estimate("ties", 2)[0] <= ties / 2 + 1  # twice the workers, half the time
    assert ta_peak >= resident_bytes() / 2**20  # at least what this process holds already
    monkeypatch.setattr(run.MergePlan, "inputs_in_page_cache", lambda self: False)
    monkeypatch.setattr(run, "ASSUMED_DISK_BYTES_PER_SECOND", 1e3)
    assert estimate("task_arithmetic", 1)[0] >= 2 * ta - 1  # inputs on disk: one more read


def _cancellation_models(majority: int) -> tuple[dict, list[dict]]:
    """Two fine-tunes whose deltas cancel exactly on `cancel` and whose summed signs over the
    whole model add up to `majority` (-1, 0 or +1) on `vote`."""
    g = torch.Generator().manual_seed(7)
    # values on a coarse grid, so base + d - base == d exactly
    base = {"cancel": torch.randint(-8, 9, (64, 8), generator=g).float() / 4,
            "vote": torch.randint(-8, 9, (9,), generator=g).float() / 4}
    d = torch.randint(1, 5, (64, 8), generator=g).float() / 8
    # vote: 4 positive entries, 4 negative, and one more whose sign sets the majority
    signs = torch.tensor([1, 1, 1, 1, -1, -1, -1, -1, majority], dtype=torch.float32)
    ft = [{"cancel": base["cancel"] + d, "vote": base["vote"] + 0.5 * signs},
          {"cancel": base["cancel"] - d, "vote": base["vote"] + 0.25 * signs}]
    return base, ft


@pytest.mark.parametrize("majority", [-1, 0, 1])
@pytest.mark.parametrize("method, hp, kernels", [("ties", {"k": 1.0, "lam": 0.5}, True),
                                                 ("ties", {"k": 1.0, "lam": 0.5}, False),
                                                 ("dare_ties", {"p": 0.0}, True),
                                                 ("dare_ties", {"p": 0.0}, False)])
@pytest.mark.parametrize("agg", ["mean", "sum", "max"])
def test_fused_majority_pass_resolves_exact_cancellations(tmp_path, majority, method, hp, kernels, agg):
    # The engine merges before the majority sign is known and fixes the cancelled entries after,
    # with the fused CPU kernel (loaded first) and with the torch code.
    if kernels:
        from mergeflow import kernels as fused

        fused.prepare({(torch.float32, torch.float32)})
        assert fused.wait_ready(torch.float32, torch.float32, timeout=300)
    base, fts = _cancellation_models(majority)
    dirs = [_write(sd, tmp_path / f"m{i}", config=None) for i, sd in enumerate([base, *fts])]
    result = merge_checkpoints(method, dirs[0], dirs[1:], tmp_path / "out", {**hp, "agg": agg},
                               progress=False, cpu_kernels=kernels)
    expected = mergeflow.merge(method, base, fts, **hp, agg=agg)
    got = load_state_dict(tmp_path / "out")
    for name in base:
        assert torch.equal(got[name], expected[name]), name
    assert result.output_hash == hash_checkpoint(tmp_path / "out")
    assert result.stats[f"{method}_majority"] == [majority]  # sum of the elected signs
    # by hand: a majority of +1 keeps the positive deltas, -1 (and 0) the negative ones
    lam = hp.get("lam", 1.0)
    d = fts[0]["cancel"] - base["cancel"]
    if agg != "max" or majority != 0:
        picked = d if majority > 0 else -d
        assert torch.allclose(got["cancel"], base["cancel"] + lam * picked)
    else:  # max with a majority of 0: gamma stays 0, the entry stays at the base
        assert torch.equal(got["cancel"], base["cancel"])


@pytest.mark.parametrize("majority", [-1, 0, 1])
@pytest.mark.parametrize("method, hp", [("ties", {"k": 1.0}), ("dare_ties", {"p": 0.0})])
@pytest.mark.parametrize("kernels", [True, False])
def test_fused_majority_pass_resolves_cancellations_in_a_weighted_mean(tmp_path, majority, method, hp, kernels):
    # agg weighted_mean divides by the agreeing entries' lams, also in the values of the entries
    # left open until the majority sign is known.
    if kernels:
        from mergeflow import kernels as fused

        fused.prepare({(torch.float32, torch.float32)})
        assert fused.wait_ready(torch.float32, torch.float32, timeout=300)
    base, fts = _cancellation_models(majority)
    hp = {**hp, "agg": "weighted_mean", "lam": [0.5, 0.5]}  # equal, so the deltas still cancel exactly
    dirs = [_write(sd, tmp_path / f"m{i}", config=None) for i, sd in enumerate([base, *fts])]
    merge_checkpoints(method, dirs[0], dirs[1:], tmp_path / "out", hp, progress=False, cpu_kernels=kernels)
    expected = mergeflow.merge(method, base, fts, **hp)
    got = load_state_dict(tmp_path / "out")
    assert all(torch.equal(got[name], expected[name]) for name in base)
    d = fts[0]["cancel"] - base["cancel"]  # one agreeing entry of weight 0.5: (0.5 d) / 0.5 = d
    assert torch.equal(got["cancel"], base["cancel"] + (d if majority > 0 else -d))


@pytest.mark.parametrize("method, hp", [("ties", {"k": 0.2}), ("ties", {"k": 0.2, "trim_scope": "tensor"}),
                                        ("pcb", {"ratio": 0.1}), ("dare_ties", {"p": 0.5})])
def test_empty_and_scalar_tensors_stream_like_in_memory(tmp_path, method, hp):
    # A (0, 4) tensor and a scalar next to a chunked one, with sampled windows (small cap).
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(30, 8, generator=g), "empty": torch.zeros(0, 4), "s": torch.tensor(1.5)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    dirs = [_write(sd, tmp_path / f"m{i}", config=None) for i, sd in enumerate([base, *fts])]
    merge_checkpoints(method, dirs[0], dirs[1:], tmp_path / "out", hp, progress=False, chunk_elems=16,
                      kth_cap=50, kth_sample=40)
    got, expected = load_state_dict(tmp_path / "out"), mergeflow.merge(method, base, fts, **hp)
    assert all(torch.equal(got[k], expected[k]) for k in expected)



def _resident_pages(path, start: int, length: int) -> float:
    """The share of the file's pages covering [start, start + length) that are in the page cache."""
    import ctypes
    import mmap

    import numpy as np

    page = mmap.PAGESIZE
    first, last = start // page, (start + length - 1) // page
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        address = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        flags = (ctypes.c_ubyte * (len(mm) // page + 1))()
        if ctypes.CDLL(None).mincore(ctypes.c_void_p(address), ctypes.c_size_t(len(mm)), flags) != 0:
            pytest.skip("mincore is not available here")
    return sum(flags[i] & 1 for i in range(first, last + 1)) / (last - first + 1)


def test_prefetch_asks_the_os_for_exactly_the_rows_read_next(tmp_path):
    # run_units hints each unit's byte range ahead of the workers (posix_fadvise WILLNEED).
    # A hint must cover the unit's rows and nothing else: an empty tensor's length of 0 would
    # mean "the whole rest of the file" to the OS.
    import os
    import time

    from safetensors.torch import save_file

    from mergeflow.engine.reader import TensorSource

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this OS")
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(512, 4096), "b_empty": torch.zeros(0, 4), "c": torch.ones(512, 4096)}, file)
    source = TensorSource(file)
    (_, a_at), (_, c_at) = source._location["a"], source._location["c"]
    row = 4096 * 4
    fd = os.open(file, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _resident_pages(file, a_at, 512 * row) > 0.1:
        pytest.skip("this file system keeps the file cached (tmpfs?): nothing to observe")
    try:
        source.prefetch("b_empty")
        source.prefetch("c", 100, 300)
        # The reads it starts complete in the background (mincore counts pages once read).
        deadline = time.monotonic() + 10
        while _resident_pages(file, c_at + 100 * row, 200 * row) < 1.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _resident_pages(file, c_at + 100 * row, 200 * row) == 1.0
        time.sleep(0.2)  # time for any read wrongly asked for next to it to complete too
        assert _resident_pages(file, a_at, 512 * row) == 0.0
        assert _resident_pages(file, c_at + 310 * row, 200 * row) == 0.0
    finally:
        source.close()


def test_run_units_hints_every_unit_once_in_order_and_a_bounded_distance_ahead(zoo, monkeypatch):
    from mergeflow.engine import units as engine_units
    from mergeflow.engine.plan import plan_merge

    plan = plan_merge("task_arithmetic", zoo["base_dir"], zoo["ft_dirs"], {}, chunk_elems=16)
    ahead = 3 * max(plan.unit_bytes(u) for u in plan.units)
    monkeypatch.setattr(engine_units, "READ_AHEAD_BYTES", ahead)
    events = []
    monkeypatch.setattr(plan, "prefetch", lambda unit: events.append(("hint", unit)))
    monkeypatch.setattr(plan, "inputs_in_page_cache", lambda: False)  # as if just downloaded
    try:
        done = list(engine_units.run_units(plan, plan.units, lambda u: events.append(("work", u)) or u,
                                           2, False, "test"))
    finally:
        plan.close()
    assert done == plan.units
    hinted = [u for kind, u in events if kind == "hint"]
    assert hinted == plan.units  # each once, in order
    largest = max(plan.unit_bytes(u) for u in plan.units)
    for i, unit in enumerate(plan.units):  # hinted before its work starts, never too far ahead
        starts = events.index(("work", unit))
        assert events.index(("hint", unit)) < starts
        hinted_by_then = sum(1 for kind, _ in events[:starts] if kind == "hint")
        # at most workers + 1 = 3 units are submitted past unit i, and hints stop `ahead` past those
        assert sum(plan.unit_bytes(u) for u in plan.units[i + 1:hinted_by_then]) <= ahead + 4 * largest


def _evict(paths) -> None:
    """Drop the files from the page cache (written back first: dirty pages stay)."""
    import os

    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _skip_unless_probes_work(path) -> None:
    """Skip where the page-cache probe cannot tell (no preadv2 RWF_NOWAIT, or a file system
    without it): the engine then always asks for read-ahead, as before the probe."""
    import os

    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("no preadv2 RWF_NOWAIT here")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 1)
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        pass
    except OSError as e:
        pytest.skip(f"this file system cannot probe the page cache ({e})")
    finally:
        os.close(fd)


def _input_files(zoo) -> list:
    return [f for d in [zoo["base_dir"], *zoo["ft_dirs"]] for f in sorted(d.glob("*.safetensors"))]


def test_page_cache_probe_tells_cached_inputs_from_ones_on_disk(zoo):
    import os

    from mergeflow.engine.plan import plan_merge

    files = _input_files(zoo)
    _skip_unless_probes_work(files[0])
    for f in files:
        f.read_bytes()
    plan = plan_merge("task_arithmetic", zoo["base_dir"], zoo["ft_dirs"], {})
    try:
        assert plan.inputs_in_page_cache()
        fd = os.open(files[0], os.O_RDONLY)  # one page missing (where a probe lands) is tolerated
        os.posix_fadvise(fd, 0, 4096, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        assert plan.inputs_in_page_cache()
        _evict(files[-1:])  # one shard of one model
        if _resident_pages(files[-1], 0, files[-1].stat().st_size) > 0:
            pytest.skip("the OS kept the pages despite POSIX_FADV_DONTNEED")
        assert not plan.inputs_in_page_cache()
        assert plan.base.in_page_cache()
    finally:
        plan.close()


@pytest.mark.parametrize("cached", [True, False])
def test_reads_are_hinted_only_while_the_inputs_are_not_in_the_page_cache(tmp_path, monkeypatch, cached):
    # TIES reads every input more than once (sample, threshold pass, merge pass). Inputs on disk
    # are hinted on the first read; later reads find them cached, and hinting them again costs
    # CPU (and GIL switches) for nothing. 16 MiB per model: more than the OS reads ahead of the
    # headers on its own.

    from mergeflow.engine.plan import MergePlan

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(2048, 2048, generator=g)}
    dirs = [_write(base, tmp_path / "base")]
    dirs += [_write({"w": base["w"] + torch.randn(2048, 2048, generator=g)}, tmp_path / f"ft{i}") for i in range(2)]
    files = [f for d in dirs for f in sorted(d.glob("*.safetensors"))]
    _skip_unless_probes_work(files[0])
    if cached:
        for f in files:
            f.read_bytes()
    else:
        _evict(files)
        if any(_resident_pages(f, 0, f.stat().st_size) > 0.01 for f in files):
            pytest.skip("the OS kept the pages despite POSIX_FADV_DONTNEED")
    hinted, probed = [], []
    real_prefetch, real_probe = MergePlan.prefetch, MergePlan.inputs_in_page_cache
    monkeypatch.setattr(MergePlan, "prefetch", lambda plan, unit: hinted.append(unit) or real_prefetch(plan, unit))
    monkeypatch.setattr(MergePlan, "inputs_in_page_cache", lambda plan: probed.append(len(hinted)) or real_probe(plan))
    merge_checkpoints("ties", dirs[0], dirs[1:], tmp_path / "o", {"k": 0.2}, progress=False, input_hashes=["h"] * 3)
    assert len(probed) >= 2  # every read of the inputs probes first
    if cached:
        assert hinted == []
    else:  # the first read is hinted, the last (the merge pass) is not
        assert len(hinted) == probed[-1] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_writer_patch_overwrites_only_the_given_elements(tmp_path, dtype):
    # How the engine writes the entries a fused last pass resolves: scattered, in any order.
    from safetensors.torch import load_file

    from mergeflow.engine.writer import StreamingCheckpointWriter

    first, second = torch.arange(10, dtype=dtype), torch.arange(100, 130, dtype=dtype)
    with StreamingCheckpointWriter(tmp_path / "out", max_shard_bytes=64) as writer:
        writer.plan([("a", (10,), dtype), ("b", (5, 6), dtype)])
        writer.write("a", 0, first)
        writer.write("b", 0, second)
        writer.patch("b", torch.tensor([29, 3, 17]), torch.tensor([-1.0, -2.0, -3.0]).to(dtype))
        writer.patch("b", torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=dtype))  # nothing to do
        with pytest.raises(ValueError, match="past the end of a"):
            writer.patch("a", torch.tensor([10]), torch.tensor([0.0]).to(dtype))
    loaded = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        loaded |= load_file(f)
    expected = second.clone()
    expected[[29, 3, 17]] = torch.tensor([-1.0, -2.0, -3.0]).to(dtype)
    assert torch.equal(loaded["a"], first)
    assert torch.equal(loaded["b"].reshape(-1), expected)
