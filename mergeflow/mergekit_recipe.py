"""Translate a mergekit YAML recipe into a mergeflow recipe, or say exactly what cannot be.

Supported `merge_method`s and what they become (mergekit semantics, per tensor):
- `task_arithmetic`: base + sum_i w_i tau_i                    -> task_arithmetic(lam=[w_i])
  (with `normalize: true`: lam=[w_i * lambda / sum_i w_i])
- `ties`: per-tensor magnitude trim to `density`, sign of the weighted sum, then with
  `normalize: true` (mergekit's default) the mean of the agreeing entries
  -> ties(trim_scope="tensor", k=density, agg="mean", lam=lambda), or with unequal weights
  their weighted mean -> ties(agg="weighted_mean", lam=[w_i]) (lambda 1 only); with
  `normalize: false` the sum of the weighted agreeing entries -> ties(agg="sum", lam=[w_i * lambda]).
- `dare_ties`: as ties with the random drop (p = 1 - density)   -> dare_ties(p, agg, lam)
- `dare_linear`: random drop, weighted sum                      -> dare(p, lam=[w_i])
- `linear` with normalize (its default): the weighted mean of every listed model (base_model
  too, when it is listed; base_model is optional)              -> average(weights=[w_i])
- `slerp` between `base_model` and one other model, scalar t    -> slerp(t), models [base, other]
`dtype` / `out_dtype` become the output dtype (mergeflow always computes in float32).
`tokenizer_source: base` (or `tokenizer: {source: base}`) is accepted: mergeflow copies the base
model's tokenizer files in any case.

Every weight 0 gives the base model in the task-vector methods (mergekit's divisor guard turns
0/0 into 0), and is refused for linear (mergekit divides by the zero sum: a NaN model).

Known differences (bench/bench_vs_mergekit.py measures them; linear, and task_arithmetic with
weights 1, agree bit for bit in float32; other weights round differently in the last bit, as
mergeflow scales each task vector by its lam and mergekit the weighted sum):
- where the weighted trimmed sum is exactly zero, mergekit takes the sign +1, mergeflow the whole
  model's majority sign (the official TIES rule);
- entries tied at a tensor's trim threshold: mergekit keeps exactly int(density * numel) entries,
  choosing among the tied ones by the order of torch's argsort, which is not stable on CPU (so
  its choice is arbitrary); mergeflow keeps every tied entry (deterministic; the official TIES
  rule). bf16 task vectors have many ties: on bench_engine's small Llama in float32, 67,174 of
  4,999,424 entries differed for this reason and 3,943 for the first, none for any other;
- mergekit computes in the recipe's dtype (bf16 rounds every intermediate), mergeflow in
  float32, rounding once at the end;
- DARE: besides the random masks (different generators), the rescale of the kept entries:
  mergeflow multiplies them by 1/(1-p), as the DARE paper's code; mergekit (0.1.5) scales each
  task's tensor back to its L1 norm before the drop. The two agree in expectation, and closely
  on large tensors; on a 256-entry norm tensor at density 0.5 they differed by up to 12.6 %.
Everything else that
mergekit can express but mergeflow cannot (per-model densities that differ, per-layer gradient
lists, tensor filters, slices, tokenizer merging, linear without normalize unless its weights
sum to 1, ...) is an
error that names the field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch

from mergeflow.recipe import RecipeError

METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "linear", "slerp")
IGNORED_GLOBAL = {"int8_mask"}  # a memory optimisation of mergekit's; no effect on the result
CONSENSUS = ("ties", "dare_ties")  # mergekit divides by the weights of the agreeing entries only
# mergekit's non-consensus divisor guard: a weight sum below this divides by 1 instead
MIN_WEIGHT_SUM = 1e-8

Fail = Callable[[str], "MergekitRecipeError"]


class MergekitRecipeError(RecipeError):
    """A mergekit recipe uses something mergeflow cannot reproduce (a RecipeError: the CLI
    reports it as one line, like every other bad recipe)."""


def from_mergekit(cfg: dict[str, Any], *, source: str = "recipe") -> dict[str, Any]:
    """mergekit config -> mergeflow Recipe fields."""

    def fail(msg: str) -> MergekitRecipeError:
        return MergekitRecipeError(f"{source} (mergekit recipe): {msg}")

    allowed = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "name",
               "tokenizer_source", "tokenizer"}
    extra = sorted(set(cfg) - allowed, key=str)
    if extra:
        raise fail(f"{', '.join(map(str, extra))}: not supported by mergeflow "
                   f"(supported keys: {', '.join(sorted(allowed))})")
    method = cfg["merge_method"]
    if not isinstance(method, str) or method not in METHODS:
        raise fail(f"merge_method: {method!r} is not supported; supported: {', '.join(METHODS)}")
    base = cfg.get("base_model")
    if base is not None and (not isinstance(base, str) or not base):
        raise fail(f"base_model: expected one model path or name, got {base!r}")
    if not base and method != "linear":  # linear alone does not use a base (see _linear)
        raise fail("base_model: required (mergeflow merges fine-tunes of one base model)")
    _check_tokenizer(cfg, base, fail)
    entries = cfg.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise fail("models: a non-empty list of {model: ..., parameters: ...} is required")
    globals_ = _mapping(cfg.get("parameters"), "parameters", fail)
    for key in IGNORED_GLOBAL:
        globals_.pop(key, None)
    # A global weight/density is the default of every model that does not set its own.
    default_weight = globals_.pop("weight", 1.0)
    default_density = globals_.pop("density", 1.0)
    # Task-vector methods drop a listed base (mergekit skips it: its task vector is zero);
    # linear averages every listed model and slerp takes the base as its first end.
    keep_base = method in ("linear", "slerp")
    models, weights, densities = [], [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise fail(f"models[{i}]: expected a mapping with a 'model' key")
        unknown = sorted(set(entry) - {"model", "parameters"}, key=str)
        if unknown:
            raise fail(f"models[{i}].{unknown[0]}: not supported")
        name = entry["model"]
        if not isinstance(name, str) or not name:
            raise fail(f"models[{i}].model: expected a model path or name, got {name!r}")
        params = _mapping(entry.get("parameters"), f"models[{i}].parameters", fail)
        if base and _same_model(name, base) and not keep_base:
            if params:
                raise fail(f"models[{i}]: parameters on the base model are not supported "
                           f"({method} gives it no task vector); drop them")
            continue
        for key in sorted(set(params) - {"weight", "density"}, key=str):
            raise fail(f"models[{i}].parameters.{key}: not supported (only weight and density)")
        models.append(name)
        weights.append(_per_model(params, "weight", default_weight, i, fail))
        densities.append(_per_model(params, "density", default_density, i, fail))
    if not models:
        raise fail(f"models: no model to merge besides base_model {base!r}; list the fine-tuned models")
    if len(set(densities)) > 1:
        raise fail(f"models[*].parameters.density: per-model densities differ ({densities}); "
                   "mergeflow uses one density for all models")
    density = densities[0]
    if not 0.0 <= density <= 1.0 or (method.startswith("dare") and density == 0.0):
        raise fail(f"parameters.density: {density:g} is not a kept fraction; give one in "
                   f"{'(0, 1]' if method.startswith('dare') else '[0, 1]'} (1 keeps every entry)")
    out = {"base": base, "dtype": cfg.get("out_dtype") or cfg.get("dtype")}

    if method == "slerp":
        t = _scalar(globals_.pop("t", None), "parameters.t", fail, required=True)
        _no_more(globals_, fail)
        others = [m for m in models if not _same_model(m, base)]
        if len(entries) != 2 or len(others) != 1:
            raise fail("models: slerp takes exactly two models, one of them the base_model")
        return {**out, "method": "slerp", "models": [base, others[0]], "hyperparameters": {"t": t}}

    lam = _scalar(globals_.pop("lambda", 1.0), "parameters.lambda", fail)
    normalize = _flag(globals_.pop("normalize", method in ("ties", "linear")), "parameters.normalize", fail)
    # mergekit's default: rescale the DARE methods' dropped task vectors, not the others'
    rescale = _flag(globals_.pop("rescale", method.startswith("dare")), "parameters.rescale", fail)
    _no_more(globals_, fail)
    if method.startswith("dare") and not rescale:
        raise fail("parameters.rescale: false is not supported (DARE always rescales the kept "
                   "entries, by 1/(1-p) as the DARE paper's code)")
    if method == "ties" and rescale and density < 1.0:
        raise fail("parameters.rescale: true is not supported for ties (mergekit then scales each "
                   "trimmed task vector back to its L1 norm; TIES, as its official code, does not "
                   "rescale); drop it")
    equal = len(set(weights)) == 1
    if method == "linear":
        return _linear(out, models, weights, normalize, lam, fail)
    lam_value: float | list[float]
    if normalize and not equal:
        lam_value = _weighted_lams(method, weights, lam, fail)
    elif normalize:
        lam_value = _normalized_lam(method, weights[0], len(models), lam)
    else:
        per_task = [w * lam for w in weights]
        lam_value = per_task[0] if equal else per_task
    if method == "task_arithmetic":
        return {**out, "method": "task_arithmetic", "models": models, "hyperparameters": {"lam": lam_value}}
    if method == "dare_linear":
        return {**out, "method": "dare", "models": models,
                "hyperparameters": {"p": 1.0 - density, "lam": lam_value}}
    # the consensus methods' aggregation (mergekit divides by the agreeing entries' weights)
    agg = ("mean" if equal else "weighted_mean") if normalize else "sum"
    if method == "ties":
        return {**out, "method": "ties", "models": models, "hyperparameters": {
            "k": density, "lam": lam_value, "agg": agg, "trim_scope": "tensor"}}
    return {**out, "method": "dare_ties", "models": models, "hyperparameters": {
        "p": 1.0 - density, "lam": lam_value, "agg": agg}}


def _weighted_lams(method: str, weights: list[float], lam: float, fail: Fail) -> list[float]:
    """mergeflow's per-task lams for mergekit's normalize: true with unequal weights.

    With consensus (ties, dare_ties) mergekit divides sum_i w_i t_i mask_i by sum_i w_i mask_i:
    agg "weighted_mean" with lam_i = w_i, which has no place left for a lambda. Without consensus
    it divides sum_i w_i t_i by sum_i w_i (1 if that is about 0), then scales by lambda:
    lam_i = w_i * lambda / sum_i w_i (equal up to float rounding)."""
    if method in CONSENSUS:
        if lam != 1.0:
            raise fail("parameters.lambda: with unequal weights under normalize: true (a weighted mean) "
                       f"{method} takes no lambda in mergeflow; fold it into the weights or drop it")
        return list(weights)
    total = sum(weights)
    divisor = total if abs(total) >= MIN_WEIGHT_SUM else 1.0
    return [w * lam / divisor for w in weights]


def _normalized_lam(method: str, weight: float, n: int, lam: float) -> float:
    """mergeflow's lam for mergekit's normalize: true with n equal weights `weight`.

    mergekit divides the weighted sum by a divisor that it replaces by 1 where it is (about) 0.
    With consensus (ties, dare_ties) the divisor is sum_i w mask_i: the weights cancel into the
    mean of the agreeing entries (agg mean, lam), and all-zero weights give a zero sum over 1, so
    the base itself (lam 0). Without consensus it is n w: the mean of the task vectors (lam / n),
    unless |n w| < 1e-8, where the guard leaves the plain weighted sum (lam w; 0 for weight 0).
    """
    if method in CONSENSUS:
        return lam if weight != 0 else 0.0
    if abs(n * weight) < MIN_WEIGHT_SUM:
        return weight * lam
    return lam / n


def _linear(out: dict[str, Any], models: list[str], weights: list[float], normalize: bool, lam: float,
            fail: Fail) -> dict[str, Any]:
    """mergekit linear (sum_i w_i theta_i / sum_i w_i over the listed models) as mergeflow's average;
    without normalize (no division) only where the weights sum to exactly 1."""
    if lam != 1.0:
        raise fail("parameters.lambda: not supported for linear (a weighted mean); drop it")
    total = float(torch.tensor(weights, dtype=torch.float32).sum())  # the divisor, as both tools add it
    if not normalize and total != 1.0:  # with a sum of exactly 1, dividing by it changes nothing
        raise fail(f"parameters.normalize: false sums w_i * theta_i without dividing by the weights' sum "
                   f"(here {total:g}), which mergeflow's average always does; give weights that sum "
                   "to 1, or normalize: true")
    if sum(weights) == 0:  # mergekit's linear has no divisor guard: 0 / 0
        raise fail(f"models[*].parameters.weight: the weights {weights} sum to 0, so mergekit's linear "
                   "divides by a zero sum (a NaN model); give weights whose sum is not 0")
    # average ignores the base's tensors: it only supplies the non-float tensors and the config
    # and tokenizer files, which every listed model shares, so without a base_model the first
    # listed model serves.
    return {**out, "base": out["base"] or models[0], "method": "average", "models": models,
            "hyperparameters": {"weights": list(weights)}}


def _same_model(a: str, b: str | None) -> bool:
    """Whether two references name the same model ('./base/' and 'base' do)."""
    return b is not None and os.path.normpath(a) == os.path.normpath(b)


def _check_tokenizer(cfg: dict[str, Any], base: str | None, fail: Fail) -> None:
    """`tokenizer_source: base` (or `tokenizer: {source: base}`, or the base_model itself) is what
    mergeflow does anyway: it copies the tokenizer files of the base. Anything else (`union`,
    another model's tokenizer, added tokens) would need the embeddings re-laid out: refused."""
    for key, value in (("tokenizer_source", cfg.get("tokenizer_source")),
                       ("tokenizer", cfg.get("tokenizer"))):
        if value is None:
            continue
        source = value.get("source") if key == "tokenizer" and isinstance(value, dict) else value
        extra = sorted(set(value) - {"source"}, key=str) if isinstance(value, dict) else []
        field = f"{key}.source" if key == "tokenizer" else key
        if extra:
            raise fail(f"{key}.{extra[0]}: not supported (mergeflow copies the base model's tokenizer files)")
        if not base or not isinstance(source, str) or not (source == "base" or _same_model(source, base)):
            raise fail(f"{field}: {source!r} is not supported; mergeflow copies the tokenizer files of "
                       "base_model, which is `base` (use that, or drop the key)")


def _mapping(value: object, field: str, fail: Fail) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(f"{field}: expected a mapping (e.g. {{weight: 1.0, density: 0.5}}), got {value!r}")
    return dict(value)


def _flag(value: object, field: str, fail: Fail) -> bool:
    # bool('false') is True: a quoted 'false' would silently mean true.
    if not isinstance(value, bool):
        raise fail(f"{field}: expected true or false (a YAML boolean, unquoted), got {value!r}")
    return value


def _scalar(value: object, field: str, fail: Fail, *, required: bool = False) -> float:
    if value is None and required:
        raise fail(f"{field}: required")
    if isinstance(value, list):
        if any(isinstance(v, dict) for v in value):
            raise fail(f"{field}: per-tensor filters ({{filter: ..., value: ...}}) are not supported; "
                       "give one number")
        raise fail(f"{field}: per-layer gradient lists are not supported; give one number")
    if isinstance(value, dict):
        raise fail(f"{field}: per-tensor filters are not supported; give one number")
    if isinstance(value, bool):  # float(True) is 1.0: a YAML true/yes/on is never a number here
        raise fail(f"{field}: expected a number, got the boolean {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise fail(f"{field}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise fail(f"{field}: expected a finite number, got {value!r}")
    return number


def _per_model(params: dict, key: str, default: object, i: int, fail: Fail) -> float:
    """A model's weight or density: its own, or the recipe's global one (named as such in errors)."""
    if key in params:
        return _scalar(params[key], f"models[{i}].parameters.{key}", fail)
    return _scalar(default, f"parameters.{key}", fail)


def _no_more(params: dict, fail: Fail) -> None:
    if params:
        key = sorted(params, key=str)[0]
        raise fail(f"parameters.{key}: not supported by mergeflow's translation")
