"""Accuracy of merged models: joint (all classes, every head's logits concatenated) and per task
(each task's test samples, argmax over its own head only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mergeflow.datasets import Split
from mergeflow.mudsc.models import MultiHeadModel


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def evaluate(model: MultiHeadModel, split: Split, tasks: Sequence[Sequence[int]]) -> dict[str, float]:
    """{"joint": acc over all samples of all tasks, "task{k}": acc of head k on task k}."""
    all_classes = torch.tensor([c for t in tasks for c in t])
    keep = torch.isin(split.labels, all_classes)
    images, labels = split.images[keep], split.labels[keep]
    logits = _logits(model, images)
    classes = torch.tensor(model.classes)
    out = {"joint": float((classes[logits.argmax(1)] == labels).float().mean())}
    offset = 0
    for k, head_classes in enumerate(model.heads_classes):
        sel = torch.isin(labels, torch.tensor(head_classes))
        block = logits[sel, offset:offset + len(head_classes)]
        pred = torch.tensor(head_classes)[block.argmax(1)]
        out[f"task{k}"] = float((pred == labels[sel]).float().mean())
        offset += len(head_classes)
    return out


def ensemble(models: Sequence[nn.Module]) -> MultiHeadModel:
    """Output ensemble: every model's own backbone and head, logits concatenated."""
    return _Ensemble(models)


class _Ensemble(MultiHeadModel):
    def __init__(self, models: Sequence[nn.Module]) -> None:
        nn.Module.__init__(self)
        self.members = nn.ModuleList(models)
        self.heads_classes = [list(m.classes) for m in models]
        self.classes = [c for cs in self.heads_classes for c in cs]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(images) for m in self.members], dim=1)


def alone(model: nn.Module) -> MultiHeadModel:
    """One model by itself: it can only predict its own classes."""
    return MultiHeadModel(model.backbone, [model.head], [list(model.classes)])
