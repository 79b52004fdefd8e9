"""The content-addressed artifact store and the cache keys of the pipeline's tasks."""

from __future__ import annotations

import json
import threading

import pytest

from tasks.artifacts import MANIFEST, ArtifactRef, ArtifactStore, ArtifactStoreError, hash_tree
from tasks.cache import canonical, task_key


def _write(store: ArtifactStore, key: str, text: str) -> ArtifactRef:
    with store.writer("kind", key, main="data.txt") as out:
        out.main_path.write_text(text)
        out.summary = {"text": text}
    return out.ref


def test_write_then_get_returns_the_same_reference(tmp_path):
    store = ArtifactStore(tmp_path)
    ref = _write(store, "k1", "hello")
    assert ref.path == str(tmp_path.resolve() / "kind" / "k1" / "data.txt")
    assert open(ref.path).read() == "hello"
    assert ref.content_hash == hash_tree(ref.root)
    assert store.get("kind", "k1") == ref
    assert json.loads((tmp_path / "kind" / "k1" / MANIFEST).read_text())["summary"] == {"text": "hello"}
    assert not list((tmp_path / ".tmp").iterdir())  # no temp dir left behind


def test_a_deleted_artifact_is_absent_not_dangling(tmp_path):
    store = ArtifactStore(tmp_path)
    ref = _write(store, "k1", "hello")
    (tmp_path / "kind" / "k1" / "data.txt").unlink()
    assert store.get("kind", "k1") is None
    store.delete("kind", "k1")
    assert store.get("kind", "k1") is None and not (tmp_path / "kind" / "k1").exists()
    assert _write(store, "k1", "hello") == ref


def test_a_failed_write_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError), store.writer("kind", "k1", main="data.txt") as out:
        out.main_path.write_text("half")
        raise RuntimeError("interrupted")
    assert store.get("kind", "k1") is None
    assert not (tmp_path / "kind" / "k1").exists()
    assert not list((tmp_path / ".tmp").iterdir())


@pytest.mark.parametrize("kind, key", [("..", "k"), ("kind", ".."), ("kind", "../../etc"),
                                       ("a/b", "k"), ("kind", "/abs"), ("kind", "")])
def test_names_that_could_escape_the_store_are_refused(tmp_path, kind, key):
    with pytest.raises(ArtifactStoreError, match="plain name"):
        ArtifactStore(tmp_path / "store").dir(kind, key)


def test_paths_outside_the_store_are_refused_even_through_links(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    with pytest.raises(ArtifactStoreError, match="escapes"):
        store.contain(tmp_path / "store" / ".." / "elsewhere")
    (tmp_path / "store" / "link").symlink_to(tmp_path)
    with pytest.raises(ArtifactStoreError, match="escapes"):
        store.contain(tmp_path / "store" / "link" / "x")
    assert store.contain(tmp_path / "store" / "kind") == (tmp_path / "store" / "kind").resolve()


def test_concurrent_writers_of_one_artifact_never_corrupt_it(tmp_path):
    store = ArtifactStore(tmp_path)
    barrier = threading.Barrier(8)
    refs, errors = [], []

    def writer(i: int) -> None:
        try:
            with store.writer("kind", "same", main="data.txt") as out:
                out.main_path.write_text("x" * 100_000)
                barrier.wait()  # every writer holds a finished temp copy before anyone commits
            refs.append(out.ref)
        except Exception as e:  # pragma: no cover (reported below)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.content_hash for r in refs}) == 1 and len({r.path for r in refs}) == 1
    assert open(refs[0].path).read() == "x" * 100_000
    assert sorted(p.name for p in (tmp_path / "kind" / "same").iterdir()) == ["data.txt", MANIFEST]
    assert not list((tmp_path / ".tmp").iterdir())


def test_cache_keys_use_content_hashes_not_paths(tmp_path):
    a = ArtifactRef(kind="k", key="1", root="/x", path="/x/m", content_hash="h1")
    moved = a.model_copy(update={"root": "/y", "path": "/y/m"})
    other = a.model_copy(update={"content_hash": "h2"})
    code = ("tasks.cache",)
    key = task_key("merge", "merged", code, {"store": "/s1", "base": a, "lam": 0.3})
    assert key == task_key("merge", "merged", code, {"store": "/s2", "base": moved, "lam": 0.3})
    assert key != task_key("merge", "merged", code, {"store": "/s1", "base": other, "lam": 0.3})
    assert key != task_key("merge", "merged", code, {"store": "/s1", "base": a, "lam": 0.4})
    assert key != task_key("merge", "merged", ("tasks.artifacts",), {"store": "/s1", "base": a, "lam": 0.3})
    assert canonical({"b": [1, 2.5], "a": None}) == {"a": None, "b": [1, 2.5]}
    with pytest.raises(TypeError, match="content hash"):
        canonical(tmp_path)
