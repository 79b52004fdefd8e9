"""params.yaml validation: every error names the field and the fix; overrides work like `-S`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.params import ParamsError, apply_override, expand_grid, load_params, validate_params

PROJECT = Path(__file__).resolve().parents[1]


def _error(raw: dict) -> str:
    with pytest.raises(ParamsError) as e:
        validate_params(raw)
    return str(e.value)


def test_project_params_file_is_valid_and_resolves_paths():
    p = load_params(PROJECT / "params.yaml")
    assert p.project == str(PROJECT)
    assert p.path(p.outputs.merged) == PROJECT / "outputs" / "merged"
    assert p.path(p.zoo.dir) == PROJECT / "outputs" / "zoo"
    labels = [c.method for c in p.methods()]
    assert labels[0] == p.merge.method and set(labels) >= {"average", "task_arithmetic"}


def test_unknown_method_lists_the_available_ones():
    msg = _error({"merge": {"method": "tiez"}})
    assert "merge.method" in msg and "tiez" in msg
    assert "average" in msg and "task_arithmetic" in msg


def test_misspelt_hyperparameter_is_named_with_its_section():
    msg = _error({"merge": {"method": "task_arithmetic", "lamb": 0.3}})
    assert "merge.lamb: unknown hyperparameter (did you mean lam?)" in msg


def test_bad_hyperparameter_value_names_the_field():
    msg = _error({"merge": {"method": "task_arithmetic", "lam": "a lot"}})
    assert "merge.lam: 'a lot' holds a string where a number is expected" in msg
    msg = _error({"merge": {"method": "ties", "agg": "weighted_mean"}})  # a check across fields
    assert "  merge: agg='weighted_mean' divides by the per-task lams" in msg
    assert "Value error" not in msg and "[]" not in msg  # pydantic's wording stays inside


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_or_infinite_hyperparameter_is_refused(value):
    # YAML's .nan / .inf load as floats; a NaN lam would silently give a NaN model
    raw = yaml.safe_load(f"merge: {{method: pcb, lam: {value}}}")
    msg = _error(raw)
    assert "merge.lam" in msg and "finite" in msg


def test_error_in_a_compared_method_names_its_index():
    msg = _error({"compare": [{"method": "average"}, {"method": "nope"}]})
    assert "compare[1].method" in msg


def test_unknown_section_and_bad_literal_say_how_to_fix():
    msg = _error({"devcie": "cpu", "evaluation": {"split": "train"}})
    assert "devcie" in msg and "remove it or check its spelling" in msg
    assert "evaluation.split" in msg and "'val'" in msg and "'test'" in msg


def test_zoo_spec_is_validated_by_the_zoo():
    msg = _error({"zoo": {"spec": {"pretrain_steps": 0}}})
    assert "zoo.spec.pretrain_steps" in msg


def test_hyperparameters_apply_to_the_method_that_declares_them():
    # `dvc exp run -S merge.method=average` must work with `merge.lam` still in the file.
    p = validate_params({"merge": {"method": "average", "lam": 0.5}})
    assert p.merge.hparams() == {"weights": None} and p.merge.label == "average"  # an unset option: no label
    p = validate_params({"merge": {"method": "task_arithmetic", "lam": 0.5}})
    assert p.merge.hparams() == {"lam": 0.5}
    assert p.merge.label == "task_arithmetic(lam=0.5)"


def test_label_shows_the_given_hyperparameters_not_every_default():
    p = validate_params({"merge": {"method": "adamerging", "steps": 10, "lam": 0.5}})
    assert p.merge.label == "adamerging(steps=10)"  # lam is not adamerging's; defaults not listed
    assert validate_params({"merge": {"method": "ties"}}).merge.label == (
        "ties(agg=mean,elect=mass,k=0.2,lam=1.0,trim_scope=global)")  # small methods: everything
    assert p.merge.hparams()["prior"] == 0.3  # ...but they are all still in the hyperparameters


def test_primary_merge_is_not_repeated_in_compare():
    p = validate_params({"merge": {"method": "task_arithmetic", "lam": 0.3},
                         "compare": [{"method": "average"}, {"method": "task_arithmetic"}]})
    assert [c.label for c in p.methods()] == ["task_arithmetic(lam=0.3)", "average"]


def test_set_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"merge": {"method": "task_arithmetic", "lam": 0.3}}))
    p = load_params(path, ["merge.lam=0.7", "evaluation.tasks=[mnist, digits]", "device=cpu"])
    assert p.merge.hparams() == {"lam": 0.7}
    assert p.evaluation.tasks == ["mnist", "digits"] and p.device == "cpu"
    with pytest.raises(ParamsError, match="merge.lam"):
        load_params(path, ["merge.lam=abc"])
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        apply_override({}, "merge.lam")


def test_missing_params_file_says_what_to_pass(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_tracking_uri_defaults_inside_the_project_and_env_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = validate_params({}, project=tmp_path)
    assert p.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert p.artifact_root() == tmp_path.resolve() / "mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert p.tracking_uri() == "http://mlflow:5000"


def test_sweep_grid_is_expanded_and_validated():
    assert expand_grid("task_arithmetic", {"lam": [0.1, 0.2]}) == [
        {"method": "task_arithmetic", "lam": 0.1}, {"method": "task_arithmetic", "lam": 0.2}]
    msg = _error({"sweep": {"grid": {"task_arithmetic": {"lam": ["x"]}}}})
    assert "sweep.grid" in msg and "lam" in msg
    msg = _error({"sweep": {"grid": {"task_arithmetic": {"lam": []}}}})
    assert "empty list" in msg


def test_a_method_for_another_number_of_models_is_refused_before_any_work():
    from flows.params import ParamsError, validate_params

    with pytest.raises(ParamsError, match=r"merge\.method: 'slerp' merges 2 fine-tuned model\(s\).*4 experts"):
        validate_params({"merge": {"method": "slerp"}})
    with pytest.raises(ParamsError, match=r"compare\[1\]\.method: 'slerp'"):
        validate_params({"compare": [{"method": "average"}, {"method": "slerp"}]})
    two = validate_params({"zoo": {"spec": {"tasks": ["mnist", "fashion_mnist"]}}, "merge": {"method": "slerp"},
                           "compare": [{"method": "average"}]})
    assert two.merge.method == "slerp"
