"""mergeflow's engine against mergekit on the same checkpoints and the same mergekit recipe.

Each merge runs as its own process (wall time and peak RSS of that process and its children):
  mergekit   `mergekit-yaml RECIPE OUT` (CPU, its defaults)
  mergeflow  `mergeflow merge RECIPE --out OUT`: the same YAML, translated (mergeflow/mergekit_recipe.py)
and then the two outputs are compared tensor by tensor: for the deterministic methods they must
agree, except where the recipe's semantics differ on purpose (TIES: where the weighted trimmed sum
is exactly zero, mergekit elects +1 and mergeflow the whole model's majority sign; see
mergekit_recipe.py). DARE's random masks differ between the tools, so dare_ties is timed only.

mergekit is not a dependency of mergeflow: install it in a venv of its own and point at it.

    python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    python bench/bench_vs_mergekit.py --mergekit /tmp/mkvenv/bin/mergekit-yaml --size small
    python bench/bench_vs_mergekit.py --mergekit /tmp/mkvenv/bin/mergekit-yaml --size 0.5b --methods ties

The checkpoints are bench_engine.py's (built with make_llama.py on first use, random weights,
bf16). Inputs are read once beforehand, so both tools start with them in the page cache, and
mergeflow's input content hashes (cached by file stat) are computed once beforehand too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# case -> (merge_method, per-model parameters in mergekit's names, lambda or None); mergekit's
# default normalize (true for ties). "weight" may be a list: one per model, repeated as needed.
RECIPES = {
    "task_arithmetic": ("task_arithmetic", {"weight": 1.0}, 0.3),
    "ties": ("ties", {"weight": 1.0, "density": 0.2}, None),
    "ties/weighted": ("ties", {"weight": [0.6, 0.3, 0.1], "density": 0.2}, None),  # a weighted mean
    "dare_ties": ("dare_ties", {"weight": 1.0, "density": 0.1}, None),
    "linear/weighted": ("linear", {"weight": [1.0, 0.3, 0.5]}, None),  # a weighted average
}
COMPARED = {"task_arithmetic", "ties", "ties/weighted", "linear/weighted"}  # deterministic in both tools


def recipe(case: str, root: Path, models: int, dtype: str) -> str:
    method, params, lam = RECIPES[case]
    lines = [f"merge_method: {method}", f"dtype: {dtype}", "models:"]
    if method != "linear":  # mergekit's linear would average a base_model in, and wants a weight for it
        lines.insert(1, f"base_model: {root / 'base'}")
    for i in range(models):
        values = {k: (v[i % len(v)] if isinstance(v, list) else v) for k, v in params.items()}
        listed = ", ".join(f"{k}: {v}" for k, v in values.items())
        lines += [f"  - model: {root / f'ft{i}'}", f"    parameters: {{{listed}}}"]
    if lam is not None:
        lines += ["parameters:", f"  lambda: {lam}"]
    return "\n".join(lines) + "\n"


def timed(command: list[str]) -> dict:
    """Wall time and peak RSS (of the process tree) of one command, run in a fresh process."""
    probe = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "if p.returncode: sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:]); sys.exit(p.returncode)\n"
        "print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    os.sync()
    proc = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command[:2])} failed:\n{proc.stderr}")
    wall, rss_kib = proc.stdout.split()
    return {"wall_s": float(wall), "peak_rss_mib": int(rss_kib) / 1024}


def compare(a: Path, b: Path) -> dict:
    """How many entries differ between two checkpoint directories, and by how much at most."""
    from mergeflow.checkpoint import load_state_dict

    x, y = load_state_dict(a), load_state_dict(b)
    if sorted(x) != sorted(y):
        return {"same_names": False}
    differing = total = 0
    largest = 0.0
    for name in x:
        u, v = x[name].float(), y[name].float()
        diff = (u - v).abs()
        differing += int((diff > 0).sum())
        total += u.numel()
        largest = max(largest, float(diff.max()) if diff.numel() else 0.0)
    return {"same_names": True, "differing": differing, "entries": total, "max_abs_diff": largest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="path to mergekit-yaml (installed on its own)")
    ap.add_argument("--size", choices=["small", "0.5b"], default="small")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="the recipe's dtype: mergekit computes in it, mergeflow always in float32 and "
                         "writes it; float32 compares the methods' rules without bf16 rounding")
    ap.add_argument("--methods", default=",".join(RECIPES), help=f"comma-separated subset of {', '.join(RECIPES)}")
    a = ap.parse_args()
    root = Path(f"/tmp/mf_llama_{a.size.replace('.', '')}")  # bench_engine.py's
    if not (root / f"ft{a.models - 1}").is_dir():
        subprocess.run([sys.executable, str(HERE / "make_llama.py"), "--size", a.size, "--models", str(a.models),
                        "--out", str(root)], check=True)
    for f in sorted(root.glob("*/*.safetensors")):  # page cache: both tools start warm
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    # mergeflow records the inputs' content hashes in its manifest, cached by file stat: only the
    # first merge of a checkpoint version computes them (~0.8 s per GB and CPU). Done here,
    # untimed, as after a user's first merge of these checkpoints.
    from mergeflow.sources import resolve_checkpoint

    for d in ["base", *(f"ft{i}" for i in range(a.models))]:
        resolve_checkpoint(str(root / d))
    mergeflow = [sys.executable, "-m", "mergeflow"]
    rows = []
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        work = Path(tmp)
        for case in a.methods.split(","):
            if case not in RECIPES:
                raise SystemExit(f"unknown case {case!r}; choose from {', '.join(RECIPES)}")
            name = case.replace("/", "_")
            path = work / f"{name}.yml"
            path.write_text(recipe(case, root, a.models, a.dtype))
            mk, mf = work / f"mk_{name}", work / f"mf_{name}"
            t_mk = timed([a.mergekit, str(path), str(mk), "--no-cuda", "--quiet"])
            t_mf = timed([*mergeflow, "merge", str(path), "--out", str(mf)])
            row = {"method": case, "mergekit": t_mk, "mergeflow": t_mf}
            if case in COMPARED:
                row["outputs"] = compare(mk, mf)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            shutil.rmtree(mk, ignore_errors=True)
            shutil.rmtree(mf, ignore_errors=True)
    print(f"\nmergekit vs mergeflow: Llama {a.size}, base + {a.models} fine-tunes (bf16), recipe dtype {a.dtype}, "
          f"{os.cpu_count()} CPU(s), "
          f"inputs in the page cache, torch {torch.__version__}")
    print(f"{'method':16s} {'mergekit s':>10s} {'mergeflow s':>11s} {'speed-up':>8s} {'mk RSS MiB':>10s} "
          f"{'mf RSS MiB':>10s}  outputs")
    for r in rows:
        mk, mf = r["mergekit"], r["mergeflow"]
        out = r.get("outputs")
        said = ("not compared (random masks differ)" if out is None else
                f"{out['differing']} of {out['entries']} entries differ, max |diff| {out['max_abs_diff']:.3g}")
        print(f"{r['method']:16s} {mk['wall_s']:10.2f} {mf['wall_s']:11.2f} {mk['wall_s'] / mf['wall_s']:7.1f}x "
              f"{mk['peak_rss_mib']:10.0f} {mf['peak_rss_mib']:10.0f}  {said}")


if __name__ == "__main__":
    main()
