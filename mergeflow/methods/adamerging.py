"""AdaMerging with learned coefficients: theta_j = theta_0,j + sum_k lambda[row(j), k] * tau_k,j.

Applies a coefficients file written by AdaMerging tuning (`mergeflow.adamerging`), so a merge
with learned coefficients skips tuning and runs in memory or in the streaming engine like any
other method. The fine-tuned models must be given in the file's `task_names` order. For an
AdaMerging++ file the task vectors are first reduced to their TIES-selected entries (whole-model
trim to the file's kept fraction, sign elected by mass), with the same functions tuning used.
"""

from __future__ import annotations

import os
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


def _ties_params(params: AdaMergingParams) -> TiesParams | None:
    """For an AdaMerging++ file, the TIES settings of its selection; None otherwise."""
    # Imported here: ties_filter imports mergeflow.methods, which imports this module.
    from mergeflow.adamerging.ties_filter import ties_selection_params

    config = load_coefficients(params.coefficients).metadata.get("config", {})
    return ties_selection_params(float(config["ties_k"])) if config.get("ties_filter") else None


def _delegate(ties_pass: StatPass) -> StatPass:
    """TIES' own stat pass, run only for AdaMerging++ files (plain files need no statistics)."""

    def values(group: TensorGroup, params: AdaMergingParams, stats: GlobalStats) -> dict:
        tp = _ties_params(params)
        return {} if tp is None else ties_pass.values(group, tp, stats)

    def reductions(params: AdaMergingParams) -> dict:
        tp = _ties_params(params)
        return {} if tp is None else ties_pass.reductions(tp)

    return StatPass(values, reductions)


@register(
    "adamerging",
    hyperparams=AdaMergingParams,
    paper="Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024",
    summary="base + learned (task- or layer-wise) coefficients times task vectors (file from AdaMerging tuning)",
    stat_passes=(_delegate(TRIM_PASS), _delegate(MAJORITY_PASS)),
)
def adamerging(group: TensorGroup, params: AdaMergingParams, stats: GlobalStats) -> torch.Tensor:
    coefs = load_coefficients(params.coefficients)
    if group.n != coefs.n_tasks:
        raise ValueError(
            f"{params.coefficients} holds coefficients for {coefs.n_tasks} tasks {list(coefs.task_names)}, "
            f"but {group.n} fine-tuned models were given"
        )
    deltas = group.deltas
    if _ties_params(params) is not None:
        from mergeflow.adamerging.ties_filter import selected_entries

        deltas = selected_entries(deltas, stats)
    row = coefs.row(group.name).to(torch.float32)
    return group.base + (row @ deltas.reshape(group.n, -1)).view(group.base.shape)
