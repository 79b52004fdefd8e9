"""AdaMerging: learn merging coefficients by minimising prediction entropy on unlabelled data.

Official semantics (reference/algorithms.md section 5), every one a field of `AdaMergingConfig`:
coefficients start at 0.3 and are clamped to [0, 1] in the forward pass; Adam (lr 1e-3, betas
(0.9, 0.999), no weight decay); 500 steps; each step draws, for every task, a fresh shuffle of its
unlabelled samples and takes 2 batches of 16; the loss is the SUM over tasks and batches of the
batch-mean entropy of that task's frozen head; one optimizer step per iteration.

How a step runs: theta(lambda) is built once from the device-resident base and task vectors
(`DifferentiableMerge`); the encoder runs on it through `torch.func.functional_call` (no module
copy). By default every task's batches go through the encoder in ONE call (`fuse_batches`; each
batch still gets its own head and batch-mean entropy, so the loss is unchanged) and the loss is
back-propagated to a detached copy of theta; with `fuse_batches=False` each batch is
back-propagated on its own (one batch's activations alive at a time). One final backward carries
d loss / d theta to lambda. The gradient equals back-propagating the official summed loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from mergeflow.adamerging.coefficients import Coefficients, clamp_coefficients, initial_raw
from mergeflow.adamerging.config import TASK_VECTOR_DTYPES, AdaMergingConfig
from mergeflow.adamerging.entropy import mean_entropy
from mergeflow.adamerging.merged_params import DifferentiableMerge
from mergeflow.adamerging.ties_filter import ties_selected_task_vectors

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TuneResult:
    coefficients: Coefficients
    loss: list[float]  # per step: the optimised loss (sum over tasks and batches), before the update
    task_entropy: dict[str, list[float]]  # per step and task: mean entropy over its batches


def hf_pooled_features(output: Any) -> torch.Tensor:
    """Features of a Hugging Face encoder output: the pooler output (BERT's [CLS] dense+tanh,
    what *ForSequenceClassification feeds its classifier), else the first token's hidden state."""
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled
    return output.last_hidden_state[:, 0]


def default_features(output: Any) -> torch.Tensor:
    """A tensor output is the feature vector (the zoo ViT); HF outputs use `hf_pooled_features`."""
    return output if isinstance(output, torch.Tensor) else hf_pooled_features(output)


def merged_parameter_names(encoder: nn.Module) -> list[str]:
    """The tensors AdaMerging merges: the encoder's float parameters, in `named_parameters` order
    (the official code's order; tied parameters appear once)."""
    return [n for n, p in encoder.named_parameters() if p.is_floating_point()]


def tune_coefficients(
    encoder: nn.Module,
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    heads: Mapping[str, nn.Module],
    unlabelled: Mapping[str, Inputs],
    config: AdaMergingConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    features: Callable[[Any], torch.Tensor] = default_features,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_step: Callable[[int, float, dict[str, float]], None] | None = None,
) -> TuneResult:
    """Learn AdaMerging coefficients.

    encoder: the pretrained encoder (its parameters are theta_0; it is moved to `device`, put in
        eval mode and never modified otherwise). task_vectors: {task: {param name: tau}} for every
        float parameter. heads: {task: frozen head} mapping features to logits. unlabelled:
        {task: inputs} (a tensor, or a dict of tensors such as input_ids/attention_mask) with
        samples along dim 0. Tasks are ordered as in `task_vectors`.
    """
    config = config or AdaMergingConfig()
    tasks = list(task_vectors)
    _check_tasks(tasks, heads, unlabelled, config)
    device = torch.device(device)
    # Move first, so theta_0 in `merge` shares the module's device storage (held once).
    encoder.to(device).eval().requires_grad_(False)
    names = merged_parameter_names(encoder)
    params = dict(encoder.named_parameters())
    tvs = [task_vectors[t] for t in tasks]
    if config.ties_filter:
        tvs = ties_selected_task_vectors(tvs, k=config.ties_k)
    merge = DifferentiableMerge(
        {n: params[n] for n in names}, tvs, device=device,
        task_vector_dtype=TASK_VECTOR_DTYPES[config.task_vector_dtype],
    )
    del tvs
    heads = {t: heads[t].to(device).eval().requires_grad_(False) for t in tasks}

    raw = nn.Parameter(initial_raw(config.mode, len(tasks), len(names), config.prior).to(device))
    optimizer = torch.optim.Adam(
        [raw], lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    loss_curve: list[float] = []
    task_curves: dict[str, list[float]] = {t: [] for t in tasks}
    bar = tqdm(range(config.steps), desc=f"{config.variant} ({config.mode})", disable=not progress)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        per_task = _step(encoder, merge, raw, heads, unlabelled, config, generator, device, features)
        total = sum(per_task.values())
        optimizer.step()
        loss_curve.append(total)
        for t in tasks:
            task_curves[t].append(per_task[t] / _n_batches(unlabelled[t], config))
        bar.set_postfix(loss=f"{total:.4f}")
        if on_step is not None:
            on_step(step, total, {t: task_curves[t][-1] for t in tasks})

    values = clamp_coefficients(raw.detach(), config.clamp_min, config.clamp_max).cpu()
    meta = {"variant": config.variant, "config": config.tuning_fields(), **(metadata or {})}
    coefficients = Coefficients(
        mode=config.mode, task_names=tuple(tasks), tensor_names=tuple(names),
        values=values.contiguous(), raw=raw.detach().cpu().contiguous(), metadata=meta,
    )
    return TuneResult(coefficients, loss_curve, task_curves)


def _step(encoder, merge, raw, heads, unlabelled, config, generator, device, features) -> dict[str, float]:
    """One AdaMerging iteration's forward/backward; leaves d loss / d raw in raw.grad."""
    coefs = clamp_coefficients(raw, config.clamp_min, config.clamp_max)
    merged = merge.merged(coefs)
    # Leaves that collect d loss / d theta; one final backward carries it on to the coefficients.
    leaves = {n: t.detach().requires_grad_(True) for n, t in merged.items()}
    batches = [(task, _index(unlabelled[task], idx)) for task in heads
               for idx in _batch_indices(_length(unlabelled[task]), config, generator)]
    if config.fuse_batches and _concatenable([b for _, b in batches]):
        losses = _fused_forward_backward(encoder, leaves, heads, batches, device, features)
    else:
        losses = {}
        for task, batch in batches:  # backward per batch: one batch's activations alive at a time
            out = _call(encoder, leaves, _to_device(batch, device))
            loss = mean_entropy(heads[task](features(out)))
            loss.backward()
            losses[task] = losses.get(task, 0.0) + loss.detach()
    # Parameters the forward pass never reads (a CLIP image encoder's text-side tensors, say) get
    # no gradient: as in the official code, their coefficients get none from them. Seeding
    # their backward with None would fail, or, for a 0-dim tensor, add its tau to the gradient.
    used = [n for n in merged if leaves[n].grad is not None]
    if used:
        torch.autograd.backward([merged[n] for n in used], [leaves[n].grad for n in used])
    return {t: float(v) for t, v in losses.items()}


def _fused_forward_backward(encoder, leaves, heads, batches, device, features) -> dict[str, torch.Tensor]:
    """All batches in one encoder call; each keeps its own head and batch-mean entropy."""
    inputs = _concat([b for _, b in batches])
    feats = features(_call(encoder, leaves, _to_device(inputs, device)))
    total, losses, start = 0.0, {}, 0
    for task, batch in batches:
        stop = start + _length(batch)
        loss = mean_entropy(heads[task](feats[start:stop]))
        total = total + loss
        losses[task] = losses.get(task, 0.0) + loss.detach()
        start = stop
    total.backward()
    return losses


def _concatenable(batches: list[Inputs]) -> bool:
    """Same per-sample shapes (and keys) across every batch, so one tensor can hold them all."""
    def shapes(b: Inputs):
        if isinstance(b, torch.Tensor):
            return (tuple(b.shape[1:]), b.dtype)
        return tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in b.items()))
    return len({shapes(b) for b in batches}) == 1


def _concat(batches: list[Inputs]) -> Inputs:
    if isinstance(batches[0], torch.Tensor):
        return torch.cat(batches)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _call(encoder: nn.Module, params: dict[str, torch.Tensor], batch: Inputs):
    if isinstance(batch, torch.Tensor):
        return functional_call(encoder, params, (batch,))
    return functional_call(encoder, params, (), dict(batch))


def _batch_indices(n: int, config: AdaMergingConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """The official loader: a fresh shuffle, batches 0 .. batches_per_step-1 of size batch_size."""
    perm = torch.randperm(n, generator=generator)
    starts = range(0, min(n, config.batch_size * config.batches_per_step), config.batch_size)
    return [perm[s : s + config.batch_size] for s in starts]


def _n_batches(inputs: Inputs, config: AdaMergingConfig) -> int:
    n = _length(inputs)
    return min(config.batches_per_step, -(-n // config.batch_size))


def _length(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    return next(iter(inputs.values())).shape[0]


def _index(inputs: Inputs, idx: torch.Tensor) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs[idx]
    return {k: v[idx] for k, v in inputs.items()}


def _to_device(batch: Inputs, device: torch.device) -> Inputs:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _check_tasks(tasks, heads, unlabelled, config: AdaMergingConfig) -> None:
    if not tasks:
        raise ValueError("AdaMerging needs at least one task vector")
    for what, mapping in (("heads", heads), ("unlabelled", unlabelled)):
        missing = [t for t in tasks if t not in mapping]
        if missing:
            raise ValueError(f"{what} has no entry for task(s) {missing}; tasks: {tasks}")
    for t in tasks:
        inputs = unlabelled[t]
        lengths = {int(v.shape[0]) for v in (inputs.values() if isinstance(inputs, Mapping) else [inputs])}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"unlabelled inputs of task {t!r} must be non-empty with one sample count, got {lengths}")
