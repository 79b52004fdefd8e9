"""Benchmark: PCB-Merging with the streaming engine vs the I/O floor, on Llama checkpoints.

The I/O floor is the least any merge must do: read every tensor of the base and the K models
once and write one model. Each measurement runs in its own process, so its peak RSS
(`wait4` ru_maxrss) is its own. Ratios are taken within one run (the machine is shared).

    python bench/bench_pcb.py --size 0.5b [--methods pcb ties]   # builds the checkpoints once

Targets (issue 4): pcb wall time <= 3x the floor, peak RSS <= 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HPARAMS = {
    "pcb": {"ratio": 0.1, "variant": "nlp", "clip": 0.01, "lam": 1.0},
    "pcb_vision_es": {"ratio": 0.05, "variant": "vision_es", "clip": 0.01, "lam": 1.0},
    "ties": {"k": 0.2, "lam": 1.0},
    "task_arithmetic": {"lam": 0.3},
}


def io_floor(base: str, models: list[str], out: str) -> None:
    """Read every tensor of every input once, write the base's tensors as one model."""
    from mergeflow.checkpoint_writer import CheckpointWriter
    from mergeflow.engine.reader import TensorSource

    # The engine's own reader (positioned reads, no mmap), so RSS compares like with like.
    inputs = [TensorSource(p) for p in [base, *models]]
    with CheckpointWriter(out, max_shard_bytes=256 * 2**20) as writer:
        for name in inputs[0].checkpoint.names:
            tensors = [src.read(name) for src in inputs]
            writer.add(name, tensors[0])


def merge(method: str, base: str, models: list[str], out: str) -> None:
    from mergeflow.engine import merge_checkpoints

    name = "pcb" if method.startswith("pcb") else method
    merge_checkpoints(name, base, models, out, HPARAMS[method], progress=False,
                      input_hashes=["bench"] * (len(models) + 1))


def _child(kind: str, base: str, models: list[str]) -> tuple[float, int, float]:
    """Run one measurement in a fresh process; returns (wall seconds, peak RSS bytes, CPU seconds).

    CPU time (user + system) is reported too: on a shared machine the wall time mostly measures
    how many other processes ran at the same time."""
    out = tempfile.mkdtemp(prefix=f"bench_pcb_{kind}_")
    shutil.rmtree(out)
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); "
            "from bench.bench_pcb import io_floor, merge; args = json.loads(sys.argv[1]); "
            "io_floor(args['base'], args['models'], args['out']) if args['kind'] == 'floor' else "
            "merge(args['kind'], args['base'], args['models'], args['out'])")
    payload = json.dumps({"kind": kind, "base": base, "models": models, "out": out})
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, payload], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if status != 0:
        raise RuntimeError(f"{kind} failed (status {status})")
    return seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def _import_seconds() -> float:
    """Process start + imports, paid by every child; reported so it can be taken out."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mergeflow.engine, mergeflow.checkpoint_writer"],
                   cwd=ROOT, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["small", "0.5b"])
    parser.add_argument("--models-dir", default=None,
                        help="holds base/ and ft*/ (default /tmp/mf_llama_SIZE, built if missing)")
    parser.add_argument("--methods", nargs="+", default=["pcb"], choices=sorted(HPARAMS))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    root = Path(args.models_dir or f"/tmp/mf_llama_{args.size.replace('.', '')}")
    if args.models_dir is None and not (root / "base").is_dir():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_llama.py"), "--size", args.size,
                        "--models", "3", "--out", str(root)], check=True)
    base = str(root / "base")
    models = sorted(str(p) for p in root.glob("ft*"))
    if not (root / "base").is_dir() or not models:
        sys.exit(f"{root} has no base/ and ft*/ checkpoints; make them with "
                 f"`python bench/make_llama.py --size 0.5b --models 3 --out {root}`")
    gib = 2**30
    results: dict = {"models_dir": str(root), "models": len(models), "imports_s": _import_seconds()}
    _child("floor", base, models)  # warm the page cache, so every measurement reads the same way
    floor_s, floor_rss, floor_cpu = _child("floor", base, models)
    results["floor"] = {"seconds": floor_s, "peak_rss_gib": floor_rss / gib, "cpu_s": floor_cpu}
    print(f"I/O floor: {floor_s:.1f} s (CPU {floor_cpu:.1f} s), peak RSS {floor_rss / gib:.2f} GiB", flush=True)
    for method in args.methods:
        seconds, rss, cpu = _child(method, base, models)
        results[method] = {"seconds": seconds, "peak_rss_gib": rss / gib, "x_floor": seconds / floor_s,
                           "cpu_s": cpu, "cpu_x_floor": cpu / floor_cpu, "hparams": HPARAMS[method]}
        print(f"{method} {HPARAMS[method]}: {seconds:.1f} s = {seconds / floor_s:.2f}x floor "
              f"(CPU {cpu:.1f} s = {cpu / floor_cpu:.2f}x floor CPU), peak RSS {rss / gib:.2f} GiB "
              f"(load average now {os.getloadavg()[0]:.1f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
