"""mergeflow: exact model-merging methods on a streaming engine. Pure PyTorch + safetensors.

    import mergeflow
    merged = mergeflow.merge("ties", base_sd, [sd_a, sd_b], k=0.2, lam=1.0)

Imports are lazy so that `mergeflow --help` answers at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    # noqa: F401 (for type checkers and editors only)
    from mergeflow.checkpoint import Checkpoint, load_state_dict
    from mergeflow.checkpoint_writer import save_checkpoint
    from mergeflow.merging import merge
    from mergeflow.methods import all_methods, get_method

_LAZY = {
    "merge": "mergeflow.merging",
    "Checkpoint": "mergeflow.checkpoint",
    "load_state_dict": "mergeflow.checkpoint",
    "save_checkpoint": "mergeflow.checkpoint_writer",
    "all_methods": "mergeflow.methods",
    "get_method": "mergeflow.methods",
}

__all__ = [  # noqa: F822 (resolved lazily by __getattr__)
    "__version__", "merge", "Checkpoint", "load_state_dict", "save_checkpoint", "all_methods", "get_method",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergeflow' has no attribute {name!r}")
