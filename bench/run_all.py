"""Run every benchmark script in bench/ (bench_*.py), one after another.

    python bench/run_all.py                 # quick sizes
    python bench/run_all.py --size 0.5b     # the checkpoint benches (engine, pcb) at 0.5B

Each script runs with its own defaults; `--size` goes to the scripts that take it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZED = {"bench_engine.py"}  # benches of Llama checkpoints: take --size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=["small", "0.5b"])
    size = ap.parse_args().size
    scripts = sorted(HERE.glob("bench_*.py"))
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        args = ["--size", size] if script.name in SIZED else []
        if subprocess.run([sys.executable, str(script), *args]).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
