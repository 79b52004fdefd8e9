"""AdaMerging's tuning settings; every default is the official code's (algorithms.md section 5)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergeflow.adamerging.coefficients import Mode

TASK_VECTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class AdaMergingConfig(BaseModel):
    """Tuning settings; the defaults are the official ones."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Mode = Field("layer_wise", description="task_wise: one coefficient per task; layer_wise: one per task per tensor")
    ties_filter: bool = Field(False, description="AdaMerging++: tune on TIES-selected task vectors")
    ties_k: float = Field(0.2, gt=0, le=1, description="AdaMerging++ trim: kept fraction per task (whole model)")
    prior: float = Field(0.3, description="initial value of every coefficient")
    steps: int = Field(500, ge=0, description="optimizer steps")
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch_size: int = Field(16, ge=1, description="unlabelled samples per batch per task")
    batches_per_step: int = Field(2, ge=1, description="batches per task per step")
    clamp_min: float | None = Field(0.0, description="forward-pass clamp; None disables the bound")
    clamp_max: float | None = Field(1.0, description="forward-pass clamp; None disables the bound")
    task_vector_dtype: Literal["float32", "bfloat16"] = Field("float32", description="storage of the task vectors")
    seed: int = Field(0, description="seeds the per-step shuffles")
    fuse_batches: bool = Field(
        True, description="one forward over every task's batches of a step (same loss, faster); "
        "false: one batch at a time (least activation memory)")

    @property
    def variant(self) -> str:
        return "adamerging++" if self.ties_filter else "adamerging"

    def tuning_fields(self) -> dict:
        """Only the fields of AdaMergingConfig (subclasses add their own), as JSON values."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k in AdaMergingConfig.model_fields}
