"""A DVC remote in a local directory: push, fresh clone, pull, and `dvc repro` is up to date.

The repo is a temp git repo with a one-stage pipeline that writes a merged checkpoint with the
real library (tests/test_dvc.py covers the project's own dvc.yaml; this covers the remote).
The clone shares nothing with the original but git and the remote: its DVC cache starts empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
STAGE = '''
import sys, yaml, torch
from mergeflow import merge
from mergeflow.checkpoint_writer import save_checkpoint
lam = yaml.safe_load(open("params.yaml"))["merge"]["lam"]
g = torch.Generator().manual_seed(0)
base = {"w": torch.randn(64, 64, generator=g)}
fts = [{"w": base["w"] + torch.randn(64, 64, generator=g)} for _ in range(2)]
save_checkpoint(merge("task_arithmetic", base, fts, lam=lam), "outputs/merged")
open("ran.log", "a").write("stage ran\\n")  # not a DVC out: shows whether repro re-ran
'''


def run(cwd: Path, *argv: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=180,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{' '.join(argv)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_push_clone_pull_and_repro_is_up_to_date(tmp_path: Path) -> None:
    repo, remote, clone = tmp_path / "repo", tmp_path / "remote", tmp_path / "clone"
    repo.mkdir()
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "dvc", "init", "-q")
    (repo / "stage.py").write_text(STAGE)
    (repo / "params.yaml").write_text("merge:\n  lam: 0.5\n")
    (repo / ".gitignore").write_text("ran.log\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"merge": {
        "cmd": f"{sys.executable} stage.py", "deps": ["stage.py"], "params": ["merge.lam"],
        "outs": ["outputs/merged"]}}}))
    run(repo, "dvc", "remote", "add", "-d", "shared", str(remote))
    run(repo, "dvc", "repro")
    run(repo, "dvc", "push")
    assert any(p.is_file() for p in remote.rglob("*")), "push put nothing in the remote"
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "pipeline")
    original = {p.name: p.read_bytes() for p in (repo / "outputs" / "merged").iterdir()}

    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "outputs" / "merged").exists()
    assert not (clone / ".dvc" / "cache").exists()  # nothing shared but git and the remote
    run(clone, "dvc", "pull")
    pulled = {p.name: p.read_bytes() for p in (clone / "outputs" / "merged").iterdir()}
    assert pulled == original

    status = run(clone, "dvc", "status")
    assert "up to date" in status, status
    repro = run(clone, "dvc", "repro")
    assert "up to date" in repro, repro
    assert not (clone / "ran.log").exists(), "repro re-ran the stage after a pull"
