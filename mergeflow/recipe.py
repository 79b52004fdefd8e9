"""Merge recipes: mergeflow's own YAML format, validated by pydantic (errors name the field).

    method: ties                 # any registered method (`mergeflow methods`)
    base: ./base                 # paths are relative to the recipe file; hf://org/name@rev and
    models: [./ft_a, ./ft_b]     #   pip:package references are resolved by mergeflow.sources
    hyperparameters: {k: 0.2, lam: 1.0, agg: mean}
    dtype: bfloat16              # optional: output dtype of float tensors (default: the base's)
    device: cpu                  # optional: overridden by --device

A mergekit recipe (one with `merge_method`) is translated by `mergeflow.mergekit_recipe`.
Everything here is checked before a tensor is read: the method, its hyperparameters, the
number of models, and that every path exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class RecipeError(ValueError):
    """A recipe is invalid; the message names the field and the fix."""


class Recipe(BaseModel):
    """A merge, fully described: the same recipe always gives the same output bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(description="a registered merge method")
    base: str = Field(description="the pretrained checkpoint the models were fine-tuned from")
    models: list[str] = Field(min_length=1, description="fine-tuned checkpoints")
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = Field(None, description="output dtype of float tensors (default: the base's)")
    device: str | None = None

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; use one of {', '.join(DTYPES)}")
        return v

    @model_validator(mode="after")
    def _method_and_hyperparameters(self) -> Recipe:
        from mergeflow.methods import get_method

        method = get_method(self.method)  # unknown names list the available ones
        try:
            method.params(**self.hyperparameters)
        except ValidationError as err:
            raise ValueError(f"hyperparameters for {self.method!r}: {_short(err)}") from None
        n = len(self.models)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            raise ValueError(f"models: {self.method!r} takes {method.min_models}"
                             f"{'' if method.max_models == method.min_models else '+'} model(s), got {n}")
        return self

    @property
    def out_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None

    def resolved(self, root: Path) -> Recipe:
        """The recipe with every checkpoint reference turned into an existing local path."""
        return self.model_copy(update={
            "base": _resolve(self.base, root, "base"),
            "models": [_resolve(m, root, f"models[{i}]") for i, m in enumerate(self.models)],
        })


def load_recipe(path: str | Path) -> Recipe:
    """Read a mergeflow or mergekit YAML recipe; references resolved against its directory."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from None
    recipe = parse_recipe(data, source=str(path))
    return recipe.resolved(path.resolve().parent)


def parse_recipe(data: object, *, source: str = "recipe") -> Recipe:
    """A Recipe from parsed YAML (mergeflow format, or mergekit's, translated)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping with method, base, models, hyperparameters")
    if "merge_method" in data:
        from mergeflow.mergekit_recipe import from_mergekit

        data = from_mergekit(data, source=source)
    try:
        return Recipe(**data)
    except ValidationError as err:
        raise RecipeError(f"{source}: {_short(err)}") from None
    except ValueError as err:  # get_method: unknown method
        raise RecipeError(f"{source}: method: {err}") from None


def _short(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "recipe"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _resolve(ref: str, root: Path, field: str) -> str:
    if ref.startswith(("hf://", "pip:")):
        from mergeflow.sources import locate_checkpoint

        try:
            return str(locate_checkpoint(ref))
        except (ValueError, OSError) as err:
            raise RecipeError(f"{field}: {err}") from None
    local = Path(ref.removeprefix("file://")).expanduser()
    local = local if local.is_absolute() else root / local
    if not local.exists():
        raise RecipeError(f"{field}: {ref!r} not found (looked at {local}); give a local checkpoint "
                          "directory or .safetensors file, hf://org/name@revision or pip:package")
    return str(local.resolve())
