"""The embedded zoo: the ViT encoder, the task suite, the build (layout, determinism, atomicity)."""

from __future__ import annotations

import json
from pathlib import Path

import fixtures_zoo
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from mergeflow.checkpoint import Checkpoint, load_state_dict
from mergeflow.zoo import Zoo, ZooSpec, build_zoo
from mergeflow.zoo import build as build_module
from mergeflow.zoo.build import ensure_zoo
from mergeflow.zoo.tasks import TASKS, load_task
from mergeflow.zoo.vit import VisionTransformer, ViTConfig


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    return fixtures_zoo.tiny_zoo(tmp_path_factory)


def _micro_spec(**overrides) -> ZooSpec:
    """Smaller than tiny: one task from bundled data, a few steps (for build-twice tests)."""
    fields = dict(tasks=("digits",), pretrain_steps=4, probe_steps=4, finetune_steps=4,
                  pretrain_images_per_source=128, train_size=128, eval_limit=64)
    fields.update(overrides)
    return ZooSpec.tiny(**fields)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the encoder ---------------------------------------------------------------------------

def test_vit_forward_shape_and_timm_names():
    cfg = ViTConfig(dim=16, depth=2, heads=2, mlp_dim=24)
    model = VisionTransformer(cfg)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 16)
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"patch_embed.weight", "patch_embed.bias", "cls_token", "pos_embed", "norm.weight", "norm.bias"}
    expected |= {f"blocks.{i}.{n}" for i in range(2) for n in per_block}
    state = model.state_dict()
    assert set(state) == expected
    assert list(model.buffers()) == []  # nothing beyond parameters: functional_call sees it all
    assert state["blocks.0.attn.qkv.weight"].shape == (48, 16)
    assert state["pos_embed"].shape == (1, 17, 16)  # 16 patches of 7x7 + the class token
    assert state["blocks.1.mlp.fc1.weight"].shape == (24, 16)


def test_functional_call_with_other_weights_matches_loading_them():
    cfg = ViTConfig(dim=16, depth=1, heads=2, mlp_dim=24)
    torch.manual_seed(0)
    a, b = VisionTransformer(cfg), VisionTransformer(cfg)
    x = torch.rand(2, 1, 28, 28)
    out = torch.func.functional_call(a, dict(b.state_dict()), (x,))
    assert torch.equal(out, b(x))
    assert not torch.equal(out, a(x))


def test_vit_config_round_trip_and_errors():
    cfg = ViTConfig(dim=32, depth=2, heads=4, mlp_dim=64)
    d = cfg.to_dict()
    assert d["model_type"] == "mergeflow-vit"
    assert ViTConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match="model_type"):
        ViTConfig.from_dict({**d, "model_type": "bert"})
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        ViTConfig.from_dict({**d, "width": 3})
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(dim=30, heads=4)


# --- tasks ---------------------------------------------------------------------------------

def test_task_suite():
    assert len(TASKS) >= 4 and len(set(TASKS)) == len(TASKS)
    rot = load_task("mnist_rot90")
    mnist = load_task("mnist")
    assert torch.equal(rot.test.images[:5], torch.rot90(mnist.test.images[:5], 1, dims=(2, 3)))
    assert torch.equal(rot.test.labels, mnist.test.labels)
    digits = load_task("digits")
    assert digits.train.images.shape[1:] == (1, 28, 28) and digits.num_classes == 10
    with pytest.raises(ValueError, match="unknown zoo task"):
        load_task("cifar10")


def test_spec_validation():
    with pytest.raises(ValidationError, match="tasks"):
        ZooSpec(tasks=("mnist", "cifar10"))
    with pytest.raises(ValidationError, match="tasks"):
        ZooSpec(tasks=("mnist", "mnist"))
    with pytest.raises(ValidationError, match="extra"):
        ZooSpec(learning_rate=0.1)
    with pytest.raises(ValidationError, match="finetune_steps"):
        ZooSpec(finetune_steps=0)
    spec = ZooSpec.tiny()
    assert ZooSpec.model_validate(json.loads(json.dumps(spec.to_json()))) == spec


# --- the build -----------------------------------------------------------------------------

def test_layout(tiny_zoo):
    zoo = Zoo.open(tiny_zoo.root)
    summary = json.loads((zoo.root / "zoo.json").read_text())
    assert summary["tasks"] == list(ZooSpec.tiny().tasks) == zoo.tasks
    assert summary["spec"] == ZooSpec.tiny().to_json()
    assert set(summary["accuracy"]) == {"pretrained", "experts", "task_arithmetic"}
    assert set(summary["accuracy"]["experts"]["test"]) == set(zoo.tasks)
    dim = ZooSpec.tiny().vit.dim
    base = Checkpoint(zoo.pretrained_dir)
    assert json.loads((zoo.pretrained_dir / "config.json").read_text())["model_type"] == "mergeflow-vit"
    assert set(base.names) == set(VisionTransformer(zoo.config).state_dict())  # encoder only, no head
    for task in zoo.tasks:
        expert = Checkpoint(zoo.expert_dir(task))
        assert (zoo.expert_dir(task) / "model.safetensors").is_file()
        assert expert.signature() == base.signature()
        head = load_file(str(zoo.root / "heads" / f"{task}.safetensors"))
        assert set(head) == {"weight", "bias"}
        assert head["weight"].shape == (zoo.num_classes[task], dim)
        assert not zoo.head(task).weight.requires_grad
    # fine-tuning moved the encoder; and every task's expert moved differently
    a, b = (load_state_dict(zoo.expert_dir(t)) for t in zoo.tasks)
    base_sd = load_state_dict(zoo.pretrained_dir)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], base_sd["blocks.0.attn.qkv.weight"])
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])
    assert not list(zoo.root.parent.glob(f".{zoo.root.name}.tmp-*"))


def test_experts_beat_pretrained_on_tiny_zoo(tiny_zoo):
    # Reliable even at this size: each expert fine-tunes the encoder for its own frozen head.
    pre, exp = tiny_zoo.pretrained_accuracy("test"), tiny_zoo.expert_accuracy("test")
    for task in tiny_zoo.tasks:
        assert exp[task] > pre[task] + 0.05, (task, pre[task], exp[task])


def test_open_errors(tmp_path, tiny_zoo):
    with pytest.raises(FileNotFoundError, match="not a built zoo"):
        Zoo.open(tmp_path)
    with pytest.raises(ValueError, match="not in this zoo"):
        tiny_zoo.expert_dir("fashion_mnist")


def test_ensure_zoo_reuses_a_zoo_of_the_same_spec(tiny_zoo):
    stamp = (tiny_zoo.root / "zoo.json").stat().st_mtime_ns
    again = ensure_zoo(ZooSpec.tiny(), tiny_zoo.root, progress=False)
    assert again.summary == tiny_zoo.summary
    assert (tiny_zoo.root / "zoo.json").stat().st_mtime_ns == stamp


def test_build_is_deterministic_and_seeded(tmp_path):
    build_zoo(_micro_spec(), tmp_path / "a", progress=False)
    build_zoo(_micro_spec(), tmp_path / "b", progress=False)
    build_zoo(_micro_spec(seed=1), tmp_path / "c", progress=False)
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert sorted(a) == sorted(b) == sorted(c)
    assert a == b
    assert a["pretrained/model.safetensors"] != c["pretrained/model.safetensors"]


def test_interrupted_build_leaves_nothing_and_keeps_the_old_zoo(tmp_path, monkeypatch):
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "zoo.json").write_text("{}")  # stands for a previous zoo

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_finetune", fail)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(_micro_spec(), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]
    assert [p.name for p in out.iterdir()] == ["zoo.json"]
    assert (out / "zoo.json").read_text() == "{}"
