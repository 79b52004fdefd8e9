"""Ctrl-C and SIGTERM for the long commands (`mergeflow merge`, `run`, `zoo`, `sweep`).

A stop signal unwinds the main thread with KeyboardInterrupt, so every atomic write removes its
temp directory and the command exits with 130. If unwinding does not end within
STOP_GRACE_SECONDS (a signal that landed inside a lock that unwinding needs; a pipeline whose
Prefect server, in the same process group, stopped at the same Ctrl-C and cannot be told), a
watchdog, or a second signal, deletes the unfinished outputs and exits at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

STOP_GRACE_SECONDS = 10.0  # after a stop signal, how long unwinding may take before a hard exit
_stopping = threading.Event()
# Temp directories of writes not yet committed or aborted: what a hard exit deletes.
_unfinished: set[Path] = set()
_unfinished_lock = threading.Lock()


def track_unfinished(path: Path) -> None:
    """`path` is an unfinished write's temp directory until `untrack_unfinished(path)`."""
    with _unfinished_lock:
        _unfinished.add(path)


def untrack_unfinished(path: Path) -> None:
    with _unfinished_lock:
        _unfinished.discard(path)


def remove_unfinished_outputs() -> None:
    """Delete every unfinished write's temp directory (a process about to exit without
    unwinding: `_exit_now`)."""
    with _unfinished_lock:
        pending = list(_unfinished)
    for tmp_dir in pending:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def install_stop_handlers() -> dict:
    """Route SIGINT and SIGTERM to `_stop`; returns the handlers they replace (none off the main
    thread, where Python cannot set handlers: a merge run from a thread keeps the process's)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _stop(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM (a scheduler stopping the job): unwind with KeyboardInterrupt, so every
    atomic write removes its temp directory (the command then exits with 130).

    An interrupt can land while the main thread holds a lock that unwinding needs (a thread
    pool's, say) and unwinding then never ends. So a watchdog, or a second signal, deletes the
    unfinished outputs and exits at once if unwinding is not done within STOP_GRACE_SECONDS."""
    if _stopping.is_set():
        _exit_now()
    _stopping.set()
    threading.Thread(target=_watchdog, daemon=True, name="mergeflow-stop").start()
    raise KeyboardInterrupt


def _watchdog() -> None:
    time.sleep(STOP_GRACE_SECONDS)
    _exit_now()


def _exit_now() -> None:
    remove_unfinished_outputs()
    print("interrupted (unfinished output removed)", file=sys.stderr)
    os._exit(130)
