"""AdaMerging with learned coefficients: theta_j = theta_0,j + sum_k lambda[row(j), k] * tau_k,j.

Applies a coefficients file written by AdaMerging tuning (`mergeflow.adamerging`), so a merge
with learned coefficients skips tuning and runs in memory or in the streaming engine like any
other method. The fine-tuned models must be given in the file's `task_names` order. For an
AdaMerging++ file the task vectors are first reduced to their TIES-selected entries (whole-model
trim to the file's kept fraction, sign elected by mass), with the same functions tuning used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from mergeflow.adamerging.coefficients import Coefficients
from mergeflow.adamerging.config import AdaMergingConfig
from mergeflow.methods.base import GlobalStats, Hyperparams, StatPass, TensorGroup
from mergeflow.methods.registry import register
from mergeflow.methods.ties import MAJORITY_PASS, TRIM_PASS, TiesParams


class AdaMergingParams(AdaMergingConfig, Hyperparams):
    """The coefficients file to apply, plus the tuning settings that produce one (the pipeline's
    AdaMerging step reads those, tunes, and passes the resulting file as `coefficients`)."""

    coefficients: str | None = Field(
        None, description="path of a coefficients .safetensors from AdaMerging tuning; "
        "null in params.yaml: the pipeline tunes them first")
    unlabelled_split: Literal["test", "val", "train"] = Field(
        "test", description="where tuning draws unlabelled inputs; test = transductive, as the paper")
    unlabelled_limit: int | None = Field(
        None, gt=0, description="first N inputs per task for tuning; null = the whole split")


def load_coefficients(path: str | None) -> Coefficients:
    """The file's coefficients, re-read only when the file changes."""
    if path is None:
        raise ValueError(
            "method 'adamerging' needs learned coefficients: pass coefficients=<file> (written by "
            "mergeflow.adamerging.tune_coefficients), or run it in the pipeline, which tunes them first")
    try:
        st = os.stat(path)
    except OSError as err:
        raise ValueError(f"adamerging: coefficients={path!r}: {err.strerror}; give the file that "
                         "mergeflow.adamerging.tune_coefficients wrote") from None
    return _load(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> Coefficients:
    return Coefficients.load(path)


def _file_config(params: AdaMergingParams) -> dict:
    """The tuning settings recorded in the coefficients file."""
    return load_coefficients(params.coefficients).metadata.get("config", {})


def _check_settings(params: AdaMergingParams) -> None:
    """The file decides how it is applied (mode, AdaMerging++ and its k): a setting given here
    that differs from it is an error, not silently ignored (a stale file, or the wrong one)."""
    config = _file_config(params)
    given = params.model_dump(mode="json", include=params.model_fields_set & set(AdaMergingConfig.model_fields))
    differ = {name: (value, config[name]) for name, value in sorted(given.items())
              if name in config and value != config[name]}
    if differ:
        detail = ", ".join(f"{name}={ours!r} (the file: {theirs!r})" for name, (ours, theirs) in differ.items())
        raise ValueError(f"adamerging: {params.coefficients} was tuned with other settings: {detail}; "
                         "drop those settings (the file's apply) or give the file tuned with them")


def _ties_params(params: AdaMergingParams) -> TiesParams | None:
    """For an AdaMerging++ file, the TIES settings of its selection; None otherwise."""
    # Imported here: ties_filter imports mergeflow.methods, which imports this module.
    from mergeflow.adamerging.ties_filter import ties_selection_params

    config = _file_config(params)
    return ties_selection_params(float(config["ties_k"])) if config.get("ties_filter") else None


def _tuned(params: AdaMergingParams, name: str) -> bool:
    """Whether the file holds coefficients for tensor `name`. Tuning merged only those (the
    encoder's parameters); every other tensor stays at the base, as `apply_coefficients` does."""
    return load_coefficients(params.coefficients).covers(name)


def _without_entries(group: TensorGroup) -> TensorGroup:
    """The group with no entries: a tensor that was not tuned takes no part in the statistics."""
    return TensorGroup(group.name, group.base.reshape(-1)[:0], group.models.reshape(group.n, -1)[:, :0])


def _delegate(ties_pass: StatPass) -> StatPass:
    """TIES' own stat pass, run only for AdaMerging++ files (plain files need no statistics),
    over the tuned tensors only, as tuning's selection was."""

    def values(group: TensorGroup, params: AdaMergingParams, stats: GlobalStats) -> dict:
        tp = _ties_params(params)
        if tp is None:
            return {}
        return ties_pass.values(group if _tuned(params, group.name) else _without_entries(group), tp, stats)

    def reductions(params: AdaMergingParams) -> dict:
        tp = _ties_params(params)
        return {} if tp is None else ties_pass.reductions(tp)

    return StatPass(values, reductions)


def _check_inputs(params: AdaMergingParams, n: int, float_names: Sequence[str]) -> None:
    """Before any read: the file loads, its settings agree with the ones given, it has one
    coefficient column per fine-tuned model, and every tensor it was tuned on is here."""
    coefs = load_coefficients(params.coefficients)
    _check_settings(params)
    if n != coefs.n_tasks:
        raise ValueError(f"{params.coefficients} holds coefficients for {coefs.n_tasks} tasks "
                         f"{list(coefs.task_names)}, but {n} fine-tuned models were given")
    present = set(float_names)
    missing = [name for name in coefs.tensor_names if name not in present]
    if missing:
        raise ValueError(f"{params.coefficients} was tuned on {len(coefs.tensor_names)} tensors, {len(missing)} of "
                         f"which this checkpoint lacks (e.g. {missing[:3]}); merge the same model whose "
                         "parameters were tuned (names must match)")


@register(
    "adamerging",
    hyperparams=AdaMergingParams,
    paper="Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024",
    summary="base + learned (task- or layer-wise) coefficients times task vectors (file from AdaMerging tuning)",
    stat_passes=(_delegate(TRIM_PASS), _delegate(MAJORITY_PASS)),
    check_inputs=_check_inputs,
)
def adamerging(group: TensorGroup, params: AdaMergingParams, stats: GlobalStats) -> torch.Tensor:
    coefs = load_coefficients(params.coefficients)
    if not coefs.covers(group.name):
        return group.base.clone()
    deltas = group.deltas
    if _ties_params(params) is not None:
        from mergeflow.adamerging.ties_filter import selected_entries

        deltas = selected_entries(deltas, stats)
    row = coefs.row(group.name).to(torch.float32)
    return group.base + (row @ deltas.reshape(group.n, -1)).view(group.base.shape)
