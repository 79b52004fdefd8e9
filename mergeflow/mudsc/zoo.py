"""The different-initialisation family: per architecture, two models from different random seeds
trained on disjoint label sets of real data (digits / classes 0-4 vs 5-9).

Each model is a `Classifier` (backbone + its own 5-class head). Models are saved as safetensors
directories (`config.json` records family, width, dataset, classes, seed, steps) and reused when
a directory with the same config exists, so the zoo is trained once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mergeflow import datasets
from mergeflow.checkpoint import load_state_dict
from mergeflow.checkpoint_writer import save_checkpoint
from mergeflow.mudsc.models import DEFAULT_WIDTH, Classifier, build_backbone

FAMILIES = ("mlp", "resnet_bn", "cnn_gn", "vit")
DATASETS = ("mnist", "fashion_mnist")  # the family's datasets
TEST_DATASETS = ("digits",)  # sklearn's 1,797 digits: loads instantly, for pipeline tests
TASK_CLASSES = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
DEFAULT_STEPS = {"mlp": 300, "resnet_bn": 150, "cnn_gn": 200, "vit": 300}


@dataclass(frozen=True)
class ModelSpec:
    family: str
    dataset: str
    classes: tuple[int, ...]
    seed: int
    width: int
    steps: int
    batch_size: int = 64
    lr: float = 2e-3

    @property
    def dirname(self) -> str:
        lo, hi = self.classes[0], self.classes[-1]
        return f"{self.family}-w{self.width}-{self.dataset}-c{lo}to{hi}-seed{self.seed}-s{self.steps}"


def pair_specs(family: str, dataset: str, width: int | None = None, steps: int | None = None) -> list[ModelSpec]:
    """Model k learns TASK_CLASSES[k] from random seed k."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; available: {FAMILIES}")
    if dataset not in DATASETS + TEST_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; available: {DATASETS + TEST_DATASETS}")
    return [ModelSpec(family, dataset, classes, seed, width or DEFAULT_WIDTH[family], steps or DEFAULT_STEPS[family])
            for seed, classes in enumerate(TASK_CLASSES)]


def task_split(split: datasets.Split, classes: tuple[int, ...]) -> datasets.Split:
    """The samples of `classes` (labels kept as the original class ids)."""
    keep = torch.isin(split.labels, torch.tensor(classes))
    return datasets.Split(split.images[keep], split.labels[keep])


def train(spec: ModelSpec) -> Classifier:
    """Adam on the task's training samples, deterministic given the spec (one thread: the CPU is
    shared, and tiny models gain nothing from more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(spec)
    finally:
        torch.set_num_threads(threads)


def _train(spec: ModelSpec) -> Classifier:
    data = task_split(datasets.load(spec.dataset).train, spec.classes)
    targets = torch.searchsorted(torch.tensor(spec.classes), data.labels)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = Classifier(build_backbone(spec.family, spec.width), list(spec.classes))
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    model.train()
    for _ in range(spec.steps):
        idx = torch.randint(len(targets), (spec.batch_size,), generator=gen)
        loss = F.cross_entropy(model(data.images[idx]), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save(model: Classifier, spec: ModelSpec, out_dir: str | Path) -> Path:
    return save_checkpoint(model.state_dict(), out_dir, config=asdict(spec))


def load(path: str | Path) -> Classifier:
    """A zoo model from its directory (config.json + safetensors)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    config["classes"] = tuple(config["classes"])
    spec = ModelSpec(**config)
    model = Classifier(build_backbone(spec.family, spec.width), list(spec.classes))
    model.load_state_dict(load_state_dict(path))
    return model.eval()


def build_pair(family: str, dataset: str, root: str | Path, width: int | None = None,
               steps: int | None = None) -> list[Path]:
    """Train (or reuse) the two models of one family on one dataset; returns their directories."""
    paths = []
    for spec in pair_specs(family, dataset, width, steps):
        path = Path(root) / spec.dirname
        config = path / "config.json"
        if not (config.exists() and json.loads(config.read_text()) == json.loads(json.dumps(asdict(spec)))):
            save(train(spec), spec, path)
        paths.append(path)
    return paths
