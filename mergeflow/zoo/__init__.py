"""The embedded default model zoo: a small pretrained ViT, per-task experts and frozen heads.

    from mergeflow.zoo import Zoo, ZooSpec, build_zoo
    zoo = build_zoo(ZooSpec(), "artifacts/zoo")      # or Zoo.open("artifacts/zoo")
    zoo.tasks, zoo.pretrained_dir, zoo.expert_dir("mnist"), zoo.head("mnist")

Imports are lazy: `mergeflow.zoo.vit` is importable without pulling in data or training code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover (for type checkers and editors only)
    from mergeflow.zoo.build import ZooSpec, build_zoo, ensure_zoo  # noqa: F401
    from mergeflow.zoo.tasks import TASKS, load_task  # noqa: F401
    from mergeflow.zoo.vit import VisionTransformer, ViTConfig  # noqa: F401
    from mergeflow.zoo.zoo import Zoo  # noqa: F401

_LAZY = {
    "Zoo": "mergeflow.zoo.zoo",
    "ZooSpec": "mergeflow.zoo.build",
    "build_zoo": "mergeflow.zoo.build",
    "ensure_zoo": "mergeflow.zoo.build",
    "TASKS": "mergeflow.zoo.tasks",
    "load_task": "mergeflow.zoo.tasks",
    "ViTConfig": "mergeflow.zoo.vit",
    "VisionTransformer": "mergeflow.zoo.vit",
}

__all__ = list(_LAZY)  # noqa: F822 (resolved lazily by __getattr__)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergeflow.zoo' has no attribute {name!r}")
