"""Recipe input handling: mergekit translations that must reproduce mergekit (linear with a listed
base, all-zero weights), and bad recipe files refused with a message that names the problem."""

from __future__ import annotations

import argparse
import types
import typing

import pytest
import torch
import yaml

from mergeflow.checkpoint import load_state_dict
from mergeflow.checkpoint_writer import save_checkpoint
from mergeflow.mergekit_recipe import MergekitRecipeError, from_mergekit
from mergeflow.methods import all_methods
from mergeflow.recipe import RecipeError, load_recipe, parse_recipe
from mergeflow.recipe_cli import main as merge_main


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base, ft0, ft1 (float tensors plus an integer buffer) and their state dicts."""
    root = tmp_path_factory.mktemp("recipe_inputs")
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(8, 4, generator=g), "b": torch.randn(8, generator=g), "ids": torch.arange(3)}
    sds = {"base": base}
    save_checkpoint(base, root / "base", config={"vocab_size": 8})
    for i in range(2):
        ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        sds[f"ft{i}"] = ft
        save_checkpoint(ft, root / f"ft{i}", config={"vocab_size": 8})
    return root, sds


def _merge(root, tmp_path, name: str, data: dict | str) -> dict[str, torch.Tensor]:
    recipe = root / f"{name}.yaml"
    recipe.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    out = tmp_path / name
    args = argparse.Namespace(recipe=str(recipe), out=str(out), device=None, allow_pickle=False,
                              dry_run=False, quiet=True)
    assert merge_main(args) == 0
    return load_state_dict(out)


# ---- 1. mergekit linear: every listed model is averaged, base_model included when listed ----

def test_mergekit_linear_keeps_a_listed_base_model():
    cfg = {"merge_method": "linear", "base_model": "base",
           "models": [{"model": "base", "parameters": {"weight": 1.0}}, {"model": "a", "parameters": {"weight": 1.0}},
                      {"model": "b", "parameters": {"weight": 1.0}}]}
    assert from_mergekit(cfg) == {"base": "base", "dtype": None, "method": "average",
                                  "models": ["base", "a", "b"], "hyperparameters": {"weights": [1.0, 1.0, 1.0]}}
    # Task-vector methods still drop it: mergekit gives the base no task vector.
    cfg["models"][0] = {"model": "base"}
    assert from_mergekit(dict(cfg, merge_method="task_arithmetic"))["models"] == ["a", "b"]


def test_mergekit_linear_with_a_listed_base_averages_all_three(family, tmp_path):
    root, sds = family
    out = _merge(root, tmp_path, "linear_listed", {
        "merge_method": "linear", "base_model": "base", "parameters": {"weight": 1.0},
        "models": [{"model": "base"}, {"model": "ft0"}, {"model": "ft1"}]})
    for k in ("w", "b"):
        torch.testing.assert_close(out[k], (sds["base"][k] + sds["ft0"][k] + sds["ft1"][k]) / 3)


def test_mergekit_linear_without_base_model_uses_the_first_model_as_base(family, tmp_path):
    root, sds = family
    assert from_mergekit({"merge_method": "linear", "models": ["a", "b"]})["base"] == "a"
    out = _merge(root, tmp_path, "linear_no_base", {
        "merge_method": "linear", "models": [{"model": "ft0", "parameters": {"weight": 0.5}},
                                             {"model": "ft1", "parameters": {"weight": 0.5}}]})
    for k in ("w", "b"):
        torch.testing.assert_close(out[k], (sds["ft0"][k] + sds["ft1"][k]) / 2)
    assert torch.equal(out["ids"], sds["ft0"]["ids"])


# ---- 2. every weight 0: mergekit returns the base (its divisor guard turns 0/0 into 0) ----

@pytest.mark.parametrize("method, parameters", [
    ("ties", {}),                                        # normalize: true is ties' default
    ("dare_ties", {"normalize": True}),
    ("task_arithmetic", {"normalize": True}),
    ("dare_linear", {"normalize": True}),
    ("task_arithmetic", {}),
    ("ties", {"normalize": False}),
])
def test_mergekit_all_zero_weights_give_the_base(family, tmp_path, method, parameters):
    root, sds = family
    out = _merge(root, tmp_path, f"zero_{method}_{len(parameters)}", {
        "merge_method": method, "base_model": "base", "parameters": parameters,
        "models": [{"model": f"ft{i}", "parameters": {"weight": 0, "density": 0.5}} for i in range(2)]})
    for k, v in sds["base"].items():
        assert torch.equal(out[k], v), k


def test_mergekit_tiny_equal_weights_without_consensus_are_not_normalised():
    # mergekit divides by sum_i w_i only where |sum| >= 1e-8; below, the weighted sum stands.
    cfg = {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"normalize": True},
           "models": [{"model": m, "parameters": {"weight": 1e-9}} for m in ("a", "b")]}
    assert from_mergekit(cfg)["hyperparameters"] == {"lam": 1e-9}
    cfg["models"] = [{"model": m, "parameters": {"weight": 0.4}} for m in ("a", "b")]
    assert from_mergekit(cfg)["hyperparameters"] == {"lam": 0.5}  # the mean of the task vectors


def test_mergekit_linear_all_zero_weights_are_refused():
    # mergekit's linear has no guard: sum 0 * theta / 0 is a NaN model.
    cfg = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 0}} for m in ("a", "b")]}
    with pytest.raises(MergekitRecipeError, match=r"the weights \[0.0, 0.0\] sum to 0"):
        from_mergekit(cfg)


# ---- 3. unclear or silently accepted mergekit fields ----

@pytest.mark.parametrize("change, message", [
    ({"parameters": ["density", 0.5]}, r"parameters: expected a mapping"),
    ({"models": [{"model": "a", "parameters": [1]}, "b"]}, r"models\[0\].parameters: expected a mapping"),
    ({"models": [{"model": "base"}]}, "no model to merge besides base_model"),
    ({"parameters": {"normalize": "false"}}, r"parameters.normalize: expected true or false \(a YAML boolean"),
    ({"merge_method": "dare_ties", "parameters": {"rescale": "false"}}, "parameters.rescale: expected true or false"),
    ({"parameters": {"normalize": 0}}, "parameters.normalize: expected true or false"),
    ({"parameters": {"weight": True}}, r"\): parameters.weight: expected a number, got the boolean"),
    ({"parameters": {"weight": [1.0, 0.5]}}, r"\): parameters.weight: per-layer gradient lists"),  # the global one
    ({"models": [{"model": "a", "parameters": {"weight": "x"}}, "b"]}, r"models\[0\].parameters.weight: expected"),
    ({"parameters": {"density": 1.5}}, r"parameters.density: 1.5 is not a kept fraction; give one in \[0, 1\]"),
    ({"parameters": {"density": -0.2}}, r"parameters.density: -0.2 is not a kept fraction"),
    ({"merge_method": "dare_ties", "parameters": {"density": 0}}, r"parameters.density: 0 .* in \(0, 1\]"),
    ({"parameters": {"density": 0.3, "rescale": True}}, "parameters.rescale: true is not supported for ties"),
    ({"parameters": {"lambda": float("nan")}}, "parameters.lambda: expected a finite number"),
    ({"parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]}}, "per-tensor filters"),
    ({"base_model": ["base"]}, "base_model: expected one model path or name"),
    ({"models": [{"model": {"path": "a"}}, "b"]}, r"models\[0\].model: expected a model path or name"),
])
def test_mergekit_bad_fields_are_named(change, message):
    cfg = {"merge_method": "ties", "base_model": "base", "models": ["a", "b"], **change}
    with pytest.raises(MergekitRecipeError, match=message):
        from_mergekit(cfg)


def test_mergekit_rescale_defaults_follow_mergekit():
    """mergekit rescales the DARE methods' task vectors by default and not TIES's: a ties recipe
    without `rescale` translates, and so does a dare_ties one; ties' rescale is a no-op at density 1."""
    ties = {"merge_method": "ties", "base_model": "base", "models": ["a", "b"], "parameters": {"density": 0.3}}
    assert from_mergekit(ties)["hyperparameters"]["k"] == 0.3
    dare = {**ties, "merge_method": "dare_ties"}
    assert from_mergekit(dare)["hyperparameters"]["p"] == pytest.approx(0.7)
    assert from_mergekit({**ties, "parameters": {"density": 1.0, "rescale": True}})["method"] == "ties"


def test_mergekit_base_listed_with_a_trailing_slash_is_the_base():
    cfg = {"merge_method": "task_arithmetic", "base_model": "./base",
           "models": [{"model": "base/"}, {"model": "a"}, {"model": "b"}]}
    assert from_mergekit(cfg)["models"] == ["a", "b"]


# ---- 3. recipe files: not text, duplicate keys ----

@pytest.mark.parametrize("content, message", [
    ("method: ties  # caf\xe9\nbase: base\n".encode("latin-1"), r"not a text YAML recipe \(byte 0xe9 at offset 19"),
    (b"\x93NUMPY\x01\x00binary", "not a text YAML recipe"),
    (b"{}\x00\x00\x00\x00", r"not a text YAML recipe \(it holds NUL bytes\)"),
])
def test_a_recipe_that_is_not_utf8_text_is_refused(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_a_checkpoint_passed_as_the_recipe_is_refused_in_one_line(family, tmp_path, capsys):
    root, _ = family
    args = argparse.Namespace(recipe=str(root / "base" / "model.safetensors"), out=str(tmp_path / "o"),
                              device=None, allow_pickle=False, dry_run=False, quiet=True)
    assert merge_main(args) == 2
    err = capsys.readouterr().err
    assert "not a text YAML recipe" in err and len(err.strip().splitlines()) == 1
    args.recipe = str(root)
    assert merge_main(args) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, message", [
    ("method: ties\nmethod: dare\nbase: base\nmodels: [ft0, ft1]\n",
     r"line 2: key 'method' is given twice in one mapping \(first on line 1\)"),
    ("method: ties\nbase: base\nmodels: [ft0, ft1]\nhyperparameters:\n  k: 0.5\n  lam: 1\n  k: 0.2\n",
     r"line 7: key 'k' is given twice in one mapping \(first on line 5\)"),
    ("merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1, weight: 2}\n",
     r"line 5: key 'weight' is given twice"),
])
def test_duplicate_yaml_keys_are_refused(family, text, message):
    root, _ = family
    (root / "dup.yaml").write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(root / "dup.yaml")


def test_yaml_merge_keys_may_still_be_overridden(family):
    root, _ = family
    (root / "merge_key.yaml").write_text(
        "method: ties\nbase: base\nmodels: [ft0, ft1]\nhyperparameters:\n  <<: {k: 0.5, lam: 1.0}\n  k: 0.3\n")
    assert load_recipe(root / "merge_key.yaml").hyperparameters == {"k": 0.3, "lam": 1.0}


# ---- 3. a boolean where a number is expected: refused for every method's numeric field ----

def _numeric_fields():
    for method in all_methods():
        for name, field in method.hyperparams.model_fields.items():
            union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
            kinds = typing.get_args(field.annotation) if union else (field.annotation,)
            if bool not in kinds and any(k in (int, float) for k in kinds):
                yield pytest.param(method, name, id=f"{method.name}.{name}")


@pytest.mark.parametrize("method, field", list(_numeric_fields()))
def test_a_boolean_is_never_read_as_a_number(method, field):
    data = {"method": method.name, "base": "b", "models": ["m"] * max(method.min_models, 1),
            "hyperparameters": {field: True}}
    with pytest.raises(RecipeError, match=rf"hyperparameters for '{method.name}': {field}: True holds a boolean"):
        parse_recipe(data)


def test_a_boolean_inside_a_list_of_numbers_is_refused_and_boolean_fields_keep_theirs():
    with pytest.raises(RecipeError, match=r"lam: \[0.5, True\] holds a boolean"):
        parse_recipe({"method": "task_arithmetic", "base": "b", "models": ["m", "n"],
                      "hyperparameters": {"lam": [0.5, True]}})
    recipe = parse_recipe({"method": "adamerging", "base": "b", "models": ["m"],
                           "hyperparameters": {"ties_filter": True}})
    assert recipe.hyperparameters == {"ties_filter": True}


def _methods_with_lam_lists():
    for method in all_methods():
        field = method.hyperparams.model_fields.get("lam")
        if field is not None and list[float] in typing.get_args(field.annotation):
            yield pytest.param(method, id=method.name)


@pytest.mark.parametrize("method", list(_methods_with_lam_lists()))
def test_an_empty_lam_list_is_refused_by_every_method_that_takes_one(method):
    data = {"method": method.name, "base": "b", "models": ["m"] * max(method.min_models, 1),
            "hyperparameters": {"lam": []}}
    with pytest.raises(RecipeError, match="lam is an empty list; give one value per fine-tuned model"):
        parse_recipe(data)


# ---- 4. other recipe fields ----

def test_base_only_tensors_is_error_by_default_and_takes_copy_only():
    data = {"method": "ties", "base": "b", "models": ["m"]}
    assert parse_recipe(data).base_only_tensors == "error"
    assert parse_recipe(dict(data, base_only_tensors="copy")).base_only_tensors == "copy"
    with pytest.raises(RecipeError, match="base_only_tensors: Input should be 'error' or 'copy'"):
        parse_recipe(dict(data, base_only_tensors="skip"))


def test_empty_references_are_refused():
    with pytest.raises(RecipeError, match="base: an empty reference"):
        parse_recipe({"method": "ties", "base": "", "models": ["m"]})
    with pytest.raises(RecipeError, match=r"models\[1\] is an empty reference"):
        parse_recipe({"method": "ties", "base": "b", "models": ["m", " "]})


def test_adamerging_coefficients_are_resolved_against_the_recipe(family):
    root, _ = family
    recipe = {"method": "adamerging", "base": "base", "models": ["ft0", "ft1"],
              "hyperparameters": {"coefficients": "nope.safetensors"}}
    (root / "ada.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"hyperparameters.coefficients: 'nope.safetensors' is not a file"):
        load_recipe(root / "ada.yaml")
    (root / "coeffs.safetensors").write_bytes(b"")
    recipe["hyperparameters"]["coefficients"] = "coeffs.safetensors"
    (root / "ada.yaml").write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(root / "ada.yaml")
    assert loaded.hyperparameters["coefficients"] == str((root / "coeffs.safetensors").resolve())


def test_validator_messages_have_no_pydantic_prefix():
    with pytest.raises(RecipeError) as err:
        parse_recipe({"method": "ties", "base": "b", "models": ["m"], "hyperparameters": {"k": 2}}, source="r.yaml")
    assert str(err.value) == "r.yaml: hyperparameters for 'ties': k: Input should be less than or equal to 1"
