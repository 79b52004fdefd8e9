"""Build the embedded zoo: a pretrained ViT backbone, then per task a head and an expert.

1. Pretraining: self-supervised rotation prediction (which of 4 quarter turns?) on unlabeled
   images pooled from the source datasets. No task labels are seen, so the backbone is generic.
2. Per task, a linear probe: `nn.Linear(dim, classes)` trained on the frozen pretrained features.
3. Per task, the expert: the encoder fine-tuned with that head FROZEN (the CLIP task-vector
   setting): only the encoder moves, so pretrained, expert and merged encoders are all evaluated
   with the same per-task head. Heads are never merged.

The zoo is built in a temporary sibling directory and renamed into place at the end, so an
interrupted build leaves nothing half-made. Same spec, same bytes (on a given machine): every
random choice comes from a generator seeded by (seed, phase), training runs on a fixed thread count.

Cost of the default spec (measured here): 125 s of one CPU core in all (about 90 s training,
28 s build-time evaluation, the rest data loading); two builds gave identical bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from mergeflow import datasets
from mergeflow.checkpoint_writer import save_checkpoint
from mergeflow.datasets import Dataset
from mergeflow.evaluation import accuracy, format_accuracy_table
from mergeflow.hashing import hash_json
from mergeflow.zoo import training
from mergeflow.zoo.tasks import TASKS, load_task
from mergeflow.zoo.vit import VisionTransformer, ViTConfig, build_encoder
from mergeflow.zoo.zoo import SUMMARY_FILE, Zoo

FORMAT_VERSION = 1


class ZooSpec(BaseModel):
    """Everything that determines a zoo's bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[str, ...] = TASKS
    vit: ViTConfig = ViTConfig()
    pretrain_sources: tuple[str, ...] = ("mnist", "fashion_mnist", "digits")
    pretrain_images_per_source: int = Field(6000, gt=0)
    pretrain_steps: int = Field(500, gt=0)
    pretrain_lr: float = Field(2e-3, gt=0)
    probe_steps: int = Field(300, gt=0)
    probe_lr: float = Field(1e-2, gt=0)
    finetune_steps: int = Field(200, gt=0)
    finetune_lr: float = Field(1e-3, gt=0)
    train_size: int = Field(6000, gt=0, description="training examples per task (probe and expert)")
    batch_size: int = Field(128, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    # One thread: this tiny model gains little from two, and on a shared, oversubscribed CPU two
    # OpenMP threads spin-wait on each other (measured here: 10x slower per step, 20x the CPU).
    threads: int = Field(1, gt=0, description="torch threads while building (fixed for determinism)")
    device: str = "cpu"
    eval_limit: int | None = Field(None, gt=0, description="examples per split at build-time evaluation")
    merge_lam: float = Field(0.3, description="Task Arithmetic coefficient reported at build time")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct names from {list(TASKS)}, got {list(tasks)}")
        return tasks

    @field_validator("pretrain_sources")
    @classmethod
    def _known_sources(cls, sources: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [s for s in sources if s not in datasets.LOADERS]
        if unknown or not sources:
            raise ValueError(f"pretrain_sources must be names from {sorted(datasets.LOADERS)}, got {list(sources)}")
        return sources

    @classmethod
    def tiny(cls, **overrides: object) -> ZooSpec:
        """A zoo that builds in seconds (tests): tiny ViT, few steps, small subsets."""
        fields = dict(
            tasks=("digits", "mnist_rot90"), vit=ViTConfig(dim=16, depth=1, heads=2, mlp_dim=32),
            pretrain_sources=("digits",), pretrain_images_per_source=512, pretrain_steps=30,
            probe_steps=60, finetune_steps=40, train_size=512, batch_size=64, eval_limit=256,
            pretrain_lr=3e-3, probe_lr=3e-2, finetune_lr=3e-3,  # few steps: larger steps
        )
        fields.update(overrides)
        return cls(**fields)

    def to_json(self) -> dict:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        return hash_json(self.to_json())


def build_zoo(spec: ZooSpec | None = None, out_dir: str | Path = "zoo", progress: bool = True) -> Zoo:
    """Train and write a zoo to `out_dir` (replacing it atomically); print its accuracy table."""
    spec = spec or ZooSpec()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    # Load every dataset first: a missing one fails here, before any training.
    data = {t: load_task(t) for t in spec.tasks}
    for source in spec.pretrain_sources:
        datasets.load(source)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        tmp.mkdir(parents=True)
        summary = _build_into(spec, data, tmp, progress)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    zoo = Zoo(out_dir, summary)
    if progress:
        print(f"zoo built in {time.perf_counter() - started:.1f} s at {out_dir}")
        print(format_accuracy_table(zoo.accuracy_rows("test"), zoo.tasks))
    return zoo


def ensure_zoo(spec: ZooSpec | None = None, out_dir: str | Path = "zoo", progress: bool = True) -> Zoo:
    """Open `out_dir` if it holds a zoo built from the same spec, else build it."""
    spec = spec or ZooSpec()
    path = Path(out_dir) / SUMMARY_FILE
    if path.is_file() and json.loads(path.read_text()).get("spec") == spec.to_json():
        return Zoo.open(out_dir)
    return build_zoo(spec, out_dir, progress)


def _build_into(spec: ZooSpec, data: dict[str, Dataset], root: Path, progress: bool) -> dict:
    cfg = spec.vit
    encoder = _pretrain(spec, progress)
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    save_checkpoint(pretrained, root / "pretrained", config=cfg.to_dict())
    (root / "heads").mkdir()
    heads: dict[str, nn.Linear] = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for task in spec.tasks:
        heads[task] = _probe(spec, encoder, task, data[task], progress)
        save_file({k: v.contiguous() for k, v in heads[task].state_dict().items()},
                  str(root / "heads" / f"{task}.safetensors"), metadata={"format": "pt"})
        experts[task] = _finetune(spec, pretrained, heads[task], task, data[task], progress)
        save_checkpoint(experts[task], root / "experts" / task, config=cfg.to_dict())

    from mergeflow.merging import merge

    merged = merge("task_arithmetic", pretrained, [experts[t] for t in spec.tasks], lam=spec.merge_lam)
    # Encoder weights per (model, task): experts are evaluated on their own task only.
    states = {"pretrained": dict.fromkeys(spec.tasks, pretrained), "experts": experts,
              "task_arithmetic": dict.fromkeys(spec.tasks, merged)}
    acc: dict = {name: {} for name in states}
    acc["task_arithmetic"]["lam"] = spec.merge_lam
    jobs = [(name, split, task) for name in states for split in ("val", "test") for task in spec.tasks]
    for name, split, task in tqdm(jobs, desc="evaluate", disable=not progress, leave=False, dynamic_ncols=True):
        encoder = build_encoder(spec.vit, states[name][task]).to(spec.device)
        acc[name].setdefault(split, {})[task] = accuracy(
            encoder, heads[task].to(spec.device), getattr(data[task], split), device=spec.device,
            limit=spec.eval_limit)
    summary = {
        "format": FORMAT_VERSION,
        "spec": spec.to_json(),
        "tasks": list(spec.tasks),
        "num_classes": {t: data[t].num_classes for t in spec.tasks},
        "vit": cfg.to_dict(),
        "accuracy": acc,
    }
    (root / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _generator(spec: ZooSpec, phase: str) -> torch.Generator:
    """A generator seeded by (seed, phase): phases never share or shift each other's randomness."""
    digest = hashlib.sha256(f"{spec.seed}:{phase}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _seeded_init(spec: ZooSpec, phase: str, make):
    """Build a module with its default init drawn from a (seed, phase) stream, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(_generator(spec, phase).initial_seed()))
        return make()


def _pretrain(spec: ZooSpec, progress: bool) -> VisionTransformer:
    images = torch.cat([datasets.load(s).train.images[-spec.pretrain_images_per_source:]
                        for s in spec.pretrain_sources])
    encoder = _seeded_init(spec, "init:encoder", lambda: VisionTransformer(spec.vit))
    rotation_head = _seeded_init(spec, "init:rotation-head", lambda: nn.Linear(spec.vit.dim, 4))
    model = nn.Sequential(encoder, rotation_head).to(spec.device)
    g = _generator(spec, "pretrain")
    batches = training.mapped(training.shuffled_batches(len(images), spec.batch_size, spec.pretrain_steps, g),
                              lambda idx: training.rotation_batch(images[idx], g))
    training.fit(model, list(model.parameters()), batches, steps=spec.pretrain_steps, lr=spec.pretrain_lr,
                 weight_decay=spec.weight_decay, device=spec.device, desc="pretrain (rotation)", progress=progress)
    return encoder.cpu()


def _probe(spec: ZooSpec, encoder: VisionTransformer, task: str, data: Dataset, progress: bool) -> nn.Linear:
    train = data.train.take(spec.train_size)
    feats = training.features(encoder.to(spec.device), train.images, device=spec.device)
    encoder.cpu()
    head = _seeded_init(spec, f"init:head:{task}", lambda: nn.Linear(spec.vit.dim, data.num_classes))
    head.to(spec.device)
    g = _generator(spec, f"probe:{task}")
    batches = training.indexed(feats, train.labels, training.shuffled_batches(len(train), spec.batch_size, spec.probe_steps, g))
    training.fit(head, list(head.parameters()), batches, steps=spec.probe_steps, lr=spec.probe_lr,
                 device=spec.device, desc=f"probe {task}", progress=progress)
    head.requires_grad_(False)
    return head.cpu().eval()


def _finetune(spec: ZooSpec, pretrained: dict[str, torch.Tensor], head: nn.Linear, task: str,
              data: Dataset, progress: bool) -> dict[str, torch.Tensor]:
    train = data.train.take(spec.train_size)
    encoder = build_encoder(spec.vit, pretrained)
    frozen_head = copy.deepcopy(head).requires_grad_(False)  # a copy: the saved head stays on the CPU
    model = nn.Sequential(encoder, frozen_head).to(spec.device)
    g = _generator(spec, f"finetune:{task}")
    batches = training.indexed(train.images, train.labels,
                               training.shuffled_batches(len(train), spec.batch_size, spec.finetune_steps, g))
    training.fit(model, list(encoder.parameters()), batches, steps=spec.finetune_steps, lr=spec.finetune_lr,
                 weight_decay=spec.weight_decay, device=spec.device, desc=f"fine-tune {task}", progress=progress)
    return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished build onto `dst`; an existing zoo is moved aside first, then removed."""
    if dst.exists():
        trash = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)
