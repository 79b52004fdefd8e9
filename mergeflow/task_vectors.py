"""Task vectors: tau_i = theta_i - theta_0, on float tensors only."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergeflow.compatibility import check_compatible, is_mergeable, signature_of


def task_vector(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Difference of float tensors, in float32 (float64 stays float64); integer/bool buffers are
    left out. float32, not the base's dtype: the difference of two bf16 or fp16 values can need
    more bits than they have, and the methods (AdaMerging's tuning too) use the exact one."""
    check_compatible(signature_of(base), [signature_of(finetuned)])
    out = {}
    for k in sorted(base):
        if is_mergeable(base[k].dtype):
            dtype = torch.float64 if base[k].dtype == torch.float64 else torch.float32
            out[k] = finetuned[k].to(dtype) - base[k].to(dtype)
    return out


def apply_task_vector(base: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor],
                      scale: float = 1.0) -> dict[str, torch.Tensor]:
    """theta_0 + scale * tau; tensors without a task vector are copied from the base."""
    out = {}
    for k, v in base.items():
        if k in tau:
            out[k] = (v.to(torch.float32) + scale * tau[k].to(torch.float32)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out
