"""Recipes: mergeflow's format, mergekit translation, the `mergeflow merge` command."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml

from mergeflow.checkpoint import load_state_dict
from mergeflow.checkpoint_writer import save_checkpoint
from mergeflow.mergekit_recipe import MergekitRecipeError, from_mergekit
from mergeflow.recipe import RecipeError, load_recipe, parse_recipe
from mergeflow.recipe_cli import main as merge_main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_models")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g), "ids": torch.arange(3)}
    save_checkpoint(base, root / "base", config={"vocab_size": 6})
    for i in range(2):
        ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
        save_checkpoint(ft, root / f"ft{i}", config={"vocab_size": 6})
    return root


def _recipe(path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return path


def _args(recipe, out, **kw) -> argparse.Namespace:
    return argparse.Namespace(recipe=str(recipe), out=str(out), device=kw.get("device"), allow_pickle=False,
                              dry_run=kw.get("dry_run", False), quiet=True)


def test_own_format_paths_are_relative_to_the_recipe(models):
    recipe = load_recipe(_recipe(models / "r.yaml", {
        "method": "ties", "base": "base", "models": ["ft0", "ft1"],
        "hyperparameters": {"k": 0.5, "lam": 0.9}}))
    assert recipe.base == str((models / "base").resolve())
    assert recipe.hyperparameters == {"k": 0.5, "lam": 0.9}


@pytest.mark.parametrize("data, field", [
    ({"method": "ties", "base": "b", "models": ["m"], "hyperparams": {}}, "hyperparams"),
    ({"method": "ties", "base": "b", "models": ["m"], "hyperparameters": {"k": 2}}, "hyperparameters for 'ties'"),
    ({"method": "ties", "base": "b", "models": ["m"], "hyperparameters": {"density": 0.2}}, "density"),
    ({"method": "tie", "base": "b", "models": ["m"]}, "unknown merge method 'tie'"),
    ({"method": "ties", "base": "b", "models": []}, "models"),
    ({"method": "slerp", "base": "b", "models": ["m"]}, "models: 'slerp' takes 2"),
    ({"method": "ties", "models": ["m"]}, "base"),
    ({"method": "ties", "base": "b", "models": ["m"], "dtype": "int8"}, "dtype"),
])
def test_invalid_recipes_name_the_field(data, field):
    with pytest.raises(RecipeError, match=field):
        parse_recipe(data)


@pytest.mark.parametrize("data, message", [
    ({"method": "ties", "base": "b", "models": ["m"], "params": {}},
     "params: not a known key (known: method, base, models, hyperparameters, dtype, device, base_only_tensors); "
     "did you mean hyperparameters?"),
    ({"method": "ties", "base": "b", "models": ["m"], "hyperparameters": {"lamda": 0.5}},
     "lamda: not a known key (known: k, lam, agg, trim_scope, elect); did you mean lam?"),
    ({"method": "ties", "base": "b", "models": ["m"], "hyperparameters": {"density": 0.2}},
     "density: not a known key (known: k, lam, agg, trim_scope, elect)"),  # nothing close: no guess
])
def test_an_unknown_key_is_named_with_the_known_ones_and_the_one_meant(data, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(data)
    assert str(err.value).endswith(message)


def test_missing_checkpoint_names_the_field(models):
    with pytest.raises(RecipeError, match=r"models\[1\]: 'nope' not found"):
        load_recipe(_recipe(models / "bad.yaml", {"method": "ties", "base": "base", "models": ["ft0", "nope"]}))


def test_mergekit_ties_translation():
    cfg = {
        "merge_method": "ties", "base_model": "base",
        "models": [{"model": "base"},
                   {"model": "a", "parameters": {"density": 0.5, "weight": 0.7}},
                   {"model": "b", "parameters": {"density": 0.5, "weight": 0.7}}],
        "parameters": {"normalize": True, "int8_mask": True}, "dtype": "bfloat16",
    }
    assert from_mergekit(cfg) == {
        "base": "base", "dtype": "bfloat16", "method": "ties", "models": ["a", "b"],
        "hyperparameters": {"k": 0.5, "lam": 1.0, "agg": "mean", "trim_scope": "tensor"}}
    # normalize: false sums the weighted entries: per-task coefficients before the election.
    cfg2 = dict(cfg, models=[{"model": "a", "parameters": {"density": 0.3, "weight": 1.0}},
                             {"model": "b", "parameters": {"density": 0.3, "weight": 0.5}}],
                parameters={"normalize": False, "lambda": 2.0})
    assert from_mergekit(cfg2)["hyperparameters"] == {"k": 0.3, "lam": [2.0, 1.0], "agg": "sum", "trim_scope": "tensor"}


def test_mergekit_other_methods():
    base = {"base_model": "base", "models": [{"model": "a", "parameters": {"weight": 0.3}},
                                             {"model": "b", "parameters": {"weight": 0.3}}]}
    assert from_mergekit(dict(base, merge_method="task_arithmetic"))["hyperparameters"] == {"lam": 0.3}
    dt = from_mergekit(dict(base, merge_method="dare_ties", parameters={"density": 0.1}))
    assert dt["method"] == "dare_ties" and dt["hyperparameters"]["agg"] == "sum"
    assert abs(dt["hyperparameters"]["p"] - 0.9) < 1e-12 and dt["hyperparameters"]["lam"] == 0.3
    linear = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                                   {"model": "b", "parameters": {"weight": 0.3}}]}
    assert from_mergekit(linear) == {"base": "a", "dtype": None, "method": "average", "models": ["a", "b"],
                                     "hyperparameters": {"weights": [1.0, 0.3]}}
    slerp = from_mergekit({"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "x"}],
                           "parameters": {"t": 0.25}})
    assert slerp == {"base": "base", "dtype": None, "method": "slerp", "models": ["base", "x"], "hyperparameters": {"t": 0.25}}


@pytest.mark.parametrize("change, field", [
    ({"models": [{"model": "a", "parameters": {"density": 0.5}}, {"model": "b", "parameters": {"density": 0.4}}]},
     "densities differ"),
    ({"models": [{"model": "a", "parameters": {"weight": [0.1, 0.9]}}]}, r"models\[0\].parameters.weight: per-layer gradient"),
    ({"merge_method": "breadcrumbs"}, "merge_method"),
    ({"slices": []}, "slices"),
    ({"models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 2.0}}],
      "merge_method": "linear", "parameters": {"normalize": False}},
     r"parameters.normalize: false sums w_i \* theta_i without dividing by the weights' sum \(here 3\)"),
    ({"models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": -1.0}}],
      "merge_method": "linear"}, r"weights \[1.0, -1.0\] sum to 0"),
    ({"models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 2.0}}],
      "parameters": {"lambda": 0.5}}, "parameters.lambda"),
    ({"parameters": {"rescale": False}, "merge_method": "dare_ties"}, "rescale"),
    ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon"),
    ({"tokenizer_source": "union"}, "tokenizer_source: 'union'"),
    ({"tokenizer_source": "a"}, "tokenizer_source: 'a'"),  # another model's tokenizer
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {}}}}, "tokenizer.tokens"),
])
def test_mergekit_unsupported_features_are_named(change, field):
    cfg = {"merge_method": "ties", "base_model": "base",
           "models": [{"model": "a", "parameters": {"density": 0.5}}, {"model": "b", "parameters": {"density": 0.5}}]}
    with pytest.raises(MergekitRecipeError, match=field):
        from_mergekit({**cfg, **change})


def test_mergekit_unequal_weights_under_normalize():
    # ties / dare_ties divide by the agreeing entries' weights: agg weighted_mean with lam = w;
    # task_arithmetic divides by the sum of the weights: lam_i = w_i * lambda / sum(w)
    models = [{"model": "a", "parameters": {"weight": 0.75}}, {"model": "b", "parameters": {"weight": 0.25}}]
    ties = from_mergekit({"merge_method": "ties", "base_model": "base", "models": models})
    assert ties["hyperparameters"] == {"k": 1.0, "lam": [0.75, 0.25], "agg": "weighted_mean", "trim_scope": "tensor"}
    dt = from_mergekit({"merge_method": "dare_ties", "base_model": "base", "models": models,
                        "parameters": {"density": 0.5, "normalize": True}})  # mergekit's default: false
    assert dt["hyperparameters"] == {"p": 0.5, "lam": [0.75, 0.25], "agg": "weighted_mean"}
    ta = from_mergekit({"merge_method": "task_arithmetic", "base_model": "base", "models": models,
                        "parameters": {"normalize": True, "lambda": 2.0}})
    assert ta["hyperparameters"] == {"lam": [0.75 * 2.0 / 1.0, 0.25 * 2.0 / 1.0]}


def test_mergekit_linear_without_normalize_is_the_weighted_mean_when_the_weights_sum_to_1():
    cfg = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.25}},
                                                {"model": "b", "parameters": {"weight": 0.75}}],
           "parameters": {"normalize": False}}
    assert from_mergekit(cfg)["hyperparameters"] == {"weights": [0.25, 0.75]}  # dividing by 1 changes nothing


@pytest.mark.parametrize("tokenizer", [{"tokenizer_source": "base"}, {"tokenizer_source": "./base"},
                                       {"tokenizer": {"source": "base"}}])
def test_mergekit_base_tokenizer_is_what_mergeflow_does(tokenizer):
    # mergeflow copies the base model's tokenizer files: the same recipe without the key
    cfg = {"merge_method": "ties", "base_model": "base", "models": ["a", "b"]}
    assert from_mergekit({**cfg, **tokenizer}) == from_mergekit(cfg)


def test_merge_command_same_recipe_same_hash_and_mergekit_equivalent(models, tmp_path, capsys):
    own = _recipe(models / "own.yaml", {"method": "ties", "base": "base", "models": ["ft0", "ft1"],
                                        "hyperparameters": {"k": 0.5, "trim_scope": "tensor"}})
    kit = _recipe(models / "kit.yaml", {
        "merge_method": "ties", "base_model": "base",
        "models": [{"model": "ft0", "parameters": {"density": 0.5, "weight": 1.0}},
                   {"model": "ft1", "parameters": {"density": 0.5, "weight": 1.0}}]})
    assert merge_main(_args(own, tmp_path / "a")) == 0
    assert merge_main(_args(own, tmp_path / "b")) == 0
    assert merge_main(_args(kit, tmp_path / "c")) == 0
    hashes = [line.split("content hash ")[1].split(")")[0] for line in capsys.readouterr().out.splitlines()]
    assert len(hashes) == 3 and len(set(hashes)) == 1
    out = load_state_dict(tmp_path / "a")
    assert torch.equal(out["ids"], torch.arange(3))


def test_a_mergekit_recipe_finds_relative_models_from_the_working_directory_too(models, tmp_path, monkeypatch):
    """mergekit resolves a recipe's paths from the working directory, mergeflow from the recipe's
    folder: a mergekit recipe finds them either way, and is refused where both name a checkpoint."""
    elsewhere = tmp_path / "recipes"
    elsewhere.mkdir()
    kit = _recipe(elsewhere / "kit.yaml", {"merge_method": "ties", "base_model": "base", "models": ["ft0", "ft1"]})
    monkeypatch.chdir(models)
    recipe = load_recipe(kit)
    assert recipe.base == str((models / "base").resolve())
    (elsewhere / "ft0").mkdir()  # a second ft0, next to the recipe
    with pytest.raises(RecipeError, match=r"models: 'ft0' names two checkpoints.*give an absolute path"):
        load_recipe(kit)
    own = _recipe(elsewhere / "own.yaml", {"method": "ties", "base": "base", "models": ["ft0", "ft1"]})
    with pytest.raises(RecipeError, match=r"base: 'base' not found"):  # mergeflow's format: the recipe's folder only
        load_recipe(own)
    hub = _recipe(elsewhere / "hub.yaml", {"merge_method": "ties", "base_model": "org/name", "models": ["ft1"]})
    with pytest.raises(RecipeError, match=r"base_model: 'org/name' not found .*written hf://org/name"):
        load_recipe(hub)


def test_merge_command_refuses_before_writing(models, tmp_path, capsys):
    bad = _recipe(models / "bad2.yaml", {"method": "ties", "base": "base", "models": ["ft0"],
                                         "hyperparameters": {"agg": "median"}})
    assert merge_main(_args(bad, tmp_path / "o")) == 2
    assert "agg" in capsys.readouterr().err
    ok = _recipe(models / "ok.yaml", {"method": "ties", "base": "base", "models": ["ft0", "ft1"]})
    assert merge_main(_args(ok, tmp_path / "o", dry_run=True)) == 0
    assert merge_main(_args(ok, tmp_path / "o", device="cuda:99" if not torch.cuda.is_available() else "nope")) == 2
    assert list(tmp_path.iterdir()) == []


def test_merge_command_reports_an_untranslatable_mergekit_recipe_in_one_line(models, tmp_path, capsys):
    kit = _recipe(models / "kit_bad.yaml", {
        "merge_method": "ties", "base_model": "base",
        "models": [{"model": "ft0", "parameters": {"density": 0.2}},
                   {"model": "ft1", "parameters": {"density": 0.3}}]})
    assert merge_main(_args(kit, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "density" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_program_exits_with_mains_code_after_freezing_the_heap(monkeypatch):
    # The console script and `python -m mergeflow` run `program`: main's exit code, and gc.freeze
    # first, so the interpreter's shutdown does not walk every torch and numba object (~0.8 s).
    from mergeflow import cli

    frozen = []
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.gc, "freeze", lambda: frozen.append(True))
    with pytest.raises(SystemExit) as exit_:
        cli.program()
    assert exit_.value.code == 3 and frozen == [True]
