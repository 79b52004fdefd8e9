"""The fused CPU kernels (mergeflow.kernels) give the torch code's bytes, and the engine uses them.

The inputs are adversarial for bitwise agreement: values on a coarse grid (deltas tied at the
trim thresholds, exact cancellations, summed signs of exactly 0), a base with -0.0 entries, a
dead tensor, bf16 and float32 storage, and outputs rounded to bf16 from float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergeflow
from mergeflow.checkpoint import load_state_dict
from mergeflow.checkpoint_writer import save_checkpoint
from mergeflow.engine import NonFiniteInput, NonFiniteOutput, merge_checkpoints
from mergeflow.methods import TensorGroup


@pytest.fixture(autouse=True, scope="module")
def kernels_loaded():
    """The engine runs the torch code until the kernels are loaded (mergeflow.kernels.prepare);
    load them first so these tests compare the kernels, not the torch code with itself."""
    from mergeflow import kernels

    pairs = {(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16)}
    kernels.prepare(pairs)
    assert all(kernels.wait_ready(*p, timeout=300) for p in pairs)


SHAPES = {"embed": (37, 16), "proj": (24, 24), "bias": (24,), "dead": (5, 7), "scale": ()}


def _grid_models(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randint(-16, 17, s, generator=g).float() / 8 for k, s in SHAPES.items()}
    base["bias"][::3] = -0.0  # signed zeros in the base: a zero update must keep or lose the sign as torch does
    fts = []
    for _ in range(n):
        ft = {k: v + torch.randint(-3, 4, v.shape, generator=g).float() / 16 for k, v in base.items()}
        ft["dead"] = base["dead"].clone()
        fts.append(ft)
    cast = lambda sd: {k: v.to(dtype) for k, v in sd.items()}  # noqa: E731
    return cast(base), [cast(ft) for ft in fts]


def _write_all(tmp_path, base: dict, fts: list[dict]) -> list:
    dirs = []
    for i, sd in enumerate([base, *fts]):
        save_checkpoint(sd, tmp_path / f"m{i}", max_shard_bytes=2000)
        dirs.append(tmp_path / f"m{i}")
    return dirs


CASES = [
    ("task_arithmetic", {"lam": 0.3}),
    ("task_arithmetic", {"lam": [0.7, -0.2, 1.3]}),
    ("ties", {"k": 0.2, "lam": 0.9, "agg": "mean"}),
    ("ties", {"k": 0.35, "lam": 1.1, "agg": "sum"}),
    ("ties", {"k": 0.5, "agg": "max"}),
    ("ties", {"k": 0.3, "lam": [1.0, 0.5, 2.0], "agg": "mean"}),
    ("ties", {"k": 0.4, "lam": [0.5, -1.0, 2.0], "agg": "max"}),
    ("ties", {"k": 1.0, "agg": "mean"}),
    ("ties", {"k": 0.0, "agg": "sum"}),
    ("ties", {"k": 0.2, "trim_scope": "tensor", "agg": "mean"}),
    ("dare", {"p": 0.3, "lam": 0.7, "seed": 4}),
    ("dare", {"p": 0.0, "lam": [0.5, -1.0, 2.0]}),
    ("dare", {"p": 0.9, "lam": [1.0, 0.3, 0.6], "seed": 2}),
    ("dare_ties", {"p": 0.3, "agg": "mean", "seed": 1}),
    ("dare_ties", {"p": 0.0, "agg": "max"}),
    ("dare_ties", {"p": 0.9, "lam": [0.5, 1.0, 2.0], "agg": "sum", "seed": 5}),
    ("pcb", {"ratio": 0.3, "clip": 0.05}),  # the clip pass's two k-th values on the window kernel
    ("pcb", {"ratio": 0.2, "clip": 0.1, "variant": "vision_es", "lam": [1.2, 0.8, 1.0]}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("method, hp", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_fused_kernels_write_the_torch_bytes(tmp_path, dtype, method, hp):
    base, fts = _grid_models(3, dtype)
    dirs = _write_all(tmp_path, base, fts)
    # Small chunks and a small selection cap: row-chunked units, sampled windows that may miss.
    common = dict(progress=False, workers=2, chunk_elems=40, kth_cap=200, kth_sample=60, input_hashes=["h"] * 4)
    fused = merge_checkpoints(method, dirs[0], dirs[1:], tmp_path / "fused", hp, **common)
    plain = merge_checkpoints(method, dirs[0], dirs[1:], tmp_path / "torch", hp, cpu_kernels=False, **common)
    assert fused.output_hash == plain.output_hash
    assert fused.stats == plain.stats
    expected = mergeflow.merge(method, base, fts, **hp)
    got = load_state_dict(tmp_path / "fused")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
        assert torch.equal(got[k].signbit(), expected[k].signbit()), k  # -0.0 and +0.0 too


TILED_CASES = [(m, hp) for m, hp in CASES if m != "pcb"]


@pytest.mark.parametrize("method, hp", TILED_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(TILED_CASES)])
def test_kernels_write_the_same_bytes_a_few_columns_at_a_time(tmp_path, monkeypatch, method, hp):
    """The kernels work a tile of columns at a time (kernels.rows.TILE); with 7-column tiles,
    every unit spans several, and TIES's open entries come from several tiles of a unit."""
    from mergeflow.kernels import rows

    monkeypatch.setattr(rows, "TILE", 7)
    base, fts = _grid_models(3, torch.bfloat16, seed=9)
    dirs = _write_all(tmp_path, base, fts)
    merge_checkpoints(method, dirs[0], dirs[1:], tmp_path / "o", hp, progress=False, chunk_elems=100,
                      input_hashes=["h"] * 4)
    got, expected = load_state_dict(tmp_path / "o"), mergeflow.merge(method, base, fts, **hp)
    for k in expected:
        assert torch.equal(got[k], expected[k]) and torch.equal(got[k].signbit(), expected[k].signbit()), k


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("agg", ["mean", "sum", "max"])
def test_fused_ties_for_any_number_of_models(tmp_path, n, agg):
    base, fts = _grid_models(n, torch.bfloat16, seed=n)
    dirs = _write_all(tmp_path, base, fts)
    merge_checkpoints("ties", dirs[0], dirs[1:], tmp_path / "o", {"k": 0.3, "agg": agg}, progress=False,
                      input_hashes=["h"] * (n + 1))
    got, expected = load_state_dict(tmp_path / "o"), mergeflow.merge("ties", base, fts, k=0.3, agg=agg)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("method, hp", [("ties", {"k": 0.3}), ("dare_ties", {"p": 0.3})])
def test_fused_weighted_mean_for_any_number_of_models(tmp_path, n, method, hp):
    base, fts = _grid_models(n, torch.bfloat16, seed=10 + n)
    hp = {**hp, "agg": "weighted_mean", "lam": [0.25 * (i + 1) for i in range(n)]}
    dirs = _write_all(tmp_path, base, fts)
    merge_checkpoints(method, dirs[0], dirs[1:], tmp_path / "o", hp, progress=False, input_hashes=["h"] * (n + 1))
    got, expected = load_state_dict(tmp_path / "o"), mergeflow.merge(method, base, fts, **hp)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_float32_inputs_round_to_bf16_as_torch_does(tmp_path):
    # Halfway cases (ties to even), the largest float32 below bf16's overflow, subnormals, signed zeros.
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7F7FFF, 0xFF7F7FFF, 0x00000001,
                         0x80000001, 0x00000000, 0x80000000, 0x3F7F8000], dtype=torch.int64)
    values = bits.to(torch.int32).view(torch.float32)
    base = {"w": torch.zeros_like(values)}
    fts = [{"w": values}]
    dirs = _write_all(tmp_path, base, fts)
    merge_checkpoints("task_arithmetic", dirs[0], dirs[1:], tmp_path / "o", {"lam": 1.0}, progress=False,
                      out_dtype=torch.bfloat16, input_hashes=["h"] * 2)
    got = load_state_dict(tmp_path / "o")["w"]
    expected = ((values - 0.0) * 1.0 + 0.0).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    assert got[0].item() == 1.0 and got[1].item() == 1.015625 and got[3].item() == 2.0**127 * 1.9921875  # by hand


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "torch"])
def test_an_output_that_overflows_its_dtype_is_refused(tmp_path, cpu_kernels):
    """Finite inputs whose merge overflows bf16 (here float32's largest value, which rounds up to
    inf) give NonFiniteOutput naming the tensor, and no output."""
    values = torch.tensor([1.0, 0x7F7FFFFF], dtype=torch.int64).to(torch.int32).view(torch.float32)
    values[0] = 1.0
    dirs = _write_all(tmp_path, {"w": torch.zeros(2)}, [{"w": values}])
    with pytest.raises(NonFiniteOutput, match="merged w .*overflows bfloat16"):
        merge_checkpoints("task_arithmetic", dirs[0], dirs[1:], tmp_path / "o", {"lam": 1.0}, progress=False,
                          out_dtype=torch.bfloat16, input_hashes=["h"] * 2, cpu_kernels=cpu_kernels)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


def test_engine_runs_the_fused_kernels_on_cpu_and_not_when_asked(tmp_path, monkeypatch):
    from mergeflow.kernels import ties as ties_kernel
    from mergeflow.kernels import window

    calls = {"merge": 0, "window": 0}
    real_merge, real_window = ties_kernel.merge, window.abs_delta_windows

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(ties_kernel, "merge", counting("merge", real_merge))
    monkeypatch.setattr(window, "abs_delta_windows", counting("window", real_window))
    base, fts = _grid_models(3, torch.bfloat16)
    dirs = _write_all(tmp_path, base, fts)
    merge_checkpoints("ties", dirs[0], dirs[1:], tmp_path / "a", {"k": 0.2}, progress=False, input_hashes=["h"] * 4)
    assert calls["merge"] == len(SHAPES) and calls["window"] == len(SHAPES)  # one unit per tensor
    calls.update(merge=0, window=0)
    merge_checkpoints("ties", dirs[0], dirs[1:], tmp_path / "b", {"k": 0.2}, progress=False, input_hashes=["h"] * 4,
                      cpu_kernels=False)
    assert calls == {"merge": 0, "window": 0}


def test_float16_inputs_take_the_torch_path_with_the_same_numbers(tmp_path):
    base, fts = _grid_models(2, torch.float16)
    dirs = _write_all(tmp_path, base, fts)
    merge_checkpoints("ties", dirs[0], dirs[1:], tmp_path / "o", {"k": 0.3}, progress=False, input_hashes=["h"] * 3)
    got, expected = load_state_dict(tmp_path / "o"), mergeflow.merge("ties", base, fts, k=0.3)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "dare_ties", "pcb"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("where", ["base", "model"])
def test_non_finite_bf16_input_is_refused_on_the_fused_path(tmp_path, method, bad, where):
    base, fts = _grid_models(2, torch.bfloat16)
    (base if where == "base" else fts[1])["proj"][3, 5] = bad
    dirs = _write_all(tmp_path, base, fts)
    with pytest.raises(NonFiniteInput, match="proj"):
        merge_checkpoints(method, dirs[0], dirs[1:], tmp_path / "o", {}, progress=False, input_hashes=["h"] * 3)
    assert not (tmp_path / "o").exists()


def test_window_kernel_counts_like_the_numpy_window():
    from mergeflow.engine.selection import _window_cpu
    from mergeflow.kernels.window import abs_delta_windows

    g = torch.Generator().manual_seed(3)
    raw = (torch.randint(-40, 41, (4, 5000), generator=g).float() / 32).to(torch.bfloat16)
    windows = [(torch.tensor([0.25, 0.5, 0.0]), torch.tensor([0.5, 0.5, 0.125])),  # one lo == hi row
               (torch.tensor([0.0, 0.125, 1.0]), torch.tensor([0.75, 1.25, 1.0]))]  # a second, as PCB's clip
    got, nonfinite = abs_delta_windows(raw, windows)
    assert nonfinite == 0 and len(got) == 2
    tau = (raw[1:].float() - raw[0].float()).abs()
    for (counts, kept), (lo, hi) in zip(got, windows, strict=True):
        ref_counts, ref_kept, _ = _window_cpu(tau, lo, hi)
        assert np.array_equal(counts, ref_counts)
        assert all(torch.equal(a, b) for a, b in zip(kept, ref_kept, strict=True))
    assert got[0][0][2, 1] == 0 and got[0][1][1].numel() == 0  # lo == hi: every window value counted at lo
    assert got[1][0][:, 0].tolist() == [int((tau[0] < 0).sum()), int((tau[0] == 0).sum()), int((tau[0] == 0.75).sum())]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_finiteness_count_finds_every_nan_and_inf(dtype):
    from mergeflow import kernels
    from mergeflow.compatibility import _all_finite

    t = torch.linspace(-1.5e38, 1.5e38, 999).to(dtype)  # large finite values near the dtype's edge
    assert kernels.count_nonfinite(t) == 0 and _all_finite(t)
    t[[0, 500, 998]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    assert kernels.count_nonfinite(t) == 3 and not _all_finite(t)
    assert kernels.count_nonfinite(t[1::2]) == 0  # strided: only the values it holds count
    assert kernels.count_nonfinite(torch.empty(0, dtype=dtype)) == 0


def test_merge_falls_back_to_the_torch_code_when_the_kernels_cannot_load(tmp_path):
    # In a fresh process where numba cannot be imported: the merge still runs, says why it is
    # slower, and writes the same bytes.
    import subprocess
    import sys

    base, fts = _grid_models(2, torch.bfloat16)
    dirs = _write_all(tmp_path, base, fts)
    script = (
        "import sys; sys.modules['numba'] = None\n"
        "from mergeflow.engine import merge_checkpoints\n"
        f"r = merge_checkpoints('ties', {str(dirs[0])!r}, {[str(d) for d in dirs[1:]]!r}, {str(tmp_path / 'o')!r},"
        " {'k': 0.3}, progress=False, input_hashes=['h'] * 3)\n"
        "import threading\n"
        "[t.join() for t in threading.enumerate() if t.name == 'mergeflow-kernels']\n"
        "print(r.output_hash)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plain = merge_checkpoints("ties", dirs[0], dirs[1:], tmp_path / "p", {"k": 0.3}, progress=False,
                              input_hashes=["h"] * 3, cpu_kernels=False)
    assert proc.stdout.split()[-1] == plain.output_hash
    assert "fused CPU kernels are unavailable" in proc.stderr


@pytest.mark.parametrize("start", [0, 1, 2, 65537])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 1000])
def test_kernel_draws_are_the_reference_draws(start, count):
    # Any start, even or odd (a unit may begin at either half of a word), and any length.
    import numpy as np

    from mergeflow.kernels.draws import tile_draws
    from mergeflow.methods.dare import draws, mask_key

    words = np.full(count // 2 + 1, 0xAAAA, dtype=np.uint64)  # scratch left over from another tile
    got = tile_draws(np.uint64(mask_key(3, "w", 1)), start, count, words)
    assert np.array_equal(got, draws(3, "w", 1, start, count))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("p", [0.3, 0.9])
@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_fused_dare_rescales_like_torch_on_random_deltas(tmp_path, monkeypatch, dtype, p, method):
    # Off-grid deltas: dividing by 1 - p rounds differently from multiplying by its inverse.
    from mergeflow.kernels import dare as dare_kernel
    from mergeflow.kernels import ties as ties_kernel

    module, attr = (dare_kernel, "merge") if method == "dare" else (ties_kernel, "dare_ties_merge")
    calls = []
    real = getattr(module, attr)
    monkeypatch.setattr(module, attr, lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(11)
    base = {"w": torch.randn(64, 33, generator=g).to(dtype)}
    fts = [{"w": (base["w"].float() + 0.01 * torch.randn(64, 33, generator=g)).to(dtype)} for _ in range(3)]
    dirs = _write_all(tmp_path, base, fts)
    hp = {"p": p, "seed": 2, **({"agg": "mean"} if method == "dare_ties" else {"lam": 0.6})}
    common = dict(progress=False, chunk_elems=500, input_hashes=["h"] * 4)
    fused = merge_checkpoints(method, dirs[0], dirs[1:], tmp_path / "f", hp, **common)
    plain = merge_checkpoints(method, dirs[0], dirs[1:], tmp_path / "t", hp, cpu_kernels=False, **common)
    assert calls and fused.output_hash == plain.output_hash


def test_methods_without_kernels_do_not_load_them(tmp_path, monkeypatch):
    from mergeflow import kernels

    asked = []
    monkeypatch.setattr(kernels, "prepare", lambda pairs: asked.append(pairs))
    base, fts = _grid_models(2, torch.bfloat16)
    dirs = _write_all(tmp_path, base, fts)
    merge_checkpoints("average", dirs[0], dirs[1:], tmp_path / "a", {}, progress=False, input_hashes=["h"] * 3)
    assert asked == []
    merge_checkpoints("ties", dirs[0], dirs[1:], tmp_path / "b", {}, progress=False, input_hashes=["h"] * 3)
    assert asked == [{(torch.bfloat16, torch.bfloat16)}]


@pytest.mark.parametrize("method, hp", [("ties", {"k": 1.0, "lam": [0.9, -0.4], "agg": "mean"}),
                                        ("ties", {"k": 1.0, "lam": [0.9, -0.4], "agg": "max"}),
                                        ("dare_ties", {"p": 0.0, "lam": [0.9, -0.4], "agg": "sum"})])
@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "torch"])
def test_a_zero_vote_on_a_negative_zero_base_waits_for_the_majority(tmp_path, method, hp, cpu_kernels):
    """Entries 2 and 4: zero deltas (scaled to +0.0 and -0.0 by the lams), so gamma = 0 and tau
    is a zero whose sign depends on the whole model's majority (-1 here); on a -0.0 base that
    sign shows in the output, so the engine must resolve them like the in-memory merge."""
    base = {"a": torch.tensor([-0.0, 1.0, -0.0, 1.0, -0.0, 1.0])}
    fts = [{"a": torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0, 0.5])},
           {"a": torch.tensor([-0.5, 1.0, 0.0, 1.0, 0.0, 1.5])}]
    dirs = _write_all(tmp_path, base, fts)
    merge_checkpoints(method, dirs[0], dirs[1:], tmp_path / "o", hp, progress=False, input_hashes=["h"] * 3,
                      cpu_kernels=cpu_kernels)
    expected = mergeflow.merge(method, base, fts, **hp)["a"]
    assert expected[2].signbit() and expected[4].signbit()  # the case this test is about
    got = load_state_dict(tmp_path / "o")["a"]
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("scales", [(1e-3, 3e-2, 1.0), (1e-4,)], ids=["mixed", "tiny products"])
def test_pcb_score_kernel_gives_the_torch_scores_bitwise(dtype, n, scales):
    """The score pass's fused kernel (nlp): the steps before exp and tanh, on the stored values,
    then torch's exp and tanh; every score must equal pcb.scores' bit for bit, at clip bounds,
    inside them, on both tanh branches, and where every product is tiny (tanh skipped)."""
    from mergeflow.methods import pcb

    g = torch.Generator().manual_seed(n)
    base = torch.randn(4096, generator=g) * 0.02  # weights of a typical scale: bf16 keeps 1e-4 deltas
    picks = torch.randint(0, len(scales), (n, 4096), generator=g)
    tau = torch.randn(n, 4096, generator=g) * torch.tensor(scales)[picks]
    raw = torch.cat([base[None], base + tau]).to(dtype)
    deltas = raw[1:].float() - raw[0].float()
    stats = {pcb.CLIP_LOW: deltas.abs().quantile(0.05, dim=1), pcb.CLIP_HIGH: deltas.abs().quantile(0.9, dim=1)}
    params = pcb.PcbParams(variant="nlp")
    expected = pcb.scores(deltas.clone(), params, stats)
    got = pcb._score_values_from_stored(raw, params, stats)["pcb_score"]
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_pcb_score_window_kernel_gives_the_torch_stats_and_bytes(tmp_path, monkeypatch, dtype):
    """The score pass's fused window (the cut's counts, its candidates and the max, from exp(intra)
    and tanh(inter) without the scores), on models large enough for a sampled window: the same
    statistics and bytes as the torch code, and the kernel did the counting, marking."""
    from mergeflow.kernels import pcb as kernel

    tiles = []
    real, real_reach = kernel.ScoreWindow.add, kernel.ScoreWindow.reach.fget
    monkeypatch.setattr(kernel.ScoreWindow, "add", lambda self, *args: tiles.append(args[-1]) or real(self, *args))
    monkeypatch.setattr(kernel, "SCORE_TILE", 1000)  # units of 3000 entries: several tiles each
    marked = []
    monkeypatch.setattr(kernel.ScoreWindow, "reach", property(lambda self: marked.append(1) or real_reach(self)))
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randint(-64, 65, (300, 64), generator=g).float() / 32, "b": torch.zeros(64),
            "empty": torch.zeros(0, 64)}  # a unit with no entries: its max is the max over nothing
    fts = [{k: v + torch.randint(-3, 4, v.shape, generator=g).float() / 64 for k, v in base.items()} for _ in range(3)]
    fts[0]["w"][:4] = base["w"][:4] * 40  # a few large products: tanh is not the identity there
    base, *fts = [{k: v.to(dtype) for k, v in sd.items()} for sd in [base, *fts]]
    dirs = _write_all(tmp_path, base, fts)
    common = dict(progress=False, workers=2, chunk_elems=3000, kth_cap=8000, kth_sample=3000, input_hashes=["h"] * 4)
    hp = {"ratio": 0.1, "clip": 0.02}
    fused = merge_checkpoints("pcb", dirs[0], dirs[1:], tmp_path / "fused", hp, **common)
    plain = merge_checkpoints("pcb", dirs[0], dirs[1:], tmp_path / "torch", hp, cpu_kernels=False, **common)
    assert 1000 in tiles and marked  # the kernel counted, several tiles a unit, and marked candidates
    assert fused.stats == plain.stats and fused.output_hash == plain.output_hash
    expected, got = mergeflow.merge("pcb", base, fts, **hp), load_state_dict(tmp_path / "fused")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_score_window_counts_ties_at_the_bounds_nan_and_the_max_as_numpy_and_torch():
    from mergeflow.engine.selection import _window_cpu
    from mergeflow.kernels.pcb import ScoreWindow

    e = torch.tensor([[1.0, 2.0, 1.0, 4.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    t = torch.tensor([[0.5, 0.5, 2.0, -1.0, 3.0, 1.5], [-0.0, 1.0, float("nan"), 2.0, 0.5, 0.5]])
    lo, hi = torch.tensor([1.0, 0.5]), torch.tensor([2.0, 0.5])  # row 1: lo == hi
    window = ScoreWindow(2, 6, lo, hi)
    window.add(e[:, :4].contiguous(), t[:, :4].contiguous(), 0)  # two tiles
    window.add(e[:, 4:].contiguous(), t[:, 4:].contiguous(), 4)
    want_counts, want_kept, want_reach = _window_cpu(e * t, lo, hi, mark=True)
    assert window.counts.tolist() == want_counts.tolist() == [[2, 1], [1, 2], [1, 0]]
    assert [k.tolist() for k in window.kept] == [k.tolist() for k in want_kept] == [[1.5], []]
    assert window.reach.tolist() == want_reach.tolist()
    assert np.unpackbits(window.reach)[:6].tolist() == [0, 1, 1, 1, 1, 1]  # column 0: both rows below lo
    maxima = window.maxima
    assert maxima[0] == 3.0 and maxima[1].isnan() and torch.equal((e * t).amax(dim=1).isnan(), maxima.isnan())
    negative = ScoreWindow(1, 3, lo[:1], hi[:1])
    negative.add(torch.ones(1, 3), torch.tensor([[-3.0, -1.0, -2.0]]), 0)
    assert negative.maxima.tolist() == [-1.0]  # the max of negative scores: the order keys flip them right


@pytest.mark.parametrize("width", [0, 5, 8, 61, 64, 1000])
def test_flagged_lists_every_set_flag_in_order_in_full_words_and_the_tail(width):
    """rows.flagged skips empty 8-flag words and scans the last width % 8 flags one by one."""
    from numba import njit

    from mergeflow.kernels.rows import flagged

    @njit
    def call(flags, positions):
        return flagged(flags, positions)

    rng = np.random.default_rng(width)
    for density in (0.0, 0.01, 0.5, 1.0):
        flags = rng.random(width) < density
        if width:
            flags[-1] = density > 0  # the tail's last flag, and a word boundary's neighbours
        positions = np.full(width, -1, dtype=np.int64)
        count = call(flags, positions)
        assert positions[:count].tolist() == np.flatnonzero(flags).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("marked", [True, False], ids=["candidates", "every entry"])
def test_pcb_merge_kernel_writes_the_torch_bytes(dtype, n, marked):
    """PCB's fused merge (nlp) against the torch `pcb` on one unit: the base outside the
    candidates, the weighted mean at them and at the base's -0.0 entries, rounded as torch does."""
    from mergeflow.methods import pcb

    g = torch.Generator().manual_seed(10 + n)
    base = torch.randn(3000, generator=g) * 0.02
    base[::7] = -0.0
    tau = torch.randn(n, 3000, generator=g) * torch.tensor([1e-3, 3e-2])[torch.randint(0, 2, (n, 3000), generator=g)]
    raw = torch.cat([base[None], base + tau]).to(dtype)
    group = TensorGroup("w", raw[0].float(), raw[1:].float())
    deltas = group.deltas
    stats = {pcb.CLIP_LOW: deltas.abs().quantile(0.05, dim=1), pcb.CLIP_HIGH: deltas.abs().quantile(0.9, dim=1)}
    params = pcb.PcbParams(ratio=0.2, lam=0.7)
    score = pcb.scores(deltas.clone(), params, stats)
    stats |= {pcb.SCORE_CUT: score.quantile(0.8, dim=1), pcb.SCORE_MAX: score.amax(dim=1)}
    candidates = (score >= stats[pcb.SCORE_CUT][:, None]).any(dim=0).nonzero().squeeze(1) if marked else None
    expected = pcb.pcb(TensorGroup("w", group.base, group.models, 0, candidates), params, stats).to(dtype)
    out = torch.empty(3000, dtype=dtype)
    pcb._pcb_fused_cpu("w", 0, raw, out, params, stats, candidates)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


def test_a_process_exits_only_after_a_kernel_load_still_running(tmp_path):
    """A merge of small models ends before numba has loaded; exiting with its loader inside LLVM
    could abort the process (exit 134) after the output was written. The exit waits for it."""
    import subprocess
    import sys

    marker = tmp_path / "loaded"
    script = (
        "import time, torch\n"
        "from mergeflow import kernels\n"
        "def slow_load(pairs):\n"
        "    time.sleep(1.5)\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "kernels._load = slow_load\n"
        "kernels.prepare({(torch.bfloat16, torch.bfloat16)})\n"  # and exit at once
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert marker.exists()  # the load finished before the process ended


def test_kernels_load_without_importing_scipy_and_leave_it_importable():
    # numba's first kernel call would import scipy.linalg (0.15-0.25 s holding the GIL) only to
    # check for BLAS; the loading thread is refused scipy, nobody else is, and nothing stays.
    import subprocess
    import sys

    script = (
        "import sys, threading, torch\n"
        "from mergeflow import kernels\n"
        "kernels.prepare({(torch.bfloat16, torch.bfloat16)})\n"
        "assert kernels.wait_ready(torch.bfloat16, torch.bfloat16, timeout=600)\n"
        "assert 'scipy' not in sys.modules\n"
        "assert not any(isinstance(f, kernels._NoScipyInThisThread) for f in sys.meta_path)\n"
        "import scipy.linalg\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_scipy_guard_refuses_only_its_own_thread():
    import threading

    from mergeflow.kernels import _NoScipyInThisThread

    guard = _NoScipyInThisThread()
    with pytest.raises(ModuleNotFoundError, match="scipy.linalg"):
        guard.find_spec("scipy.linalg")
    assert guard.find_spec("numpy") is None
    seen = []
    other = threading.Thread(target=lambda: seen.append(guard.find_spec("scipy")))
    other.start()
    other.join()
    assert seen == [None]  # another thread's import goes on to the real finders
