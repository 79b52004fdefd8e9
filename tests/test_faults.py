"""Faults: retries, a flow killed mid-merge, a full disk, concurrent writers of one artifact.

Each test checks the two promises of the artifact store and the engine: an address only ever
holds a complete artifact (never a partial one), and the work already done is reused.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from bad_inputs import corpus

from mergeflow.checkpoint import load_state_dict
from mergeflow.checkpoint_writer import save_checkpoint
from tasks.artifacts import MANIFEST, ArtifactStore, hash_tree

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _complete_artifacts(store: Path, kind: str) -> list[Path]:
    """Artifacts at their final address; each must have a manifest whose hash matches its files."""
    found = []
    for d in sorted((store / kind).iterdir()) if (store / kind).exists() else []:
        manifest = json.loads((d / MANIFEST).read_text())
        assert manifest["key"] == d.name
        found.append(d)
    return found


def _tmp_leftovers(store: Path) -> list[str]:
    tmp = store / ".tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


# ---- a task that fails mid-run is retried ----

def test_failing_task_is_retried_and_leaves_one_complete_artifact(prefect_api, tmp_path: Path) -> None:
    """Attempt 1 dies halfway through writing its artifact; the retry writes it whole."""
    from prefect import flow, task

    store = ArtifactStore(tmp_path / "store")
    attempts = tmp_path / "attempts"

    @task(retries=2, retry_delay_seconds=0)
    def write_model(key: str) -> str:
        n = len(attempts.read_text()) if attempts.exists() else 0
        attempts.write_text("x" * (n + 1))
        with store.writer("merged", key, main="model") as out:
            save_checkpoint(corpus.state_dict(1), out.main_path)
            if n == 0:
                raise OSError("simulated crash halfway through the write")
            out.summary = {"attempt": n + 1}
        return out.ref.path

    @flow
    def pipeline() -> str:
        return write_model("k1")

    path = pipeline()
    assert attempts.read_text() == "xx", "the task ran once, not retried"
    (artifact,) = _complete_artifacts(store.root, "merged")
    assert json.loads((artifact / MANIFEST).read_text())["summary"] == {"attempt": 2}
    assert Path(path) == artifact / "model"
    assert hash_tree(artifact) == json.loads((artifact / MANIFEST).read_text())["content_hash"]
    assert _tmp_leftovers(store.root) == []


# ---- a flow killed mid-merge ----

def _run_killable(env: dict, store: Path, base: Path, models: list[Path], marker: Path | None,
                  kill_when_marker: bool) -> dict | None:
    argv = [sys.executable, str(HERE / "faults" / "killable_merge.py"), str(store), str(base),
            *map(str, models)]
    if marker is not None:
        argv += ["--slow-marker", str(marker)]
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        if kill_when_marker:
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert proc.poll() is None, f"flow ended before the merge began:\n{proc.stderr.read()}"
                assert time.monotonic() < deadline, "the merge never started"
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)  # no cleanup handlers run: a real crash
            proc.wait(timeout=30)
            return None
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_flow_killed_mid_merge_leaves_no_output_and_resumes_from_cache(prefect_api, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    base, models = corpus.family(tmp_path / "models", n_models=2)
    store = tmp_path / "store"
    # The subprocess flows use the session's Prefect API and share one Prefect home (its cache).
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "MERGEFLOW_HASH_CACHE": str(tmp_path / "hash-cache")}
    marker = tmp_path / "merge-started"

    assert _run_killable(env, store, base, models, marker, kill_when_marker=True) is None
    (tv,) = _complete_artifacts(store, "task_vectors")  # finished before the kill
    assert _complete_artifacts(store, "merged") == [], "a partial merge sits at its address"
    tv_written = (tv / MANIFEST).stat().st_mtime_ns

    result = _run_killable(env, store, base, models, None, kill_when_marker=False)
    assert result["task_vectors"] == "Cached", result  # resumed: not recomputed
    assert (tv / MANIFEST).stat().st_mtime_ns == tv_written
    assert result["merge"] == "Completed"
    (merged,) = _complete_artifacts(store, "merged")
    out = load_state_dict(result["merged"])
    sds = [load_state_dict(m) for m in models]
    assert torch.equal(out["layer.weight"], (sds[0]["layer.weight"] + sds[1]["layer.weight"]) / 2)


# ---- a full disk ----

@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 2 MiB tmpfs (we are root in CI containers that allow mounts); skipped where not allowed."""
    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); "
                    "test_write_beyond_file_size_limit covers a mid-write failure")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _big_family(root: Path) -> tuple[Path, list[Path]]:
    """4 MiB per model: more than the tiny disk holds."""
    def sd(seed: int) -> dict[str, torch.Tensor]:
        return {"w": torch.randn(1024, 1024, generator=torch.Generator().manual_seed(seed))}
    return save_checkpoint(sd(0), root / "base"), [save_checkpoint(sd(i), root / f"ft{i}") for i in (1, 2)]


def test_full_disk_engine_refuses_before_writing(tiny_disk: Path, tmp_path: Path) -> None:
    from mergeflow.engine import merge_checkpoints

    base, models = _big_family(tmp_path / "models")
    with pytest.raises(ValueError, match="not enough disk space"):
        merge_checkpoints("average", base, models, tiny_disk / "merged", {}, progress=False)
    assert list(tiny_disk.iterdir()) == []


def test_disk_filled_by_someone_else_mid_merge_says_so_and_leaves_nothing(tiny_disk: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """The space checked before the merge is gone when it writes (another job took it)."""
    from mergeflow.engine import merge_checkpoints, plan

    monkeypatch.setattr(plan, "_check_disk", lambda out, need: None)  # the check passed, back then
    base, models = _big_family(tmp_path / "models")
    with pytest.raises(OSError, match=r"the disk filled up while writing .*merged \(the output takes 4 MiB"):
        merge_checkpoints("average", base, models, tiny_disk / "merged", {}, progress=False)
    assert list(tiny_disk.iterdir()) == []


def test_disk_check_counts_the_output_dtype(tmp_path: Path) -> None:
    from mergeflow.engine import merge_checkpoints

    base = save_checkpoint({"w": torch.zeros(64, 32, dtype=torch.bfloat16), "step": torch.zeros(3, dtype=torch.int64)},
                           tmp_path / "base")
    ft = save_checkpoint({"w": torch.ones(64, 32, dtype=torch.bfloat16), "step": torch.ones(3, dtype=torch.int64)},
                         tmp_path / "ft")
    as_stored = merge_checkpoints("task_arithmetic", base, [ft], tmp_path / "o", {}, dry_run=True)
    widened = merge_checkpoints("task_arithmetic", base, [ft], tmp_path / "o", {}, dry_run=True,
                                out_dtype=torch.float32)
    assert as_stored.output_bytes == 64 * 32 * 2 + 3 * 8
    assert widened.output_bytes == 64 * 32 * 4 + 3 * 8  # integer buffers keep their dtype


def test_full_disk_artifact_store_keeps_no_partial_artifact(tiny_disk: Path) -> None:
    store = ArtifactStore(tiny_disk / "store")
    with pytest.raises(Exception, match="No space left"):  # OSError or SafetensorError
        with store.writer("merged", "k1", main="model") as out:
            save_checkpoint({"w": torch.zeros(1024, 1024)}, out.main_path)  # 4 MiB > 2 MiB
    assert not (tiny_disk / "store" / "merged" / "k1").exists()
    assert _tmp_leftovers(store.root) == []
    from mergeflow import stop_signals

    assert not stop_signals._unfinished  # the checkpoint writer whose last shard failed let go of its temp dir
    # the disk is usable again: the failed write released its space
    with store.writer("merged", "k2", main="model") as out:
        save_checkpoint({"w": torch.zeros(16)}, out.main_path)
    assert len(_complete_artifacts(store.root, "merged")) == 1


def test_write_beyond_file_size_limit(tmp_path: Path) -> None:
    """A write that fails after the engine's disk check passed (another job filled the disk):
    simulated with RLIMIT_FSIZE in a subprocess. Clear error, no output, no temp dir left."""
    base, models = _big_family(tmp_path / "models")
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    script = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        from mergeflow.engine import merge_checkpoints
        merge_checkpoints("average", {str(base)!r}, {[str(m) for m in models]!r}, {str(out)!r}, {{}},
                          progress=False)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "File too large" in r.stderr, r.stderr[-2000:]
    assert corpus.leftovers(out.parent, "merged") == []
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # only the child


# ---- two processes writing the same artifacts at once ----

WRITER = textwrap.dedent("""
    import sys, time, os
    from pathlib import Path
    from tasks.artifacts import ArtifactStore
    store, start, who = ArtifactStore(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    while not start.exists():
        time.sleep(0.001)
    for i in range(30):
        with store.writer("merged", f"key{i}", main="model.bin") as out:
            data = bytes([i]) * (1 << 20)
            for off in range(0, len(data), 1 << 16):  # many small writes widen the race window
                with open(out.main_path, "ab") as f:
                    f.write(data[off:off + (1 << 16)])
            out.summary = {"writer": who}
""")


def test_concurrent_writers_never_corrupt_the_store(tmp_path: Path) -> None:
    store, start = tmp_path / "store", tmp_path / "start"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(store), str(start), who], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
    time.sleep(1.5)  # both imported and waiting
    start.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    artifacts = _complete_artifacts(store, "merged")
    assert [a.name for a in artifacts] == sorted(f"key{i}" for i in range(30))
    for a in artifacts:
        i = int(a.name[3:])
        assert (a / "model.bin").read_bytes() == bytes([i]) * (1 << 20)
        manifest = json.loads((a / MANIFEST).read_text())
        assert manifest["content_hash"] == hash_tree(a)
        assert sorted(p.name for p in a.iterdir()) == [MANIFEST, "model.bin"]
    assert _tmp_leftovers(store) == []


# ---- a writer killed outright ----

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, torch
    from mergeflow.checkpoint_writer import CheckpointWriter
    writer = CheckpointWriter(sys.argv[1])
    writer.add("w", torch.zeros(1024))
    writer._flush()  # half the output on disk, then killed: no handler, no unwinding
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_writers_temp_dir_is_removed_by_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], cwd=REPO, capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    [stale] = tmp_path.glob(".merged.tmp-*")
    assert any(stale.iterdir())
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live writer's temp dir, and one of a writer on another host, are left alone
        host = socket.gethostname().replace("-", "_")
        live = tmp_path / f".merged.tmp-{host}-{alive.pid}-0123abcd"
        elsewhere = tmp_path / ".merged.tmp-otherhost-1-0123abcd"
        live.mkdir(), elsewhere.mkdir()
        save_checkpoint({"w": torch.ones(4)}, out)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", live.name, elsewhere.name])
    finally:
        alive.kill()
        alive.wait()


# ---- a merge stopped by the scheduler ----

def test_sigterm_mid_merge_leaves_no_temp_dir(tmp_path: Path) -> None:
    """`mergeflow merge` stopped with SIGTERM (what a scheduler or `kill` sends) unwinds like
    Ctrl-C: exit 130, and neither the output nor its temp directory is left."""
    g = torch.Generator().manual_seed(0)
    base_sd = {f"w{i}": torch.randn(2048, 2048, generator=g) for i in range(6)}
    paths = [save_checkpoint(base_sd, tmp_path / "base")]
    for j in range(2):
        paths.append(save_checkpoint({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()},
                                     tmp_path / f"ft{j}"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: ties\nbase: {paths[0]}\nmodels: [{paths[1]}, {paths[2]}]\n")
    out = tmp_path / "merged"
    env = {**os.environ, "MERGEFLOW_HASH_CACHE": str(tmp_path / "hash-cache")}
    proc = subprocess.Popen([sys.executable, "-m", "mergeflow", "merge", str(recipe), "--out", str(out), "-q"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".merged.tmp-*")):  # the merge pass has begun writing
            assert proc.poll() is None, f"the merge ended before it wrote:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, "the merge never started writing"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not out.exists() and not list(tmp_path.glob(".merged*")), "a stopped merge left files behind"


def test_a_hard_exit_removes_the_artifact_stores_unfinished_writes_too(tmp_path: Path) -> None:
    from mergeflow import stop_signals

    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(RuntimeError, match="stand-in for os._exit"):
        with store.writer("merged", "k1", main="model") as out:
            (out.dir / "model").write_bytes(b"half")
            stop_signals.remove_unfinished_outputs()  # what the watchdog does before os._exit(130)
            assert not out.dir.exists()
            raise RuntimeError("stand-in for os._exit")
    assert _tmp_leftovers(store.root) == [] and not stop_signals._unfinished


STUCK_UNWIND = """
import sys, time
from pathlib import Path
from mergeflow import stop_signals
from mergeflow.checkpoint_writer import CheckpointWriter

stop_signals.STOP_GRACE_SECONDS = float(sys.argv[2])
stop_signals.install_stop_handlers()
writer = CheckpointWriter(Path(sys.argv[1]))
try:
    print(writer.tmp_dir, flush=True)  # inside the try: the test signals once it reads this
    time.sleep(120)
finally:
    time.sleep(120)  # an unwinding that never ends, as when a signal lands inside a lock it needs
"""


@pytest.mark.parametrize("grace, signals", [(1.0, 1), (120.0, 2)], ids=["watchdog", "second signal"])
def test_a_stuck_unwind_still_exits_and_removes_the_unfinished_output(tmp_path: Path, grace: float,
                                                                      signals: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUCK_UNWIND, str(tmp_path / "out"), str(grace)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tmp_dir = Path(proc.stdout.readline().strip())
        assert tmp_dir.is_dir()
        for _ in range(signals):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert not tmp_dir.exists()
