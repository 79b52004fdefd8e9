"""`python -m mergeflow.zoo [OUT_DIR] [--tiny]`: build a zoo without any orchestration and time it.

The pipeline's `mergeflow zoo` (flows/cli.py) is the cached, tracked way; this is the bare library.
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergeflow.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="zoo", help="where to write the zoo (replaced atomically)")
    parser.add_argument("--tiny", action="store_true", help="the seconds-to-build test zoo (ZooSpec.tiny())")
    args = parser.parse_args(argv)
    from mergeflow.zoo import ZooSpec, build_zoo

    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    build_zoo(ZooSpec.tiny() if args.tiny else ZooSpec(), args.out_dir, progress=True)
    print(f"wall {time.perf_counter() - wall:.1f} s, cpu {time.process_time() - cpu:.1f} s, "
          f"1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
