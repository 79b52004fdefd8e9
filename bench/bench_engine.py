"""Benchmark the streaming engine against the I/O floor on Llama-architecture checkpoints.

Builds (once) a base and K fine-tunes with `make_llama.py`, then runs each case in its own
subprocess (clean peak RSS, from getrusage in the child) and prints one table:
  floor            read every input tensor once and write one model, with the engine's reader,
                   units, threads and writer and no arithmetic
  floor/plain      the same with plain safetensors calls on one thread (`safe_open` and
                   `get_tensor` for every tensor, `save_file` for the base's): the figure the
                   issue quotes ("about 4.5 s" at 0.5B, base + 3)
  task_arithmetic  mergeflow engine, lam 0.3
  ties/global      official TIES (k 0.2, whole-model trim: exact streaming quantiles)
  ties/tensor      mergekit-style per-tensor trim
  dare_ties        p 0.9
  dare             p 0.9, then task arithmetic
  pcb              PCB-Merging, nlp variant (ratio 0.1, clip 0.01): exact streaming quantiles/min/max
  pcb/vision_es    PCB-Merging, vision_es variant (ratio 0.05)
Wall and CPU (user + system) times are measured inside each child around the work (imports
excluded); ratios are to the floor of the same run. On a shared machine the CPU-time ratio is
the steadier one. Input content hashes are computed once beforehand (they are cached by
file stat, as in real use) and not counted.

    python bench/bench_engine.py --size small           # quick
    python bench/bench_engine.py --size 0.5b --models 3  # the issue's setting (~4 GB of inputs)
    python bench/bench_engine.py --size 0.5b --repeat 3  # fastest of 3 runs a case (noisy machines)

The input files are read once, untimed, before the first case, so every case starts with them
in the page cache. With `--cold`, every case starts with them evicted from it instead
(posix_fadvise DONTNEED, no root needed): the first read of each input comes from the disk, as
when merging checkpoints that were just downloaded, or ones too large for the page cache.

    python bench/bench_engine.py --size 0.5b --cold --repeat 3

`--torch-only` runs the engine without its fused CPU kernels (mergeflow.kernels), for an A/B of
the same build. The kernels load on a background thread in each case's process; until they
are ready (~0.6 s, longer on a machine's first run, which compiles them) the torch code runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    "floor": None,
    "floor/plain": None,
    "task_arithmetic": ("task_arithmetic", {"lam": 0.3}),
    "ties/global": ("ties", {"k": 0.2, "lam": 1.0}),
    "ties/tensor": ("ties", {"k": 0.2, "lam": 1.0, "trim_scope": "tensor"}),
    "dare_ties": ("dare_ties", {"p": 0.9, "lam": 1.0, "seed": 0}),
    "dare": ("dare", {"p": 0.9, "lam": 1.0, "seed": 0}),
    "pcb": ("pcb", {"ratio": 0.1, "variant": "nlp", "clip": 0.01, "lam": 1.0}),
    "pcb/vision_es": ("pcb", {"ratio": 0.05, "variant": "vision_es", "clip": 0.01, "lam": 1.0}),
}


def _dirs(root: Path, models: int) -> tuple[Path, list[Path]]:
    return root / "base", [root / f"ft{i}" for i in range(models)]


def run_floor(base: Path, models: list[Path], out: Path, workers: int | None) -> None:
    """Read every tensor of every input once and write the base's as one model, with the
    engine's own reads, units, threads and writer and no arithmetic: what any merge must do."""
    from mergeflow.engine.memory import tune_malloc
    from mergeflow.engine.plan import plan_merge
    from mergeflow.engine.run import MAX_DEFAULT_WORKERS
    from mergeflow.engine.units import read_stacked, run_units, usable_cpus
    from mergeflow.engine.writer import StreamingCheckpointWriter

    tune_malloc()
    plan = plan_merge("task_arithmetic", base, models, {}, out_dir=out)
    info = plan.base.checkpoint.info

    def one(unit, writer: StreamingCheckpointWriter) -> None:
        raw = read_stacked(plan, unit)
        writer.write(unit.name, unit.offset * raw.element_size(), raw[0])

    try:
        with StreamingCheckpointWriter(out) as writer:
            writer.plan([(k, info(k).shape, info(k).dtype) for k in plan.names])
            workers = workers or min(MAX_DEFAULT_WORKERS, usable_cpus())
            for _ in run_units(plan, plan.units, lambda u: one(u, writer), workers, False, "floor"):
                pass
    finally:
        plan.close()


def run_plain_floor(base: Path, models: list[Path], out: Path) -> None:
    """Every tensor of every input read once with plain safetensors calls, one file after
    another on one thread, and the base's tensors written as one file: no read-ahead hints, no
    threads, no positioned reads. What a straightforward script does."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    kept = {}
    for checkpoint in [base, *models]:
        for file in sorted(checkpoint.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                for name in f.keys():  # safe_open has no __iter__
                    tensor = f.get_tensor(name)
                    if checkpoint == base:
                        kept[name] = tensor
    out.mkdir(parents=True)
    save_file(kept, out / "model.safetensors")


def child(case: str, root: Path, models: int, out: Path, device: str, workers: int | None,
          cpu_kernels: bool = True) -> None:
    import torch  # noqa: F401  (import before timing)

    from mergeflow.engine import merge_checkpoints

    base, fts = _dirs(root, models)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    if case == "floor/plain":
        run_plain_floor(base, fts, out)
    elif CASES[case] is None:
        run_floor(base, fts, out, workers)
    else:
        method, hp = CASES[case]
        merge_checkpoints(method, base, fts, out, hp, progress=False, input_hashes=["-"] * (models + 1),
                          device=device, workers=workers, cpu_kernels=cpu_kernels)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu0
    print(json.dumps({"case": case, "wall_s": wall, "cpu_s": cpu, "peak_rss": usage.ru_maxrss * 1024}))


def _input_files(root: Path, models: int) -> list[Path]:
    base, fts = _dirs(root, models)
    return [f for d in [base, *fts] for f in sorted(d.glob("*.safetensors"))]


def _warm_page_cache(root: Path, models: int) -> None:
    """Read every input file once, untimed: every case then starts with the inputs cached (the
    first case would otherwise pay for the disk alone)."""
    for f in _input_files(root, models):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def _evict_page_cache(root: Path, models: int) -> None:
    """Drop every input file's cached pages (they are clean, so the kernel just forgets them)."""
    for f in _input_files(root, models):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _run_case(a: argparse.Namespace, root: Path, case: str) -> dict:
    out = root.parent / f"{root.name}_out_{case.replace('/', '_')}"
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # untimed: no earlier write-back competes with this case for the 2 CPUs
    if a.cold:
        _evict_page_cache(root, a.models)
    proc = subprocess.run([sys.executable, __file__, "--size", a.size, "--models", str(a.models),
                           "--root", str(root), "--child", case, "--out", str(out),
                           "--device", a.device, *(["--workers", str(a.workers)] if a.workers else []),
                           *(["--torch-only"] if a.torch_only else [])],
                          capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"case {case} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small", choices=["small", "0.5b"])
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--root", type=Path, default=None, help="where the checkpoints live (default /tmp/mf_llama_SIZE)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--device", default="cpu", help="where the engine does its math (cpu, cuda)")
    p.add_argument("--workers", type=int, default=None, help="engine threads (default: the engine's, min(4, usable CPUs))")
    p.add_argument("--repeat", type=int, default=1, help="runs per case; the table shows the fastest")
    p.add_argument("--cold", action="store_true", help="start every case with the inputs evicted from the page cache")
    p.add_argument("--torch-only", action="store_true",
                   help="run every step with the torch code, not the fused CPU kernels (same output bytes)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    root = a.root or Path(f"/tmp/mf_llama_{a.size.replace('.', '')}")
    if a.child:
        child(a.child, root, a.models, a.out, a.device, a.workers, cpu_kernels=not a.torch_only)
        return
    if not (root / f"ft{a.models - 1}").exists():
        subprocess.run([sys.executable, str(HERE / "make_llama.py"), "--size", a.size, "--models",
                        str(a.models), "--out", str(root)], check=True)
    if not a.cold:
        _warm_page_cache(root, a.models)
    # Repeats go round the cases (floor, TA, ..., floor, TA, ...), not case by case, so a slow
    # spell of the shared machine does not land on every run of one case.
    cases = a.cases.split(",")
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for _ in range(a.repeat):
        for case in cases:
            runs[case].append(_run_case(a, root, case))
    rows = [min(runs[case], key=lambda r: r["wall_s"]) for case in cases]
    from mergeflow.engine.units import usable_cpus

    floor = next((r for r in rows if r["case"] == "floor"), None)
    plain = next((r for r in rows if r["case"] == "floor/plain"), None)
    load = os.getloadavg()[0]
    print(f"\nengine benchmark: Llama {a.size}, base + {a.models} fine-tunes (bf16), "
          f"{usable_cpus()} CPU(s), device {a.device}{' (torch code only)' if a.torch_only else ''}, inputs {'cold (read from disk)' if a.cold else 'in the page cache'}, load average {load:.1f} at the end")
    print(f"{'case':<18}{'wall s':>9}{'x floor':>9}{'x plain':>9}{'CPU s':>9}{'x floor':>9}{'peak RSS MiB':>14}")
    for r in rows:
        wall_ratio = f"{r['wall_s'] / floor['wall_s']:.2f}" if floor else "-"
        plain_ratio = f"{r['wall_s'] / plain['wall_s']:.2f}" if plain else "-"
        cpu_ratio = f"{r['cpu_s'] / floor['cpu_s']:.2f}" if floor else "-"
        print(f"{r['case']:<18}{r['wall_s']:>9.2f}{wall_ratio:>9}{plain_ratio:>9}{r['cpu_s']:>9.2f}{cpu_ratio:>9}"
              f"{r['peak_rss'] / 2**20:>14.0f}")
    print("x floor: to the engine's own reads and writes (floor); x plain: to plain safetensors calls "
          "(floor/plain, the issue's I/O figure)")


if __name__ == "__main__":
    main()
