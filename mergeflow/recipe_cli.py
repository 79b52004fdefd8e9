"""`mergeflow merge RECIPE.yaml --out DIR`: run a recipe through the streaming engine.

Errors (bad recipe, mismatched checkpoints, NaN inputs, no disk space) print one clear message
and exit with status 2 before any output exists; a successful merge prints the output
directory and its content hash.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

STOP_GRACE_SECONDS = 10.0  # after a stop signal, how long unwinding may take before a hard exit
_stopping = threading.Event()


def main(args: argparse.Namespace) -> int:
    from mergeflow.engine import merge_checkpoints
    from mergeflow.recipe import load_recipe

    previous = install_stop_handlers()
    try:
        recipe = load_recipe(args.recipe)
        result = merge_checkpoints(
            recipe.method, recipe.base, recipe.models, args.out, recipe.hyperparameters,
            device=args.device or recipe.device or "cpu",
            progress=not getattr(args, "quiet", False),
            allow_pickle=bool(getattr(args, "allow_pickle", False)),
            trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
            out_dtype=recipe.out_dtype,
            base_only_tensors=recipe.base_only_tensors,
            recipe=recipe.model_dump(mode="json"),
            dry_run=bool(getattr(args, "dry_run", False)),
        )
    except (ValueError, OSError) as err:
        # Every error mergeflow raises on purpose is a ValueError whose message names the problem
        # and the fix (RecipeError, MergeConfigError, CheckpointError, NonFiniteInput, a method's
        # own checks); OSError is the file system (disk full mid-merge). One line, no traceback:
        # the output is written atomically, so nothing is left behind either way.
        print(f"mergeflow merge: {err}", file=sys.stderr)
        return 2
    finally:
        restore_handlers(previous)
    if getattr(args, "dry_run", False):
        print("dry run: recipe and checkpoints are valid; nothing was written")
        return 0
    print(f"wrote {result.out_dir} (content hash {result.output_hash}) in {result.seconds:.1f} s")
    return 0


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
    atomic write removes its temp directory (`mergeflow merge` then exits with 130).

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
    from mergeflow.checkpoint_writer import remove_unfinished_outputs

    remove_unfinished_outputs()
    print("interrupted (unfinished output removed)", file=sys.stderr)
    os._exit(130)
