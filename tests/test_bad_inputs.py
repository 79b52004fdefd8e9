"""The bad-input corpus: every broken input gets a clear error before work starts, and no
output (not even a temp directory) is left behind. Code inside inputs never runs.

Inputs are built in temp dirs by tests/bad_inputs/corpus.py. Entry points exercised: the
streaming engine (`merge_checkpoints`, which `mergeflow merge` and the merge task call), the
in-memory contract `mergeflow.merge`, `Checkpoint`, checkpoint resolution (`resolve_checkpoint`),
the artifact store, and params.yaml validation (`load_params`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from bad_inputs import corpus

from mergeflow import merge
from mergeflow.checkpoint import Checkpoint, CheckpointError, load_state_dict
from mergeflow.checkpoint_writer import save_checkpoint
from mergeflow.engine import merge_checkpoints

# ---- broken checkpoints through the engine: error names the problem, no output left ----

ENGINE_CASES = {
    # case: (how to break fine-tune 0, words the error must contain)
    "truncated safetensors": (corpus.truncate, ["truncated or corrupt"]),
    "corrupted header": (corpus.corrupt_header, ["safetensors"]),
    "header length beyond file": (corpus.huge_header_length, ["safetensors"]),
    "empty weights file": (corpus.empty_file, ["safetensors"]),
    "shard listed in index is missing": (corpus.index_with_missing_shard, ["missing"]),
    "NaN in weights": (lambda d: corpus.with_value(d, float("nan")), ["NaN", "layer.weight"]),
    "inf in weights": (lambda d: corpus.with_value(d, float("inf")), ["inf", "layer.weight"]),
    "mismatched shape": (corpus.with_shape, ["shape", "layer.weight"]),
    "mismatched names": (corpus.with_renamed_tensor, ["layer.weight"]),
    "extra tensor": (corpus.with_extra_tensor, ["head.weight"]),
    "integer where the base has float": (lambda d: corpus.with_dtype(d, torch.int32), ["dtype"]),
    "index that is not a mapping": (corpus.index_not_a_mapping, ["weight_map"]),
    "index pointing outside the model": (corpus.index_pointing_outside, ["outside", "../base"]),
    "index listing a tensor no shard holds": (corpus.index_listing_a_tensor_no_shard_holds,
                                              ["does not match its shards", "'ghost.weight' in model.safetensors"]),
    "index leaving out a tensor": (corpus.index_leaving_out_a_tensor, ["holds 'layer.bias', which it does not list"]),
    "index filing tensors under the wrong shard": (
        corpus.index_swapping_two_shards,
        ["places 'layer.weight' in model-00002-of-00002.safetensors, but model-00001-of-00002.safetensors holds it"]),
    "directory without weights": (corpus.only_config, ["no model.safetensors", "model directory"]),
    "config.json that is not an object": (corpus.config_not_an_object, ["config.json: holds a JSON list"]),
    "vocab_size given as text": (corpus.vocab_size_as_text, ["config.json: vocab_size is '32', not a whole number"]),
}


def _assert_nothing_written(out: Path) -> None:
    assert corpus.leftovers(out.parent, out.name) == [], "a failed merge left files behind"


@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_engine_refuses_broken_checkpoint(case: str, tmp_path: Path) -> None:
    base, models = corpus.family(tmp_path)
    breaker, words = ENGINE_CASES[case]
    breaker(models[0])
    out = tmp_path / "merged"
    with pytest.raises(ValueError) as err:
        merge_checkpoints("task_arithmetic", base, models, out, {"lam": 0.5}, progress=False)
    for word in words:
        assert word in str(err.value), f"{case}: {word!r} not in error: {err.value}"
    _assert_nothing_written(out)


@pytest.mark.parametrize("case", ["NaN in weights", "inf in weights",
                                  "mismatched shape", "mismatched names",
                                  "integer where the base has float"])
def test_in_memory_merge_refuses_bad_state_dict(case: str, tmp_path: Path) -> None:
    base, models = corpus.family(tmp_path)
    ENGINE_CASES[case][0](models[0])
    sds = [load_state_dict(m) for m in models]
    with pytest.raises(ValueError) as err:
        merge("task_arithmetic", load_state_dict(base), sds, lam=0.5)
    for word in ENGINE_CASES[case][1]:
        assert word in str(err.value), f"{case}: {word!r} not in error: {err.value}"


def test_in_memory_merge_names_wrong_container_types() -> None:
    base = {"w": torch.ones(2, 2)}
    cases = [
        (None, [base], "base must be a state dict"),
        (base, base, "finetuned must be a list of state dicts"),  # one state dict, not a list of them
        (base, (sd for sd in [base]), "finetuned must be a list of state dicts"),
        (base, [{"w": [[1.0, 2.0], [3.0, 4.0]]}], "finetuned[0]['w'] is a list, not a torch.Tensor"),
        (base, [base, 3], "finetuned[1] must be a state dict"),
    ]
    for b, finetuned, words in cases:
        with pytest.raises(TypeError) as err:
            merge("task_arithmetic", b, finetuned, lam=0.5)
        assert words in str(err.value)


def test_in_memory_merge_refuses_what_the_engine_refuses() -> None:
    base, ft = corpus.state_dict(0), corpus.state_dict(1)
    # Repeated state dicts are merged as given (hand-checked cases use `[ft] * 3`), with a warning.
    with pytest.warns(UserWarning, match=r"finetuned\[1\] is the same state dict as finetuned\[0\]"):
        twice = merge("ties", base, [ft, ft], k=1.0)
    tau = ft["layer.weight"] - base["layer.weight"]
    assert torch.equal(twice["layer.weight"], base["layer.weight"] + (tau + tau) / 2)  # one task vector, twice: its mean
    with pytest.warns(UserWarning, match=r"finetuned\[1\] is the base state dict itself"):
        merge("task_arithmetic", base, [ft, base])
    cases = [
        ("ties", {}, [{}], {}, "no float tensor with any entries to merge"),
        ("ties", {"ids": torch.arange(3)}, [{"ids": torch.arange(3)}], {}, "no float tensor with any entries"),
        ("ties", {**base, "layer.bias": torch.empty(3, device="meta")}, [ft], {}, "base['layer.bias'] is a meta tensor"),
        ("ties", base, [ft], {"k": "0.2"}, "k: '0.2' holds a string where a number is expected"),
    ]
    for method, b, finetuned, hp, words in cases:
        with pytest.raises(ValueError) as err:
            merge(method, b, finetuned, **hp)
        assert words in str(err.value)
    with pytest.raises(ValueError) as err:  # a union field: only the member the input was meant for
        merge("task_arithmetic", base, [ft], lam=float("nan"))
    assert str(err.value) == "invalid hyperparameters for 'task_arithmetic': lam: Input should be a finite number"
    with pytest.raises(ValueError, match=r": lam\[1\]: Input should be a finite number$"):
        merge("task_arithmetic", base, [ft, corpus.state_dict(2)], lam=[0.5, float("nan")])
    with pytest.raises(ValueError) as err:  # one line per field, no pydantic links or input dumps
        merge("ties", base, [ft], k=2, agg="median")
    assert str(err.value) == ("invalid hyperparameters for 'ties': k: Input should be less than or equal to 1; "
                              "agg: Input should be 'mean', 'sum', 'max' or 'weighted_mean'")
    assert merge("average", base, [ft, dict(ft)])  # equal contents in two objects: a caller's choice


# ---- model lists ----

def test_empty_model_list(tmp_path: Path) -> None:
    base, _ = corpus.family(tmp_path, n_models=0)
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match="got 0"):
        merge_checkpoints("task_arithmetic", base, [], out, {"lam": 0.5}, progress=False)
    with pytest.raises(ValueError, match="got 0"):
        merge("average", load_state_dict(base), [])
    _assert_nothing_written(out)


def test_one_model_only(tmp_path: Path) -> None:
    """Methods that need two models say so; Task Arithmetic of one model is base + lam * tau."""
    base, (ft,) = corpus.family(tmp_path, n_models=1)
    with pytest.raises(ValueError, match="slerp.*got 1"):
        merge_checkpoints("slerp", base, [ft], tmp_path / "merged", {}, progress=False)
    _assert_nothing_written(tmp_path / "merged")
    result = merge_checkpoints("task_arithmetic", base, [ft], tmp_path / "ta", {"lam": 0.5}, progress=False)
    b, f, m = load_state_dict(base), load_state_dict(ft), load_state_dict(result.out_dir)
    torch.testing.assert_close(m["layer.weight"], b["layer.weight"] + 0.5 * (f["layer.weight"] - b["layer.weight"]))
    assert torch.equal(m["position_ids"], b["position_ids"])


def test_invalid_hyperparameters_fail_before_reading(tmp_path: Path) -> None:
    base, models = corpus.family(tmp_path)
    corpus.truncate(models[0])  # would fail on reading: the hyperparameter error must come first
    with pytest.raises(ValueError, match="k"):
        merge_checkpoints("ties", base, models, tmp_path / "merged", {"k": 1.5}, progress=False)
    with pytest.raises(ValueError, match="nonexistent_method"):
        merge_checkpoints("nonexistent_method", base, models, tmp_path / "merged", {}, progress=False)
    _assert_nothing_written(tmp_path / "merged")


def test_output_overlapping_an_input_is_refused(tmp_path: Path) -> None:
    base, models = corpus.family(tmp_path)
    before = corpus.weights_file(models[0]).read_bytes()
    with pytest.raises(ValueError, match="overlaps"):
        merge_checkpoints("average", base, models, models[0], {}, progress=False)
    assert corpus.weights_file(models[0]).read_bytes() == before


def test_the_same_checkpoint_twice_or_the_base_as_a_model_is_refused(tmp_path: Path) -> None:
    base, models = corpus.family(tmp_path)
    out = tmp_path / "merged"
    again = models[0].parent / "x" / ".." / models[0].name  # another spelling of models[0]
    with pytest.raises(ValueError, match="same checkpoint"):
        merge_checkpoints("ties", base, [models[0], again], out, {}, progress=False)
    with pytest.raises(ValueError, match="base checkpoint itself"):
        merge_checkpoints("pcb", base, [base, models[0]], out, {}, progress=False)
    _assert_nothing_written(out)
    copy = tmp_path / "copy_of_base"
    shutil.copytree(base, copy)  # the same contents under another path
    with pytest.raises(ValueError, match="copy_of_base has the same content as the base"):
        merge_checkpoints("ties", base, [copy, models[0]], out, {}, progress=False)
    _assert_nothing_written(out)
    # Methods that combine the models themselves may take the base as one of them.
    merge_checkpoints("average", base, [base, models[0]], out, {}, progress=False)
    b, f, m = (load_state_dict(d) for d in (base, models[0], out))
    assert torch.equal(m["layer.weight"], (b["layer.weight"] + f["layer.weight"]) / 2)


def test_an_empty_output_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = corpus.family(tmp_path / "models")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # Path("") would be this directory
    with pytest.raises(ValueError, match=r"the output directory is empty \('' given\)"):
        merge_checkpoints("task_arithmetic", base, models, "", {}, progress=False)
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize("kwargs, words", [
    ({"device": "meta"}, ["meta", "cpu, cuda"]),
    ({"out_dtype": torch.int8}, ["not a float dtype"]),
    ({"input_hashes": ["h"]}, ["input_hashes has 1", "(3)"]),
])
def test_api_arguments_are_checked_before_work(kwargs: dict, words: list[str], tmp_path: Path) -> None:
    base, models = corpus.family(tmp_path)
    with pytest.raises(ValueError) as err:
        merge_checkpoints("task_arithmetic", base, models, tmp_path / "merged", {}, progress=False, **kwargs)
    for word in words:
        assert word in str(err.value)
    _assert_nothing_written(tmp_path / "merged")


def test_one_path_given_as_the_model_list_is_refused(tmp_path: Path) -> None:
    base, models = corpus.family(tmp_path)
    with pytest.raises(ValueError, match="list of checkpoint paths"):
        merge_checkpoints("task_arithmetic", base, str(models[0]), tmp_path / "merged", {}, progress=False)


def test_a_checkpoint_without_float_entries_is_refused(tmp_path: Path) -> None:
    sd = {"position_ids": torch.arange(4), "empty": torch.zeros(0)}
    base = save_checkpoint(sd, tmp_path / "base")
    ft = save_checkpoint(sd, tmp_path / "ft")
    with pytest.raises(ValueError, match="no float tensor with any entries"):
        merge_checkpoints("ties", base, [ft], tmp_path / "merged", {}, progress=False)
    _assert_nothing_written(tmp_path / "merged")


def test_an_unwritable_output_location_fails_before_work(tmp_path: Path) -> None:
    base, models = corpus.family(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not a writable directory"):
        merge_checkpoints("ties", base, models, blocker / "merged", {}, progress=False, input_hashes=["-"] * 3)
    if Path("/proc").is_dir():  # root may write anywhere by os.access, but not in /proc
        with pytest.raises(ValueError, match="cannot create the output under /proc"):
            merge_checkpoints("ties", base, models, "/proc/merged", {}, progress=False, input_hashes=["-"] * 3)


def test_replacing_an_earlier_output_never_deletes_files_mergeflow_did_not_write(tmp_path: Path) -> None:
    base, models = corpus.family(tmp_path)
    out = tmp_path / "merged"
    merge_checkpoints("average", base, models, out, {}, progress=False)
    merge_checkpoints("average", base, models, out, {}, progress=False)  # replacing its own output is fine
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="my_notes.txt"):
        merge_checkpoints("average", base, models, out, {}, progress=False)
    assert (out / "my_notes.txt").read_text() == "mine"


def test_an_overflowing_merge_is_refused_in_memory_too() -> None:
    base = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match="merged w has NaN or inf") as err:
        merge("task_arithmetic", base, [{"w": torch.full((3,), 2.0)}], lam=1e39)
    assert "Lower lam (or p for DARE); nothing was written" in str(err.value)  # float32 is as wide as it gets
    half = {"w": torch.ones(3, dtype=torch.float16)}
    with pytest.raises(ValueError, match="overflows float16. Lower lam .*, or write a wider dtype"):
        merge("task_arithmetic", half, [{"w": torch.full((3,), 2.0, dtype=torch.float16)}], lam=1e5)


def test_tensors_that_require_grad_are_merged_like_plain_ones() -> None:
    base = {"w": torch.ones(3, requires_grad=True)}
    ft = {"w": torch.tensor([2.0, 0.5, 1.25], requires_grad=True)}
    for method in ("ties", "pcb", "task_arithmetic"):
        out = merge(method, base, [ft], ratio=0.9, clip=0.0) if method == "pcb" else merge(method, base, [ft], lam=0.5)
        assert not out["w"].requires_grad


# ---- code in inputs never runs ----

def test_malicious_pickle_never_executes(tmp_path: Path) -> None:
    marker = tmp_path / corpus.MARKER_NAME
    base, models = corpus.family(tmp_path)
    corpus.malicious_pickle(models[0], marker)
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(models[0])  # refused by default
    with pytest.raises(CheckpointError, match="refused to unpickle") as refused:
        Checkpoint(models[0], allow_pickle=True)  # opted in: weights_only still refuses the payload
    assert "it calls io.open" in str(refused.value)  # what torch refused, not its advice to run it anyway:
    assert not any(a in str(refused.value) for a in ("weights_only` set to `False", "safe_globals", "trust"))
    with pytest.raises(ValueError, match="pickle"):
        merge_checkpoints("average", base, models, tmp_path / "merged", {}, progress=False)
    with pytest.raises(ValueError):
        merge_checkpoints("average", base, models, tmp_path / "merged", {}, progress=False,
                          allow_pickle=True)
    assert not marker.exists(), "the pickle payload ran"
    _assert_nothing_written(tmp_path / "merged")


def test_remote_code_in_config_is_not_trusted(tmp_path: Path) -> None:
    from mergeflow.sources import resolve_checkpoint

    marker = tmp_path / corpus.MARKER_NAME
    base, models = corpus.family(tmp_path)
    corpus.remote_code_config(models[0], marker)
    with pytest.raises(ValueError, match="auto_map"):
        resolve_checkpoint(str(models[0]))
    with pytest.raises(ValueError, match="auto_map.*--trust-remote-code"):
        merge_checkpoints("average", base, models, tmp_path / "merged", {}, progress=False, input_hashes=["-"] * 3)
    _assert_nothing_written(tmp_path / "merged")
    # Opted in, the merge runs (it reads tensors and copies files, nothing else) and runs no code.
    merge_checkpoints("average", base, models, tmp_path / "merged", {}, progress=False, trust_remote_code=True)
    assert not marker.exists(), "remote code ran"


def test_a_corrupt_config_json_is_named(tmp_path: Path) -> None:
    base, models = corpus.family(tmp_path)
    (models[1] / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"ft1/config.json: not valid JSON"):
        merge_checkpoints("ties", base, models, tmp_path / "merged", {}, progress=False, input_hashes=["-"] * 3)
    _assert_nothing_written(tmp_path / "merged")


def test_a_refused_pickle_never_suggests_loading_it_unsafely(tmp_path: Path) -> None:
    marker = tmp_path / corpus.MARKER_NAME
    _, models = corpus.family(tmp_path)
    corpus.malicious_pickle(models[0], marker)
    with pytest.raises(CheckpointError) as err:
        Checkpoint(models[0], allow_pickle=True)
    assert "weights_only=False" not in str(err.value) and "never runs a pickle's code" in str(err.value)
    assert not marker.exists()


def test_a_missing_adamerging_coefficients_file_is_named() -> None:
    base = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="coefficients='nope.safetensors': No such file"):
        merge("adamerging", base, [{"w": torch.ones(2)}], coefficients="nope.safetensors")


# ---- the artifact store keeps to its root ----

@pytest.mark.parametrize("kind,key", [("merged", "../../escape"), ("../merged", "k"), ("merged", "a/b"),
                                      ("merged", ".."), ("merged", "/etc"), ("", "k")])
def test_artifact_names_cannot_escape_the_store(kind: str, key: str, tmp_path: Path) -> None:
    from tasks.artifacts import ArtifactStore, ArtifactStoreError

    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(ArtifactStoreError):
        with store.writer(kind, key):
            pass
    assert not (tmp_path / "escape").exists()


def test_artifact_paths_via_symlink_cannot_escape(tmp_path: Path) -> None:
    from tasks.artifacts import ArtifactStore, ArtifactStoreError

    store = ArtifactStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "link").symlink_to(tmp_path)
    with pytest.raises(ArtifactStoreError, match="escapes"):
        store.contain(tmp_path / "store" / "link" / "secret")
    with pytest.raises(ArtifactStoreError, match="escapes"):
        store.contain(tmp_path / "store" / ".." / "secret")


# ---- params.yaml ----

PARAMS_CASES = {
    # case: (change to a valid params.yaml, words the error must contain)
    "unknown method": ({"merge": {"method": "tiess"}}, ["merge", "tiess"]),
    "hyperparameter of no method": ({"merge": {"method": "ties", "kk": 0.2}}, ["kk"]),
    "kept fraction out of range": ({"merge": {"method": "ties", "k": 1.5}}, ["k"]),
    "wrong type": ({"merge": {"method": "task_arithmetic", "lam": "half"}}, ["lam"]),
    "unknown section": ({"mergee": {}}, ["mergee"]),
    "bad device": ({"device": "tpu"}, ["device"]),
    "empty sweep axis": ({"sweep": {"grid": {"task_arithmetic": {"lam": []}}}}, ["lam"]),
    "negative batch size": ({"evaluation": {"batch_size": -1}}, ["batch_size"]),
    "unknown zoo field": ({"zoo": {"spec": {"finetune_stepz": 3}}}, ["finetune_stepz"]),
}


@pytest.mark.parametrize("case", sorted(PARAMS_CASES))
def test_invalid_params_yaml(case: str, tmp_path: Path) -> None:
    from flows.params import ParamsError, load_params

    change, words = PARAMS_CASES[case]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(change))
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path / "params.yaml")
    for word in words:
        assert word in str(err.value), f"{case}: {word!r} not in error: {err.value}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "validation wrote files"


def test_invalid_override_and_non_mapping_params(tmp_path: Path) -> None:
    from flows.params import ParamsError, load_params

    (tmp_path / "params.yaml").write_text("merge: {method: average}\n")
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        load_params(tmp_path / "params.yaml", ["merge.method"])
    (tmp_path / "params.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


# ---- the same through `mergeflow merge RECIPE --out DIR` ----

CLI_CASES = {
    # case: (break the family, recipe fields, words stderr must contain)
    "truncated safetensors": (lambda ms, m: corpus.truncate(ms[0]), {}, ["truncated or corrupt"]),
    "NaN in weights": (lambda ms, m: corpus.with_value(ms[0], float("nan")), {}, ["NaN"]),
    "mismatched shape": (lambda ms, m: corpus.with_shape(ms[0]), {}, ["shape"]),
    "malicious pickle": (lambda ms, m: corpus.malicious_pickle(ms[0], m), {}, ["pickle"]),
    "remote code": (lambda ms, m: corpus.remote_code_config(ms[0], m), {}, ["auto_map"]),
    "empty model list": (lambda ms, m: None, {"models": []}, ["models"]),
    "missing model path": (lambda ms, m: None, {"models": ["./nowhere"]}, ["nowhere"]),
    "unknown recipe field": (lambda ms, m: None, {"lamda": 0.5}, ["lamda"]),
    "hyperparameter out of range": (lambda ms, m: None, {"method": "ties", "hyperparameters": {"k": 2}}, ["k"]),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_merge_refuses_bad_input(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mergeflow.cli import main

    marker = tmp_path / corpus.MARKER_NAME
    base, models = corpus.family(tmp_path)
    breaker, fields, words = CLI_CASES[case]
    breaker(models, marker)
    recipe = {"method": "task_arithmetic", "base": "./base", "models": ["./ft0", "./ft1"],
              "hyperparameters": {"lam": 0.5}, **fields}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "merged"
    code = main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, f"{case}: exit {code}, stderr: {err}"
    for word in words:
        assert word in err, f"{case}: {word!r} not in: {err}"
    assert "Traceback" not in err
    assert not marker.exists()
    _assert_nothing_written(out)


def test_cli_console_script_exit_status(tmp_path: Path) -> None:
    """The installed `mergeflow` command itself: status 2, one clear line, no output."""
    import subprocess
    import sys

    base, models = corpus.family(tmp_path)
    corpus.with_value(models[1], float("inf"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(
        {"method": "average", "base": "./base", "models": ["./ft0", "./ft1"]}))
    r = subprocess.run([str(Path(sys.executable).parent / "mergeflow"), "merge", str(tmp_path / "recipe.yaml"),
                        "--out", str(tmp_path / "merged")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "inf" in r.stderr and "Traceback" not in r.stderr, r.stderr
    _assert_nothing_written(tmp_path / "merged")
