"""Merged weights as a differentiable function of the coefficients.

theta_j(lambda) = theta_0,j + sum_k lambda[row(j), k] * tau_k,j for every merged tensor j.

The base tensors and the task vectors live once on the tuning device: each tensor's K task
vectors are stacked into one (K, *shape) tensor (optionally bf16 to halve their memory). A
custom autograd function computes the weighted sum and keeps only a reference to that stack
for its backward (d theta_j / d lambda_k = tau_k,j), so autograd never stores float32 copies
of bf16 task vectors and nothing is copied between devices after setup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mergeflow.adamerging.coefficients import Mode


class _WeightedTaskVectorSum(torch.autograd.Function):
    """sum_k c_k * stack_k in float32; gradient only for c."""

    @staticmethod
    def forward(ctx, coefs: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(stack)
        flat = stack.reshape(stack.shape[0], -1)
        return (coefs @ flat.to(torch.float32)).view(stack.shape[1:])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (stack,) = ctx.saved_tensors
        flat = stack.reshape(stack.shape[0], -1).to(torch.float32)
        return flat @ grad.reshape(-1).to(torch.float32), None


def weighted_task_vector_sum(coefs: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """sum_k coefs[k] * stack[k] (float32), differentiable in `coefs` only."""
    return _WeightedTaskVectorSum.apply(coefs, stack)


class DifferentiableMerge:
    """Holds theta_0 and the stacked task vectors on one device; `merged(coefs)` builds theta(lambda).

    base: {name: tensor} (the tensors to merge, in the order the coefficient rows follow);
    task_vectors: one {name: delta} per task, same names. Tensors are moved to `device` once.
    """

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        task_vectors: Sequence[Mapping[str, torch.Tensor]],
        *,
        device: str | torch.device = "cpu",
        task_vector_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not task_vectors:
            raise ValueError("AdaMerging needs at least one task vector")
        if task_vector_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"task_vector_dtype must be float32, bfloat16 or float16, got {task_vector_dtype}")
        names = list(base)
        for k, tv in enumerate(task_vectors):
            missing = [n for n in names if n not in tv]
            extra = [n for n in tv if n not in base]
            if missing or extra:
                raise ValueError(
                    f"task vector {k} does not cover the merged tensors: missing {missing[:5]}, "
                    f"unexpected {extra[:5]} (task vectors must have exactly the encoder's parameter names)"
                )
            for n in names:
                if tuple(tv[n].shape) != tuple(base[n].shape):
                    raise ValueError(f"task vector {k}, tensor {n!r}: shape {tuple(tv[n].shape)} != base {tuple(base[n].shape)}")
        self.device = torch.device(device)
        self.names: tuple[str, ...] = tuple(names)
        self.n_tasks = len(task_vectors)
        self.base = {n: base[n].detach().to(self.device) for n in names}
        self.stacks = {
            n: torch.stack([tv[n].detach().to(task_vector_dtype) for tv in task_vectors]).to(self.device)
            for n in names
        }

    def rows_for(self, mode: Mode) -> int:
        return 1 if mode == "task_wise" else len(self.names)

    def merged(self, coefs: torch.Tensor) -> dict[str, torch.Tensor]:
        """theta(coefs) for (rows, n_tasks) coefficients; differentiable in `coefs`."""
        if coefs.shape[1] != self.n_tasks or coefs.shape[0] not in (1, len(self.names)):
            raise ValueError(
                f"coefficients shape {tuple(coefs.shape)} fits neither task-wise (1, {self.n_tasks}) "
                f"nor layer-wise ({len(self.names)}, {self.n_tasks})"
            )
        task_wise = coefs.shape[0] == 1
        out = {}
        for j, name in enumerate(self.names):
            row = coefs[0 if task_wise else j]
            delta = weighted_task_vector_sum(row, self.stacks[name])
            out[name] = (self.base[name].to(torch.float32) + delta).to(self.base[name].dtype)
        return out

    def nbytes(self) -> int:
        """Device memory held for theta_0 and the task vectors."""
        return sum(t.numel() * t.element_size() for t in (*self.base.values(), *self.stacks.values()))
