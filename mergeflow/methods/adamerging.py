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

import torch
from pydantic import Field

from mergeflow.adamerging.coefficients import Coefficients
from mergeflow.adamerging.ties_filter import elected_sign, selected_entries, trim_rank, trimmed
from mergeflow.methods.base import GlobalStats, Hyperparams, Reduce, StatPass, TensorGroup
from mergeflow.methods.registry import register


class AdaMergingParams(Hyperparams):
    coefficients: str = Field(description="path of a coefficients .safetensors written by AdaMerging tuning")


def load_coefficients(path: str) -> Coefficients:
    """The file's coefficients, re-read only when the file changes."""
    st = os.stat(path)
    return _load(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> Coefficients:
    return Coefficients.load(path)


def _ties_k(params: AdaMergingParams) -> float | None:
    config = load_coefficients(params.coefficients).metadata.get("config", {})
    return float(config["ties_k"]) if config.get("ties_filter") else None


def _abs_deltas(group: TensorGroup, params: AdaMergingParams, stats: GlobalStats) -> dict:
    if _ties_k(params) is None:
        return {}
    return {"abs_tau": group.deltas.abs().reshape(group.n, -1)}


def _threshold_reduction(params: AdaMergingParams) -> dict:
    k = _ties_k(params)
    if k is None:
        return {}
    return {"adamerging_trim_threshold": Reduce("abs_tau", "kth", rank=lambda d: trim_rank(d, k))}


def _signs(group: TensorGroup, params: AdaMergingParams, stats: GlobalStats) -> dict:
    if _ties_k(params) is None:
        return {}
    t = trimmed(group.deltas, stats["adamerging_trim_threshold"])
    return {"elected_sign": elected_sign(t).reshape(1, -1)}


def _sign_reduction(params: AdaMergingParams) -> dict:
    if _ties_k(params) is None:
        return {}
    return {"adamerging_sign_total": Reduce("elected_sign", "sum")}


@register(
    "adamerging",
    hyperparams=AdaMergingParams,
    paper="Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024",
    summary="base + learned (task- or layer-wise) coefficients times task vectors (file from AdaMerging tuning)",
    stat_passes=(StatPass(_abs_deltas, _threshold_reduction), StatPass(_signs, _sign_reduction)),
)
def adamerging(group: TensorGroup, params: AdaMergingParams, stats: GlobalStats) -> torch.Tensor:
    coefs = load_coefficients(params.coefficients)
    if group.n != coefs.n_tasks:
        raise ValueError(
            f"{params.coefficients} holds coefficients for {coefs.n_tasks} tasks {list(coefs.task_names)}, "
            f"but {group.n} fine-tuned models were given"
        )
    deltas = group.deltas
    if _ties_k(params) is not None:
        majority = torch.sign(stats["adamerging_sign_total"][0]).to(torch.float32)
        deltas = selected_entries(trimmed(deltas, stats["adamerging_trim_threshold"]), majority)
    row = coefs.row(group.name).to(torch.float32)
    return group.base + (row @ deltas.reshape(group.n, -1)).view(group.base.shape)
