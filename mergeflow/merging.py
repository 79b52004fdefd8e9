"""The in-memory merge contract: `merge(method, base, finetuned, **hparams) -> state dict`."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from pydantic import ValidationError

from mergeflow.compatibility import (
    BaseOnlyTensors,
    check_compatible,
    check_finite,
    check_finite_output,
    is_mergeable,
    signature_of,
)
from mergeflow.methods import GlobalStats, Hyperparams, MergeMethod, TensorGroup, get_method
from mergeflow.methods.base import check_lam_count, tensor_stat
from mergeflow.statistics import reduce_all, reduce_rows

StateDict = Mapping[str, torch.Tensor]


def merge(method: str, base: StateDict, finetuned: Sequence[StateDict], *, base_only_tensors: BaseOnlyTensors = "error",
          **hparams: object) -> dict[str, torch.Tensor]:
    """Merge fine-tuned state dicts of one base model with a registered method.

    Float tensors are merged in float32 and cast back to the base's dtype; integer and boolean
    tensors (position ids, BN counters) are copied from the base unchanged, and so, with
    `base_only_tensors="copy"`, are the base's tensors that no fine-tuned model has.
    """
    m = get_method(method)
    try:
        params = m.params(**hparams)
    except ValidationError as err:
        raise ValueError(f"invalid hyperparameters for {method!r}: {m.params_error(err)}") from None
    _check_state_dicts(base, finetuned)
    _check_model_count(m, len(finetuned))
    _warn_if_repeated(m, base, finetuned)
    check_lam_count(params, len(finetuned))
    base_signature, signatures = signature_of(base), [signature_of(sd) for sd in finetuned]
    base_only = check_compatible(base_signature, signatures, base_only_tensors=base_only_tensors)
    float_names = [k for k in sorted(base) if is_mergeable(base[k].dtype) and k not in base_only]
    _check_something_to_merge(base, float_names)
    if m.check_inputs is not None:
        m.check_inputs(params, len(finetuned), float_names)
    labels = ["base", *(f"model {i}" for i in range(len(finetuned)))]
    for name in float_names:  # values are checked before any merging work starts
        check_finite(name, [base[name], *(sd[name] for sd in finetuned)], labels)

    def group(name: str) -> TensorGroup:  # detached: merging is not differentiated (AdaMerging has its own path)
        return TensorGroup(
            name=name,
            base=base[name].detach().to(torch.float32),
            models=torch.stack([sd[name].detach().to(torch.float32) for sd in finetuned]),
        )

    stats = global_stats(m, params, lambda: (group(k) for k in float_names))
    merged = {}
    for name in sorted(base):
        if name in float_names:
            merged[name] = m.merge_tensor(group(name), params, stats).to(base[name].dtype)
            check_finite_output(m.name, name, merged[name])
        else:
            merged[name] = base[name].detach().clone()
    return merged


def global_stats(method: MergeMethod, params: Hyperparams,
                 groups: Callable[[], Iterable[TensorGroup]]) -> GlobalStats:
    """Run the method's stat passes over all tensors in memory (exact reference semantics).

    `groups()` yields the TensorGroups afresh for each pass, so only the pass's values are held
    across tensors, not every tensor's float32 copy of every model.
    """
    stats: dict[str, torch.Tensor] = {}
    for stat_pass in method.stat_passes:
        reductions = stat_pass.reductions(params)
        per_model = {k: how for k, how in reductions.items() if how.scope == "model"}
        per_tensor = {k: how for k, how in reductions.items() if how.scope == "tensor"}
        needed = {how.source for how in per_model.values()}  # only these are kept across tensors
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        for g in groups():
            values = stat_pass.values(g, params, stats)
            for source in needed & values.keys():
                collected[source].append(values[source])
            for k, how in per_tensor.items():
                v = values[how.source]
                stats[tensor_stat(k, g.name)] = reduce_rows(v.reshape(v.shape[0], -1), how)
        stats.update(reduce_all(collected, per_model))
    return stats


def _check_state_dicts(base: object, finetuned: object) -> None:
    """Wrong container types get a TypeError that says what is expected, not an AttributeError
    from deep inside (a single state dict passed as `finetuned` would iterate over its keys)."""
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence):
        raise TypeError(f"finetuned must be a list of state dicts (one per fine-tuned model), got "
                        f"{type(finetuned).__name__}")
    for label, sd in [("base", base), *((f"finetuned[{i}]", sd) for i, sd in enumerate(finetuned))]:
        if not isinstance(sd, Mapping):
            raise TypeError(f"{label} must be a state dict (a mapping of names to tensors), got {type(sd).__name__}")
        bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise TypeError(f"{label}[{bad!r}] is a {type(sd[bad]).__name__}, not a torch.Tensor")
        meta = next((k for k, v in sd.items() if v.is_meta), None)
        if meta is not None:
            raise ValueError(f"{label}[{meta!r}] is a meta tensor (no values: a model built on the meta device "
                             "and never loaded); load its weights first")


def _warn_if_repeated(m: MergeMethod, base: StateDict, finetuned: Sequence[StateDict]) -> None:
    """The same state dict object twice (`[ft] * 3`), or the base as a fine-tuned model (a zero
    task vector), is merged as given: the math is defined, and hand-checked cases use it. It is
    more often a slip than a plan, so it gets a warning (the engine, fed paths, refuses it)."""
    for i, sd in enumerate(finetuned):
        first = next(j for j, other in enumerate(finetuned) if other is sd)
        if m.task_vectors and sd is base:
            warnings.warn(f"finetuned[{i}] is the base state dict itself: its task vector is zero", stacklevel=3)
        elif first != i:
            warnings.warn(f"finetuned[{i}] is the same state dict as finetuned[{first}]: it is merged twice",
                          stacklevel=3)


def _check_something_to_merge(base: StateDict, float_names: list[str]) -> None:
    if not any(base[k].numel() for k in float_names):
        raise ValueError(f"the base has no float tensor with any entries to merge ({len(base)} tensors in all); "
                         "is it the right state dict?")


def _check_model_count(m: MergeMethod, n: int) -> None:
    if not m.takes(n):
        raise ValueError(f"method {m.name!r} needs {m.models_wanted} fine-tuned model(s), got {n}")
