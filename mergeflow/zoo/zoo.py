"""Open a built zoo directory.

Layout (written by `build_zoo`):
    zoo.json                    spec, tasks, num_classes, build-time accuracies
    pretrained/                 encoder checkpoint (model.safetensors + config.json)
    experts/<task>/             fine-tuned encoder checkpoints, same names and shapes
    heads/<task>.safetensors    the task's linear head (weight, bias), shared by every encoder
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mergeflow.datasets import Dataset
from mergeflow.zoo.tasks import load_task
from mergeflow.zoo.vit import VisionTransformer, ViTConfig, build_encoder

SUMMARY_FILE = "zoo.json"


class Zoo:
    def __init__(self, root: Path, summary: dict) -> None:
        self.root = root
        self.summary = summary

    @classmethod
    def open(cls, root: str | Path) -> Zoo:
        root = Path(root)
        path = root / SUMMARY_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {root} is not a built zoo. Build it with `mergeflow zoo` "
                "or mergeflow.zoo.build_zoo(ZooSpec(), out_dir)."
            )
        return cls(root, json.loads(path.read_text()))

    @property
    def tasks(self) -> list[str]:
        return list(self.summary["tasks"])

    @property
    def num_classes(self) -> dict[str, int]:
        return dict(self.summary["num_classes"])

    @cached_property
    def config(self) -> ViTConfig:
        return ViTConfig.from_dict(self.summary["vit"])

    @property
    def pretrained_dir(self) -> Path:
        return self.root / "pretrained"

    def expert_dir(self, task: str) -> Path:
        self._check_task(task)
        return self.root / "experts" / task

    @property
    def expert_dirs(self) -> dict[str, Path]:
        return {t: self.expert_dir(t) for t in self.tasks}

    def head_path(self, task: str) -> Path:
        self._check_task(task)
        return self.root / "heads" / f"{task}.safetensors"

    def head(self, task: str) -> nn.Linear:
        """The task's frozen classification head."""
        tensors = load_file(str(self.head_path(task)))
        out_features, in_features = tensors["weight"].shape
        head = nn.Linear(in_features, out_features)
        head.load_state_dict(tensors)
        head.requires_grad_(False)
        return head.eval()

    def encoder(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> VisionTransformer:
        """A ViT with this zoo's config; given weights, or the pretrained weights by default."""
        if state_dict is None:
            from mergeflow.checkpoint import load_state_dict

            state_dict = load_state_dict(self.pretrained_dir)
        return build_encoder(self.config, dict(state_dict)).eval()

    def load_task(self, task: str) -> Dataset:
        self._check_task(task)
        return load_task(task)

    def accuracy(self, model: str, split: str = "test") -> dict[str, float]:
        """Build-time accuracy per task: model is 'pretrained', 'experts' or 'task_arithmetic'."""
        table = self.summary["accuracy"]
        if model not in table:
            raise KeyError(f"no build-time accuracy for {model!r}; have {sorted(table)}")
        return dict(table[model][split])

    def expert_accuracy(self, split: str = "test") -> dict[str, float]:
        return self.accuracy("experts", split)

    def pretrained_accuracy(self, split: str = "test") -> dict[str, float]:
        return self.accuracy("pretrained", split)

    def accuracy_rows(self, split: str = "test") -> dict[str, dict[str, float]]:
        """Table rows for printing: pretrained+head, experts, task arithmetic at the build's lam."""
        table = self.summary["accuracy"]
        rows = {"pretrained+head": self.accuracy("pretrained", split),
                "experts": self.accuracy("experts", split)}
        if "task_arithmetic" in table:
            rows[f"task_arithmetic({table['task_arithmetic']['lam']})"] = self.accuracy("task_arithmetic", split)
        return rows

    def _check_task(self, task: str) -> None:
        if task not in self.summary["tasks"]:
            raise ValueError(f"task {task!r} is not in this zoo; its tasks: {self.tasks}")

    def __repr__(self) -> str:
        return f"Zoo({str(self.root)!r}, tasks={self.tasks})"
