"""What a merge method is: a pure per-tensor function plus the exact global statistics it needs.

Global methods (TIES, PCB) need statistics over each task's *whole-model* vector (a quantile
threshold, a min/max, a majority sign). They declare them as `StatPass`es: a function giving
per-task values for one tensor, and the reductions to take over all tensors. The in-memory path
(`mergeflow.merge`) reduces concatenated values; the streaming engine reduces them in bounded
memory with exact selection. Both then call the same `merge_tensor`, so they agree bitwise.

Streaming notes (additions, backward compatible):
- `Reduce("sum")` values may be pre-summed partials (e.g. shape (rows, 1) per tensor): integer sums
  are exact in any grouping, so the engine may also emit them per chunk of a tensor.
- `MergeMethod.elementwise` (default False): True, or a function of the hyperparameters, when
  `merge_tensor` and every StatPass `values` give for each entry a result that depends only on that
  entry across the models (and the global stats). The engine may then process a large tensor in
  row chunks (bounded memory), so such methods must avoid reductions whose float rounding depends
  on where a tensor ends (e.g. `torch.sum(dim=0)` vectorises its tail differently): use
  `sum_over_tasks`. Non-elementwise methods (per-tensor norms, per-tensor top-k) get whole tensors.
- `Reduce(scope="tensor")`: a statistic per tensor instead of per model (mergekit-style per-tensor
  TIES thresholds), read back as `stats[tensor_stat(name, group.name)]`; such methods stay
  elementwise, so large tensors still stream in row chunks.
- `Reduce(marks_candidates=True)` on a k-th value the merge only needs above (PCB's score cut): the
  engine passes `TensorGroup.candidates`, the entries that can reach it, and the method may skip
  costly work elsewhere, provided the result there is what the full formula gives.
- `FusedLastPass`: a last pass whose sum-statistic changes only a few entries (TIES's majority
  sign) runs inside the engine's merge pass (`Provisional`), saving a read of every model.
- `CpuKernel`, `StatPass.cpu_window` and `StatPass.cpu_values`: fused CPU versions
  (mergeflow.kernels) of a method's merge step, of a pass's k-th value window counts and of a
  pass's values, taken straight from the stored bf16 or float32 values. They must give bitwise
  what the torch functions give; the engine uses them on the CPU where the inputs allow and the
  torch functions everywhere else.
- `MergeMethod.check_inputs`: method-specific checks of the hyperparameters against the inputs
  (model count, float tensor names), run by both paths before any tensor is read.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

GlobalStats = Mapping[str, torch.Tensor]


class Hyperparams(BaseModel):
    """Base class of every method's hyperparameters: unknown names are errors, and so are NaN and
    infinite numbers (a NaN lam would silently give a NaN model) and booleans given for numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: object, info: ValidationInfo) -> object:
        """pydantic reads True as 1 (1.0), so YAML's `k: true` (or yes, on) would silently keep
        every entry: a boolean is refused wherever the field does not take one. So is a string
        (pydantic reads "0.2" as 0.2: a quoted number in a recipe is more likely a mistake)."""
        annotation = cls.model_fields[info.field_name].annotation
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, bool) for v in items) and not _takes(annotation, bool):
            raise ValueError(f"{value!r} holds a boolean where a number is expected "
                             "(YAML reads true/false, yes/no and on/off as booleans); write the number")
        if any(isinstance(v, str) for v in items) and not _takes_text(annotation):
            raise ValueError(f"{value!r} holds a string where a number is expected; write the number without quotes")
        return value

    @model_validator(mode="after")
    def _lam_list_not_empty(self) -> Hyperparams:
        """Every method's per-task `lam` list (where it takes one) needs one value per model."""
        if getattr(self, "lam", None) == []:
            raise ValueError("lam is an empty list; give one value per fine-tuned model, or one number")
        return self


def _meant_union_members(errors: list[dict]) -> list[dict]:
    """pydantic tries every member of a union field (`lam: float | list[float]`) and reports each
    failure, tagged with the member: `lam.float: finite number; lam.list[float]: a valid list`.
    Keep the member the input was meant for (the list one for a list), without the tag."""
    by_field: dict[object, list[dict]] = {}
    for e in errors:
        by_field.setdefault(e["loc"][0] if e["loc"] else None, []).append(e)
    kept = []
    for group in by_field.values():
        tags = {e["loc"][1] for e in group if len(e["loc"]) > 1 and isinstance(e["loc"][1], str)}
        if len(tags) < 2 or any(len(e["loc"]) < 2 for e in group):
            kept += group
            continue
        as_list = isinstance(group[0]["input"], (list, tuple))
        meant = [e for e in group if e["loc"][1].startswith("list") == as_list] or group
        kept += [{**e, "loc": (e["loc"][0], *e["loc"][2:])} for e in meant]
    return kept


def _takes(annotation: object, kind: type) -> bool:
    return annotation is kind or any(_takes(a, kind) for a in get_args(annotation))


def _takes_text(annotation: object) -> bool:
    """Whether a field takes a string: str itself, or a Literal of strings (agg="mean")."""
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, str) for a in get_args(annotation))
    return any(_takes_text(a) for a in get_args(annotation))


def validation_summary(err: ValidationError, fields: Sequence[str] = ()) -> str:
    """pydantic's errors as one line, each with its field: `k: Input should be ...; agg: ...`,
    without pydantic's links and input dumps. A key the model does not take is named with the
    `fields` it does take, and the one meant where a close one is found (`lamda`: lam)."""
    parts = []
    for e in _meant_union_members(err.errors()):
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"]).lstrip(".")
        # A validator's own message already names its field: no "Value error, " before it.
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and len(e["loc"]) == 1 and fields:
            msg = _unknown_key(str(e["loc"][0]), fields)
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _unknown_key(key: str, fields: Sequence[str]) -> str:
    """`not a known key (known: a, b); did you mean b?`"""
    close = closest_key(key, fields)
    return f"not a known key (known: {', '.join(fields)})" + (f"; did you mean {close}?" if close else "")


def closest_key(key: str, fields: Sequence[str]) -> str | None:
    """The field a mistyped key most likely meant: one that contains it or is contained in it,
    plurals aside (params: hyperparameters), else the closest by spelling (lamda: lam); None
    when nothing is close."""
    def contains(a: str, b: str) -> bool:
        a, b = a.lower().rstrip("s"), b.lower().rstrip("s")
        return len(a) >= 3 and a in b
    close = [f for f in fields if contains(key, f) or contains(f, key)]
    close = close or difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    return close[0] if close else None


@dataclass(frozen=True)
class TensorGroup:
    """One tensor name across all models, in float32.

    `models` stacks the fine-tuned tensors along dim 0: shape (n, *base.shape).
    `offset`: where this group starts in the flattened full tensor (the streaming engine passes
    row chunks of large tensors to elementwise methods; 0 for a whole tensor). Only methods
    whose result depends on an entry's position (DARE's random masks) need it.
    `candidates`: flat indices of the only entries whose result can differ from the one a method
    declared for the others (Reduce.marks_candidates); None means every entry.
    """

    name: str
    base: torch.Tensor
    models: torch.Tensor
    offset: int = 0
    candidates: torch.Tensor | None = None  # see Reduce.marks_candidates; None: every entry

    @property
    def n(self) -> int:
        return self.models.shape[0]

    @property
    def deltas(self) -> torch.Tensor:
        """Task vectors tau_i = theta_i - theta_0, shape (n, *shape)."""
        return self.models - self.base


def nonzero_positions(flat: torch.Tensor) -> torch.Tensor:
    """Indices of the non-zero (True) entries of a 1-D tensor (numpy on the CPU: ~5x faster than torch).

    A float tensor is compared with 0 first: numpy's nonzero on a bool array is ~13x faster than
    on float32 (0.1 against 1.3 ms for 512 Ki values, measured here); -0.0 counts as zero in both.
    """
    if flat.device.type == "cpu":
        values = flat.numpy()
        return torch.from_numpy(np.flatnonzero(values if values.dtype == bool else values != 0))
    return flat.nonzero().squeeze(1)


# -0.0 viewed as a signed integer of the float's width (its sign bit alone)
_NEGATIVE_ZERO_BITS = {torch.float32: (torch.int32, -(2**31)), torch.bfloat16: (torch.int16, -(2**15))}


def negative_zeros(values: torch.Tensor) -> torch.Tensor:
    """Bool mask of the -0.0 entries of a float32 or bfloat16 tensor (the only zeros where a zero
    added to them keeps its sign in the sum: -0.0 + -0.0 is -0.0, -0.0 + +0.0 is +0.0)."""
    view, pattern = _NEGATIVE_ZERO_BITS[values.dtype]
    bits = values.contiguous().view(view)
    if bits.device.type == "cpu":  # numpy: ~3x faster than torch's CPU compare to bool
        return torch.from_numpy(bits.numpy() == pattern)
    return bits == pattern


def check_lam_count(params: Hyperparams, n: int) -> None:
    """A per-task `lam` list must have one value per fine-tuned model (checked before any work)."""
    lam = getattr(params, "lam", None)
    if isinstance(lam, list) and len(lam) != n:
        raise ValueError(f"got {len(lam)} lam values for {n} fine-tuned models; give one per model")


def sum_over_tasks(values: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i values[i] (a stacked tensor or a list of rows) added in task order, so every entry's
    rounding is independent of chunking."""
    if len(values) == 1:
        return values[0].clone()
    total = torch.add(values[0], values[1])  # one pass fewer than a copy of values[0] first
    for row in values[2:]:
        total += row
    return total


@dataclass(frozen=True)
class Reduce:
    """An exact reduction, per row, of the values one StatPass emits under `source`.

    kind "kth": the rank(d)-th smallest value (1-based, d = row length over the whole model),
    as `torch.kthvalue` would give on the flattened row; a rank of d + 1 means "above every
    value" and gives +inf. "min", "max": exact. "sum": only on integer-valued inputs (counted in
    int64), so it is exact and order-independent.

    scope "model" (default): one result over all tensors, stored as stats[name]. scope "tensor":
    one result per tensor (d = that tensor's row length), stored as stats[tensor_stat(name, t)].
    """

    source: str
    kind: Literal["kth", "min", "max", "sum"]
    rank: Callable[[int], int] | None = None
    scope: Literal["model", "tensor"] = "model"
    # kth only: the merge ignores entries whose values (in every row) are below the result, so
    # the streaming engine may record which entries can reach it and pass them to merge_tensor
    # as `TensorGroup.candidates` (PCB computes its costly scores only there).
    marks_candidates: bool = False


def tensor_stat(name: str, tensor: str) -> str:
    """The stats key of a per-tensor statistic (Reduce scope "tensor")."""
    return f"{name}@{tensor}"


@dataclass(frozen=True)
class CpuValues:
    """A fused CPU version of a StatPass's `values` (see mergeflow.kernels).

    `values(raw, params, stats)` gives bitwise what `values` gives, from the stacked stored
    values raw (n + 1, m) (bf16 or float32, base first); the engine uses it on passes after the
    inputs' NaN check. `applies(params)`: whether it serves these hyperparameters (checked
    before the unit is read)."""

    values: Callable[[torch.Tensor, Hyperparams, GlobalStats], dict[str, torch.Tensor]]
    applies: Callable[[Hyperparams], bool] = lambda params: True


@dataclass(frozen=True)
class WindowCounts:
    """A fused window kernel's results for one unit (see CpuWindow)."""

    windows: list[tuple[np.ndarray, list[torch.Tensor]]]  # per (lo, hi): counts, values inside
    nonfinite: int = 0  # input values that are NaN or inf (counted by the passes that read them first)
    reach: np.ndarray | None = None  # packed bits: the columns where some row reaches the marked lo
    maxima: torch.Tensor | None = None  # each row's max (as torch.amax), where the kernel gives it


@dataclass(frozen=True)
class CpuWindow:
    """A fused CPU kernel for a StatPass whose k-th values all come from one source: what
    `selection._window_cpu` gives for each window on that source, from the stacked stored values
    raw (n + 1, m) (bf16 or float32, base first), without the values themselves.

    `counts(raw, params, stats, windows, mark)`: `windows` is [(lo, hi), ...] (rows,) each; per
    window the (3, rows) counts below lo, at lo and at hi (0 at hi when lo == hi) and each row's
    values strictly inside; with `mark` (a window's index), also `reach` for that window's lo.
    `marks`: whether it gives `reach` (a k-th value with Reduce.marks_candidates); `maxima`:
    whether it gives the rows' max, for a Reduce("max") of the same source. `applies(params)`:
    whether it serves these hyperparameters (checked before the unit is read)."""

    counts: Callable[[torch.Tensor, Hyperparams, GlobalStats, list[tuple[torch.Tensor, torch.Tensor]], int | None],
                     WindowCounts]
    applies: Callable[[Hyperparams], bool] = lambda params: True
    marks: bool = False
    maxima: bool = False


def _abs_delta_windows(raw: torch.Tensor, params: Hyperparams, stats: GlobalStats,
                       windows: list[tuple[torch.Tensor, torch.Tensor]], mark: int | None) -> WindowCounts:
    """The fused window counts of |tau|, mergeflow.kernels.window's, imported on first use
    (numba loads only for methods that use it)."""
    from mergeflow.kernels.window import abs_delta_windows as kernel

    counts, nonfinite = kernel(raw, windows)
    return WindowCounts(counts, nonfinite)


# A `StatPass.cpu_window` for passes whose values are |tau| (TIES's trim, PCB's clip).
ABS_DELTA_WINDOWS = CpuWindow(_abs_delta_windows)


@dataclass(frozen=True)
class StatPass:
    """One pass over every float tensor of the model.

    `values(group, params, stats_so_far)` returns {source: Tensor(rows, m)} for this tensor;
    `reductions(params)` names each statistic and how to reduce it. Results are Tensor(rows).
    """

    values: Callable[[TensorGroup, Hyperparams, GlobalStats], dict[str, torch.Tensor]]
    reductions: Callable[[Hyperparams], dict[str, Reduce]]
    # Optional: the window counts of the pass's k-th values by a fused kernel (see CpuWindow).
    cpu_window: CpuWindow | None = None
    # Optional: `values` by a fused kernel from the stored values (see CpuValues).
    cpu_values: CpuValues | None = None


@dataclass(frozen=True)
class Provisional:
    """One unit merged before the method's last statistic (a whole-model sum) is known.

    `merged` used a provisional value of that statistic. It is final everywhere except at the
    flat `positions` (rare, e.g. TIES entries whose summed sign is exactly 0 and whose value
    depends on the whole model's majority sign); `resolve(stat)` gives their final values once the
    statistic is complete, or None when the provisional values stand. `partial` is this unit's
    contribution to the statistic (rows,), the numbers the StatPass's `Reduce("sum")` adds up.
    """

    merged: torch.Tensor
    partial: torch.Tensor
    positions: torch.Tensor | None = None
    resolve: Callable[[torch.Tensor], torch.Tensor | None] | None = None


@dataclass(frozen=True)
class FusedLastPass:
    """Lets the streaming engine skip the method's last StatPass and fold it into the merge pass.

    `stat` is the name of the one `Reduce("sum")` statistic that pass computes; `merge(group,
    params, stats_without_it) -> Provisional`. A separate pass would read every model once more
    only to learn a value that changes a handful of entries; the in-memory path keeps the pass.
    """

    stat: str
    merge: Callable[[TensorGroup, Hyperparams, GlobalStats], Provisional]


@dataclass(frozen=True)
class CpuKernel:
    """A fused CPU version of the engine's merge step for one unit (see mergeflow.kernels).

    `merge(name, offset, raw, out, params, stats, candidates) -> (non-finite input count,
    Provisional or None)`: the unit's entries start at flat `offset` of tensor `name`
    (TensorGroup.offset); `raw` (n + 1, m) holds the stored values (bf16 or float32, base first),
    `out` (m,) receives the merged values in the output dtype (bf16 or float32); `candidates` is
    TensorGroup.candidates. With a fused last pass it returns that pass's Provisional (its
    `merged` unused), else None. Bitwise what `merge_tensor` (or the fused last pass) followed by
    `.to(out.dtype)` gives. `applies(params)`: whether the kernel serves these hyperparameters.
    """

    merge: Callable[[str, int, torch.Tensor, torch.Tensor, Hyperparams, GlobalStats, torch.Tensor | None],
                    tuple[int, Provisional | None]]
    applies: Callable[[Hyperparams], bool] = lambda params: True


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge_tensor: Callable[[TensorGroup, Hyperparams, GlobalStats], torch.Tensor]
    hyperparams: type[Hyperparams]
    paper: str
    summary: str
    stat_passes: tuple[StatPass, ...] = field(default=())
    min_models: int = 1
    max_models: int | None = None
    elementwise: bool | Callable[[Hyperparams], bool] = False
    fused_last_pass: FusedLastPass | None = None
    cpu_kernel: CpuKernel | None = None
    # Merges task vectors theta_i - theta_0: the base listed as a fine-tune adds nothing (refused).
    # False for methods that combine the models themselves (average, slerp).
    task_vectors: bool = True
    # Method-specific checks of the inputs, run before any tensor is read: check_inputs(params,
    # number of fine-tuned models, the float tensor names); raises ValueError naming the problem.
    check_inputs: Callable[[Hyperparams, int, Sequence[str]], None] | None = None

    def takes(self, n: int) -> bool:
        """Whether the method merges n fine-tuned models."""
        return self.min_models <= n and (self.max_models is None or n <= self.max_models)

    @property
    def models_wanted(self) -> str:
        """How many fine-tuned models it merges, in words: "2", "at least 1", "2 to 5"."""
        if self.max_models == self.min_models:
            return str(self.min_models)
        return f"at least {self.min_models}" if self.max_models is None else f"{self.min_models} to {self.max_models}"

    def is_elementwise(self, params: Hyperparams) -> bool:
        """Whether the engine may split tensors into row chunks for these hyperparameters."""
        return self.elementwise(params) if callable(self.elementwise) else bool(self.elementwise)

    def params(self, **values: object) -> Hyperparams:
        """Validate hyperparameters (pydantic); errors name the field."""
        return self.hyperparams(**values)

    def params_error(self, err: ValidationError) -> str:
        """`params`' error as one line (`validation_summary`), an unknown key with this method's
        hyperparameters."""
        return validation_summary(err, list(self.hyperparams.model_fields))
