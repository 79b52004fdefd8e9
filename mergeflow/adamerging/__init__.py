"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation.

    from mergeflow.adamerging import AdaMergingConfig, tune_coefficients, Coefficients
    result = tune_coefficients(encoder, {task: tau}, {task: head}, {task: unlabelled_inputs},
                               AdaMergingConfig(mode="layer_wise"), device="cuda")
    result.coefficients.save("coefficients.safetensors")
    merged = apply_coefficients(base_state_dict, [tau per task], Coefficients.load(...))
    # or: mergeflow.merge("adamerging", base, finetuned, coefficients="coefficients.safetensors")

Imports are lazy so that registering the `adamerging` merge method stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from mergeflow.adamerging.apply import apply_coefficients  # noqa: F401
    from mergeflow.adamerging.coefficients import Coefficients, clamp_coefficients  # noqa: F401
    from mergeflow.adamerging.config import AdaMergingConfig  # noqa: F401
    from mergeflow.adamerging.entropy import mean_entropy, softmax_entropy  # noqa: F401
    from mergeflow.adamerging.merged_params import DifferentiableMerge  # noqa: F401
    from mergeflow.adamerging.ties_filter import ties_selected_task_vectors  # noqa: F401
    from mergeflow.adamerging.tune import (  # noqa: F401
        TuneResult,
        default_features,
        hf_pooled_features,
        merged_parameter_names,
        tune_coefficients,
    )

_LAZY = {
    "apply_coefficients": "mergeflow.adamerging.apply",
    "Coefficients": "mergeflow.adamerging.coefficients",
    "clamp_coefficients": "mergeflow.adamerging.coefficients",
    "mean_entropy": "mergeflow.adamerging.entropy",
    "softmax_entropy": "mergeflow.adamerging.entropy",
    "DifferentiableMerge": "mergeflow.adamerging.merged_params",
    "ties_selected_task_vectors": "mergeflow.adamerging.ties_filter",
    "AdaMergingConfig": "mergeflow.adamerging.config",
    "TuneResult": "mergeflow.adamerging.tune",
    "default_features": "mergeflow.adamerging.tune",
    "hf_pooled_features": "mergeflow.adamerging.tune",
    "merged_parameter_names": "mergeflow.adamerging.tune",
    "tune_coefficients": "mergeflow.adamerging.tune",
}

__all__ = list(_LAZY)  # noqa: F822


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergeflow.adamerging' has no attribute {name!r}")
