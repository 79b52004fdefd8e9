"""Apply learned coefficients to a base state dict and its task vectors (no tuning)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mergeflow.adamerging.coefficients import Coefficients
from mergeflow.adamerging.merged_params import DifferentiableMerge
from mergeflow.adamerging.ties_filter import ties_selected_task_vectors


def apply_coefficients(
    base: Mapping[str, torch.Tensor],
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    coefficients: Coefficients,
) -> dict[str, torch.Tensor]:
    """theta_0 + sum_k lambda_k * tau_k for the file's tensors; every other tensor of `base` is
    copied. Task vectors are in `coefficients.task_names` order; AdaMerging++ files re-apply the
    TIES selection they were tuned with. Same arithmetic as tuning, so the result is identical to
    the tuned model's weights."""
    if len(task_vectors) != coefficients.n_tasks:
        raise ValueError(f"{coefficients.n_tasks} tasks {list(coefficients.task_names)} in the coefficients, "
                         f"{len(task_vectors)} task vectors given")
    names = list(coefficients.tensor_names)
    tvs = [{n: tv[n] for n in names} for tv in task_vectors]
    config = coefficients.metadata.get("config", {})
    if config.get("ties_filter"):
        tvs = ties_selected_task_vectors(tvs, k=float(config["ties_k"]))
    merge = DifferentiableMerge({n: base[n] for n in names}, tvs)
    with torch.no_grad():
        merged = merge.merged(coefficients.values.to(torch.float32))
    return {k: merged[k] if k in merged else v.clone() for k, v in base.items()}
