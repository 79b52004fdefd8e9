"""Merge recipes: mergeflow's own YAML format, validated by pydantic (errors name the field).

    method: ties                 # any registered method (`mergeflow methods`)
    base: ./base                 # paths are relative to the recipe file; hf://org/name@rev and
    models: [./ft_a, ./ft_b]     #   pip:package references are resolved by mergeflow.sources
    hyperparameters: {k: 0.2, lam: 1.0, agg: mean}
    dtype: bfloat16              # optional: output dtype of float tensors (default: the base's)
    device: cpu                  # optional: overridden by --device
    base_only_tensors: copy      # optional: copy the base's tensors that no model has (default: error)

A mergekit recipe (one with `merge_method`) is translated by `mergeflow.mergekit_recipe`.
Everything here is checked before a tensor is read: that the file is UTF-8 YAML with no key
given twice in one mapping, the method, its hyperparameters (a YAML boolean is never taken for
a number), the number of models, and that every path exists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeflow.compatibility import BaseOnlyTensors
from mergeflow.methods.base import validation_summary

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Hyperparameters that name a file: resolved against the recipe's directory like base and models,
# and checked before any tensor is read (the method itself would fail with a bare errno).
FILE_HYPERPARAMETERS = {"adamerging": ("coefficients",)}


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
    base_only_tensors: BaseOnlyTensors = Field(
        "error", description="tensors of the base that no model has (vision-only experts of a full CLIP "
        "base): refuse the checkpoints (error) or copy them from the base (copy)")

    @field_validator("base")
    @classmethod
    def _base_not_empty(cls, v: str) -> str:
        if not v.strip():  # '' would resolve to the recipe's own directory
            raise ValueError(f"an empty reference; {_REFERENCE_HINT}")
        return v

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, v: list[str]) -> list[str]:
        for i, ref in enumerate(v):
            if not ref.strip():
                raise ValueError(f"models[{i}] is an empty reference; {_REFERENCE_HINT}")
        return v

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
            raise ValueError(f"hyperparameters for {self.method!r}: {method.params_error(err)}") from None
        n = len(self.models)
        if not method.takes(n):
            raise ValueError(f"models: {self.method!r} takes {method.models_wanted} model(s), got {n}")
        return self

    @property
    def out_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None

    def resolved(self, root: Path, *, mergekit: bool = False) -> Recipe:
        """The recipe with every checkpoint reference (and file hyperparameter) turned into an
        existing local path, relative ones from `root`. A translated mergekit recipe (`mergekit`)
        also finds them from the working directory, as mergekit does, and names its own fields."""
        hyperparameters = dict(self.hyperparameters)
        for name in FILE_HYPERPARAMETERS.get(self.method, ()):
            if isinstance(hyperparameters.get(name), str):
                hyperparameters[name] = _resolve_file(hyperparameters[name], root, f"hyperparameters.{name}")
        also = Path.cwd() if mergekit else None
        return self.model_copy(update={
            "base": _resolve(self.base, root, "base_model" if mergekit else "base", also),
            "models": [_resolve(m, root, "models" if mergekit else f"models[{i}]", also)
                       for i, m in enumerate(self.models)],
            "hyperparameters": hyperparameters,
        })


def load_recipe(path: str | Path) -> Recipe:
    """Read a mergeflow or mergekit YAML recipe; references resolved against its directory."""
    path = Path(path)
    try:
        data = yaml.load(_recipe_text(path), Loader=_UniqueKeyLoader)  # a SafeLoader: no tags run
    except _DuplicateKey as err:
        raise RecipeError(f"{path}: line {err.line}: key {err.key!r} is given twice in one mapping (first on "
                          f"line {err.first_line}); YAML would silently keep the last, so remove one") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from None
    recipe = parse_recipe(data, source=str(path))
    return recipe.resolved(path.resolve().parent, mergekit=_is_mergekit(data))


def _recipe_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory; pass the recipe's .yaml file") from None
    hint = "pass the recipe's .yaml file (checkpoints go in its base and models), saved as UTF-8"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not a text YAML recipe (byte {raw[err.start]:#04x} at offset {err.start} "
                          f"is not UTF-8); {hint}") from None
    if "\x00" in text:  # valid UTF-8 can still be binary (a checkpoint's ASCII-only bytes)
        raise RecipeError(f"{path}: not a text YAML recipe (it holds NUL bytes); {hint}")
    return text


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one,
    so `method: ties` then `method: dare` would silently run dare)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            # Only the mapping's own scalar keys: a `<<` merge's keys may be overridden on purpose.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_recipe(data: object, *, source: str = "recipe") -> Recipe:
    """A Recipe from parsed YAML (mergeflow format, or mergekit's, translated)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping with method, base, models, hyperparameters")
    if _is_mergekit(data):
        from mergeflow.mergekit_recipe import from_mergekit

        data = from_mergekit(data, source=source)
    try:
        return Recipe(**data)
    except ValidationError as err:
        raise RecipeError(f"{source}: {validation_summary(err, list(Recipe.model_fields))}") from None
    except ValueError as err:  # get_method: unknown method
        raise RecipeError(f"{source}: method: {err}") from None


def _is_mergekit(data: object) -> bool:
    """Whether parsed YAML is a mergekit recipe (translated by mergekit_recipe)."""
    return isinstance(data, dict) and "merge_method" in data


def _resolve(ref: str, root: Path, field: str, also: Path | None = None) -> str:
    """`ref` as an existing local path: relative to `root`, or else to `also` (a mergekit recipe's
    working directory); one that names a different checkpoint from each is refused as ambiguous."""
    if ref.startswith(("hf://", "pip:")):
        from mergeflow.sources import locate_checkpoint

        try:
            return str(locate_checkpoint(ref))
        except (ValueError, OSError) as err:
            raise RecipeError(f"{field}: {err}") from None
    candidates = [_local(ref, root)] + ([_local(ref, also)] if also is not None else [])
    found = list(dict.fromkeys(c.resolve() for c in candidates if c.exists()))
    if len(found) > 1:
        raise RecipeError(f"{field}: {ref!r} names two checkpoints, {found[0]} (next to the recipe) and "
                          f"{found[1]} (from the working directory, where mergekit looks); give an absolute path")
    if not found:
        looked = " and ".join(str(c) for c in dict.fromkeys(candidates))
        hub = f"; a Hugging Face model id is written hf://{ref}" if _HUB_ID.fullmatch(ref) else ""
        raise RecipeError(f"{field}: {ref!r} not found (looked at {looked}){hub}; {_REFERENCE_HINT}")
    return str(found[0])


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name, as mergekit takes Hugging Face ids


_REFERENCE_HINT = "give a local checkpoint directory or .safetensors file, hf://org/name@revision or pip:package"


def _resolve_file(ref: str, root: Path, field: str) -> str:
    local = _local(ref, root)
    if not local.is_file():
        raise RecipeError(f"{field}: {ref!r} is not a file (looked at {local}); give its path, absolute "
                          "or relative to the recipe")
    return str(local.resolve())


def _local(ref: str, root: Path) -> Path:
    local = Path(ref.removeprefix("file://")).expanduser()
    return local if local.is_absolute() else root / local
