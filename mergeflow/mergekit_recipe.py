"""Translate a mergekit YAML recipe into a mergeflow recipe, or say exactly what cannot be.

Supported `merge_method`s and what they become (mergekit semantics, per tensor):
- `task_arithmetic`: base + sum_i w_i tau_i                    -> task_arithmetic(lam=[w_i])
- `ties`: per-tensor magnitude trim to `density`, sign of the weighted sum, then with
  `normalize: true` (mergekit's default) the mean of the agreeing entries (equal weights only)
  -> ties(trim_scope="tensor", k=density, agg="mean", lam=lambda); with `normalize: false`
  the sum of the weighted agreeing entries -> ties(agg="sum", lam=[w_i * lambda]).
- `dare_ties`: as ties with the random drop (p = 1 - density)   -> dare_ties(p, agg, lam)
- `dare_linear`: random drop, weighted sum                      -> dare(p, lam=[w_i])
- `linear` with equal weights and normalize                     -> average
- `slerp` between `base_model` and one other model, scalar t    -> slerp(t), models [base, other]
`dtype` / `out_dtype` become the output dtype (mergeflow always computes in float32).

One known difference: where the weighted trimmed sum is exactly zero, mergekit takes the sign
+1, mergeflow the whole model's majority sign (the official TIES rule). Everything else that
mergekit can express but mergeflow cannot (per-model densities that differ, per-layer gradient
lists, tensor filters, slices, tokenizer merging, unequal weights under normalize, ...) is an
error that names the field.
"""

from __future__ import annotations

from typing import Any

from mergeflow.recipe import RecipeError

METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "linear", "slerp")
IGNORED_GLOBAL = {"int8_mask"}  # a memory optimisation of mergekit's; no effect on the result


class MergekitRecipeError(RecipeError):
    """A mergekit recipe uses something mergeflow cannot reproduce (a RecipeError: the CLI
    reports it as one line, like every other bad recipe)."""


def from_mergekit(cfg: dict[str, Any], *, source: str = "recipe") -> dict[str, Any]:
    """mergekit config -> mergeflow Recipe fields."""

    def fail(msg: str) -> MergekitRecipeError:
        return MergekitRecipeError(f"{source} (mergekit recipe): {msg}")

    allowed = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "name"}
    extra = sorted(set(cfg) - allowed)
    if extra:
        raise fail(f"{', '.join(extra)}: not supported by mergeflow (supported keys: {', '.join(sorted(allowed))})")
    method = cfg["merge_method"]
    if method not in METHODS:
        raise fail(f"merge_method: {method!r} is not supported; supported: {', '.join(METHODS)}")
    base = cfg.get("base_model")
    if not base:
        raise fail("base_model: required (mergeflow merges fine-tunes of one base model)")
    entries = cfg.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise fail("models: a non-empty list of {model: ..., parameters: ...} is required")
    globals_ = dict(cfg.get("parameters") or {})
    for key in IGNORED_GLOBAL:
        globals_.pop(key, None)
    # A global weight/density is the default of every model that does not set its own.
    default_weight = globals_.pop("weight", 1.0)
    default_density = globals_.pop("density", 1.0)
    models, weights, densities = [], [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise fail(f"models[{i}]: expected a mapping with a 'model' key")
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise fail(f"models[{i}].{unknown[0]}: not supported")
        name = entry["model"]
        params = entry.get("parameters") or {}
        if name == base and method != "slerp":
            if params:
                raise fail(f"models[{i}]: parameters on the base model are not supported")
            continue  # mergekit lets the base appear in the list; it contributes no task vector
        for key in sorted(set(params) - {"weight", "density"}):
            raise fail(f"models[{i}].parameters.{key}: not supported (only weight and density)")
        models.append(name)
        weights.append(_scalar(params.get("weight", default_weight), f"models[{i}].parameters.weight", fail))
        densities.append(_scalar(params.get("density", default_density), f"models[{i}].parameters.density", fail))
    if len(set(densities)) > 1:
        raise fail(f"models[*].parameters.density: per-model densities differ ({densities}); "
                   "mergeflow uses one density for all models")
    density = densities[0] if densities else 1.0
    out = {"base": base, "dtype": cfg.get("out_dtype") or cfg.get("dtype")}

    if method == "slerp":
        t = _scalar(globals_.pop("t", None), "parameters.t", fail, required=True)
        _no_more(globals_, fail)
        others = [m for m in models if m != base]
        if len(entries) != 2 or len(others) != 1:
            raise fail("models: slerp takes exactly two models, one of them the base_model")
        return {**out, "method": "slerp", "models": [base, others[0]], "hyperparameters": {"t": t}}

    lam = _scalar(globals_.pop("lambda", 1.0), "parameters.lambda", fail)
    normalize_default = method in ("ties", "linear")
    normalize = bool(globals_.pop("normalize", normalize_default))
    rescale = bool(globals_.pop("rescale", True))
    _no_more(globals_, fail)
    if method.startswith("dare") and not rescale:
        raise fail("parameters.rescale: false is not supported (DARE always rescales by 1/(1-p))")
    equal = len(set(weights)) == 1
    if normalize and not equal:
        raise fail(f"models[*].parameters.weight: unequal weights {weights} with normalize: true "
                   "(a weighted mean) are not supported; use equal weights or normalize: false")
    if method == "linear":
        if not normalize or lam != 1.0:
            raise fail("linear without normalize (or with lambda) is not supported; use task_arithmetic")
        return {**out, "method": "average", "models": models, "hyperparameters": {}}
    if normalize:
        scale, per_task = lam, None  # equal weights cancel in the normalised mean
    else:
        per_task = [w * lam for w in weights]
        scale = per_task[0] if equal else None
    lam_value = scale if scale is not None else per_task
    if method == "task_arithmetic":
        if normalize:  # sum_i w tau_i / (n w): the mean of the task vectors
            lam_value = lam / len(models)
        return {**out, "method": "task_arithmetic", "models": models, "hyperparameters": {"lam": lam_value}}
    if method == "dare_linear":
        if normalize:
            lam_value = lam / len(models)
        return {**out, "method": "dare", "models": models,
                "hyperparameters": {"p": 1.0 - density, "lam": lam_value}}
    agg = "mean" if normalize else "sum"
    if method == "ties":
        return {**out, "method": "ties", "models": models, "hyperparameters": {
            "k": density, "lam": lam_value, "agg": agg, "trim_scope": "tensor"}}
    return {**out, "method": "dare_ties", "models": models, "hyperparameters": {
        "p": 1.0 - density, "lam": lam_value, "agg": agg}}


def _scalar(value: object, field: str, fail, *, required: bool = False) -> float:
    if value is None and required:
        raise fail(f"{field}: required")
    if isinstance(value, list):
        raise fail(f"{field}: per-layer gradient lists are not supported; give one number")
    if isinstance(value, dict):
        raise fail(f"{field}: per-tensor filters are not supported; give one number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise fail(f"{field}: expected a number, got {value!r}") from None


def _no_more(params: dict, fail) -> None:
    if params:
        key = sorted(params)[0]
        raise fail(f"parameters.{key}: not supported by mergeflow's translation")
