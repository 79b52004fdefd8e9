"""Ctrl-C on `mergeflow run`, as a terminal sends it: SIGINT to the whole foreground process
group, so Prefect's temporary API server (a child in the same group) stops at the same moment
and the run can no longer report its crash to it. The command must still end within seconds,
with exit status 130, one line saying so, and no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from live_servers import seed_store, tiny_project

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _foreground_job() -> None:
    """In the child: a process group of its own with the default SIGINT, as a shell's
    foreground job (background jobs of a non-interactive shell ignore SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgrp()


def test_ctrl_c_ends_a_pipeline_run_within_seconds(tiny_zoo_store: Path, tmp_path: Path) -> None:
    params = tiny_project(tmp_path / "p", merge={"method": "adamerging", "steps": 100000})
    seed_store(tiny_zoo_store, params)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the temporary server
    proc = subprocess.Popen([sys.executable, "-m", "mergeflow", "run", str(params)], cwd=REPO, env=env,
                            preexec_fn=_foreground_job, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    tuning = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            if "adamerging (" in line:
                tuning.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert tuning.wait(180), "AdaMerging never started:\n" + "".join(output)[-3000:]
        pressed = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        seconds = time.monotonic() - pressed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(5)
    log = "".join(output)
    assert proc.returncode == 130, log[-3000:]
    assert "interrupted" in log and "Traceback" not in log, log[-3000:]
    assert seconds < 20, f"took {seconds:.1f} s to stop"
    assert not (params.parent / "outputs" / "merged").exists()  # the run never got as far as a merge
