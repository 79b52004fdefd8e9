"""Checks that a base and its fine-tuned models can be merged, before any tensor is read.

Works on tensor *signatures* (name -> (shape, dtype)), which lazy checkpoints give without
reading data, so the same check guards the in-memory and the streaming paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import numpy as np
import torch

Signature = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


class IncompatibleCheckpoints(ValueError):
    """The models disagree on tensor names, shapes or dtypes (other than float precision)."""


class NonFiniteInput(ValueError):
    """An input tensor holds NaN or inf."""


def is_mergeable(dtype: torch.dtype) -> bool:
    """Only floating tensors are merged; integer and boolean buffers are copied from the base."""
    return dtype.is_floating_point


def signature_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}


BaseOnlyTensors = Literal["error", "copy"]  # what to do with tensors of the base that no model has
BASE_ONLY_CHOICES = get_args(BaseOnlyTensors)


def check_compatible(base: Signature, models: Sequence[Signature], labels: Sequence[str] | None = None,
                     max_report: int = 5, base_only_tensors: BaseOnlyTensors = "error") -> set[str]:
    """Raise IncompatibleCheckpoints naming the first mismatches; if all agree, return the
    base's tensors that are to be copied from it because no model has them.

    Fine-tunes are often saved without the parts they did not train: vision-only CLIP experts
    (FusionBench's) next to a full CLIP base with its text tower. With base_only_tensors="copy",
    the tensors that no model has are copied from the base unchanged, like integer buffers; a
    tensor that only some models lack is still an error (a model that lost part of its weights is
    a broken input). With "error" (the default), every missing tensor is an error."""
    if base_only_tensors not in BASE_ONLY_CHOICES:
        raise ValueError(f"base_only_tensors={base_only_tensors!r}; use 'error' (refuse checkpoints that lack "
                         "tensors of the base) or 'copy' (copy the tensors no model has from the base)")
    copying = base_only_tensors == "copy"
    base_only = set(base).difference(*(set(sig) for sig in models)) if copying and models else set()
    labels = list(labels) if labels is not None else [f"model {i}" for i in range(len(models))]
    problems, explained = _mismatches({k: v for k, v in base.items() if k not in base_only}, models, labels,
                                      max_report)
    if problems:
        raise IncompatibleCheckpoints(
            "checkpoints cannot be merged:\n  - " + "\n  - ".join(problems[:max_report])
            + "\nAll models must share the base's tensor names, shapes and dtypes (fine-tunes of the "
            "same pretrained checkpoint); only the precision of float tensors may differ."
            + ("" if copying or explained or not any("lacks" in p for p in problems) else
               " If the models were saved without part of the base (vision-only experts of a full CLIP, "
               "say), base_only_tensors: copy (a recipe key, or merge's argument) copies from the base "
               "the tensors that no model has.")
        )
    return base_only


def _mismatches(base: Signature, models: Sequence[Signature], labels: Sequence[str],
                max_report: int) -> tuple[list[str], bool]:
    """The first `max_report` differences in names, shapes and dtypes (other than float precision),
    and whether the names explain themselves (`_naming_hints`)."""
    problems: list[str] = []
    explained = False
    for label, sig in zip(labels, models, strict=True):
        missing = sorted(set(base) - set(sig))
        extra = sorted(set(sig) - set(base))
        if missing:
            problems.append(f"{label} lacks {len(missing)} tensor(s) of the base, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{label} has {len(extra)} tensor(s) the base lacks, e.g. {extra[:3]}")
        hints = _naming_hints(base, sig, missing, extra) if missing or extra else []
        problems += [f"{label}: {hint}" for hint in hints]
        explained = explained or bool(hints)
        for name in sorted(set(base) & set(sig)):
            (bs, bd), (ms, md) = base[name], sig[name]
            if bs != ms:
                problems.append(f"{label}: {name} has shape {list(ms)}, the base has {list(bs)}")
            elif bd != md and not (bd.is_floating_point and md.is_floating_point):
                problems.append(f"{label}: {name} has dtype {md}, the base has {bd}")
            if len(problems) >= max_report:
                break
        if len(problems) >= max_report:
            break
    return problems, explained


EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight")


def _naming_hints(base: Signature, sig: Signature, missing: list[str], extra: list[str]) -> list[str]:
    """Why a model's names may differ from the base's, where the names tell: a prefix that one
    side's names carry (a model saved from a wrapper), or an output head stored by one side and
    tied to the input embeddings by the other (tie_word_embeddings)."""
    hints = []
    every_name_differs = len(extra) == len(sig) and len(missing) == len(base)
    for names, others, (side, other_side) in ((extra, missing, ("its names", "the base's")),
                                              (missing, extra, ("the base's names", "its names"))):
        prefix = _common_prefix(names, others) if every_name_differs else None
        if prefix:
            hints.append(f"{side} carry the prefix {prefix!r} that {other_side} lack (saved from a wrapper "
                         "module?); save both the same way")
    for names, holder, other, side in ((extra, sig, base, "the base"), (missing, base, sig, "the model")):
        for head in sorted(set(names) & set(HEAD_NAMES)):
            shape = holder[head][0]
            embedding = next((n for n in other if n.endswith(EMBEDDING_SUFFIXES) and other[n][0] == shape), None)
            if embedding is not None:
                hints.append(f"{head} has the shape of {embedding}: {side} ties its output head to the input "
                             "embeddings (tie_word_embeddings) and does not store it; save every model the "
                             "same way, tied or untied")
    return hints


def _common_prefix(longer: list[str], shorter: list[str]) -> str | None:
    """The prefix p with longer == [p + n for n in shorter] (as sets), if there is one."""
    if not longer or len(longer) != len(shorter):
        return None
    candidates = [n for n in shorter if longer[0].endswith(n) and n != longer[0]]
    for name in candidates:
        prefix = longer[0][: -len(name)]
        if {prefix + n for n in shorter} == set(longer):
            return prefix
    return None


def precision_notes(base: Signature, models: Sequence[Signature], labels: Sequence[str]) -> list[str]:
    """One line per model and stored dtype where float tensors differ in precision from the base.

    Those are merged like the rest: every float tensor is read into float32, so the task vectors
    are exact differences of the stored values. Worth saying, not refusing: a fine-tune saved in
    a lower precision than its base carries that rounding in its task vector."""
    notes = []
    for label, sig in zip(labels, models, strict=True):
        differ: dict[tuple[torch.dtype, torch.dtype], int] = {}
        for name, (_, dtype) in sig.items():
            base_dtype = base[name][1]
            if dtype != base_dtype:
                differ[dtype, base_dtype] = differ.get((dtype, base_dtype), 0) + 1
        for (dtype, base_dtype), count in sorted(differ.items(), key=str):
            notes.append(f"{label} stores {count} float tensor(s) as {dtype}, the base as {base_dtype}; "
                         "all are merged in float32")
    return notes


def check_finite(name: str, tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    """Raise NonFiniteInput naming the model and tensor if any of `tensors` holds NaN or inf."""
    for label, t in zip(labels, tensors, strict=True):
        if t.is_floating_point() and not _all_finite(t):
            raise NonFiniteInput(
                f"{label}: tensor {name} contains NaN or inf; refusing to merge, nothing was "
                "written (a diverged fine-tune? check that checkpoint)"
            )


_EXPONENT_MASKS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


class NonFiniteOutput(ValueError):
    """The merge produced NaN or inf from finite inputs (an overflow); nothing is written."""


def check_finite_output(method: str, name: str, merged: torch.Tensor) -> None:
    """Raise NonFiniteOutput if a merged tensor holds NaN or inf (its inputs were checked)."""
    if merged.is_floating_point() and not _all_finite(merged):
        wider = "" if merged.dtype.itemsize >= 4 else ", or write a wider dtype (float32)"
        raise NonFiniteOutput(
            f"{method}: the merged {name} has NaN or inf values although every input is finite: the "
            f"merge overflows {str(merged.dtype).removeprefix('torch.')}. Lower lam (or p for DARE){wider}; "
            "nothing was written")


def _all_finite(t: torch.Tensor) -> bool:
    """A sum first: NaN and inf always make it non-finite, and it costs a fifth of `isfinite`
    (torch's CPU kernels make bool results slowly). Only a non-finite sum, from bad values or
    from an overflow of large finite ones, needs the exact check (in float32 for float8, which
    `isfinite` does not take). bf16 and fp16 on the CPU test their exponent bits instead: their
    float32 sum makes a float32 copy (+200 MiB peak RSS for TIES's bf16 outputs at 0.5B) and is
    2.5x slower. Where the fused CPU kernels for the dtype are loaded (the streaming engine's
    merges), their count is used: one read of the values, 5x faster than the bit test."""
    from mergeflow import kernels

    t = t.detach()
    if t.device.type == "cpu" and kernels.ready(t.dtype, t.dtype):
        return kernels.count_nonfinite(t) == 0
    if t.dtype in _EXPONENT_MASKS and t.device.type == "cpu":
        bits = t.contiguous().reshape(-1).view(torch.int16).numpy()
        mask = _EXPONENT_MASKS[t.dtype]
        return not np.any((bits & mask) == mask)  # NaN and inf have every exponent bit set
    if math.isfinite(float(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(t if t.dtype.itemsize > 1 else t.to(torch.float32)).all())
