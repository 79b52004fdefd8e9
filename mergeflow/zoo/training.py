"""Small, deterministic training loops for the zoo (pretraining, linear probes, fine-tuning).

Every random choice (batch order, rotations) comes from an explicit `torch.Generator`, so a run
is a pure function of its seed (on a fixed thread count; see `build.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

Batch = tuple[torch.Tensor, torch.Tensor]


def shuffled_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` index batches; a fresh permutation each epoch, the last short batch dropped."""
    batch_size = min(batch_size, n)
    produced = 0
    while produced < steps:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            if produced == steps:
                return
            yield order[start : start + batch_size]
            produced += 1


def rotation_batch(images: torch.Tensor, generator: torch.Generator) -> Batch:
    """Self-supervised rotation prediction: each image turned by k quarter turns, label k."""
    k = torch.randint(0, 4, (len(images),), generator=generator)
    out = images.clone()
    for turns in (1, 2, 3):
        pick = k == turns
        out[pick] = torch.rot90(images[pick], turns, dims=(2, 3))
    return out, k


def warmup_cosine(step: int, total: int, warmup_fraction: float = 0.1) -> float:
    """Learning-rate factor: linear warmup, then cosine decay to zero."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fit(model: nn.Module, parameters: list[nn.Parameter], batches: Iterator[Batch], *, steps: int,
        lr: float, weight_decay: float = 0.0, device: str = "cpu", desc: str = "train",
        progress: bool = True) -> float:
    """Minimise cross-entropy of `model(x)` on `batches` with AdamW; returns the last loss."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps))
    model.train()
    loss_value = float("nan")
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for x, y in batches:
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    bar.close()
    model.eval()
    return loss_value


@torch.inference_mode()
def features(encoder: nn.Module, images: torch.Tensor, *, batch_size: int = 1024,
             device: str = "cpu") -> torch.Tensor:
    """Encoder outputs for `images`, computed in batches without gradients (on the CPU)."""
    encoder.eval()
    return torch.cat([encoder(images[i : i + batch_size].to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


def indexed(images: torch.Tensor, labels: torch.Tensor,
            index_batches: Iterator[torch.Tensor]) -> Iterator[Batch]:
    for idx in index_batches:
        yield images[idx], labels[idx]


def mapped(index_batches: Iterator[torch.Tensor], make: Callable[[torch.Tensor], Batch]) -> Iterator[Batch]:
    for idx in index_batches:
        yield make(idx)
