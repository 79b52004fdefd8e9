"""The zoo's task suite: four image-classification tasks built from real offline data.

- `mnist`: handwritten digits (MNIST, 50k/10k/10k).
- `fashion_mnist`: clothing (Fashion-MNIST, 50k/10k/10k).
- `digits`: scikit-learn's 8x8 digits upsampled to 28x28 (1000/297/500): blurry, tiny, few-shot.
- `mnist_rot90`: MNIST rotated by 90 degrees, same labels. It shares its images' content with
  `mnist` but needs different features for the same classes, so merging the two experts
  genuinely conflicts (a merged encoder must serve upright and rotated digits at once).
"""

from __future__ import annotations

from functools import cache

import torch

from mergeflow import datasets
from mergeflow.datasets import Dataset, Split

TASKS: tuple[str, ...] = ("mnist", "fashion_mnist", "digits", "mnist_rot90")


def _rotate90(split: Split) -> Split:
    # Counter-clockwise quarter turn of every image; contiguous so batches slice fast.
    return Split(torch.rot90(split.images, k=1, dims=(2, 3)).contiguous(), split.labels)


@cache
def _mnist_rot90() -> Dataset:
    base = datasets.load("mnist")
    return Dataset("mnist_rot90", _rotate90(base.train), _rotate90(base.val), _rotate90(base.test), 10)


_DERIVED = {"mnist_rot90": _mnist_rot90}


def load_task(name: str) -> Dataset:
    """The task's dataset (train/val/test splits of (N, 1, 28, 28) images in [0, 1])."""
    if name not in TASKS:
        raise ValueError(f"unknown zoo task {name!r}; available: {list(TASKS)}")
    if name in _DERIVED:
        return _DERIVED[name]()
    return datasets.load(name)
