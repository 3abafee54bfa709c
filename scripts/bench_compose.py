"""Wall time of ``python -m regioncap --cfg job`` (compose and print the config) for one or more checkouts.

    python scripts/bench_compose.py [--runs 7] CHECKOUT [CHECKOUT ...]

Each run is a fresh interpreter started in the checkout with it first on
``PYTHONPATH``; the checkouts take turns run by run, so load on a shared
machine falls on all of them alike. Bytecode is cached in a temporary folder
outside the checkouts (one per checkout, warmed by one run first), as an
installed package has it. Prints the median and the spread of each, and its
ratio to the first checkout's median (the baseline of the same run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List


def one_run(checkout: Path, cache: Path) -> float:
    """Seconds of one ``--cfg job`` in ``checkout``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=str(checkout), PYTHONPYCACHEPREFIX=str(cache))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "regioncap", "--cfg", "job"], cwd=checkout, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: --cfg job failed:\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        caches = {c: Path(tmp) / str(i) for i, c in enumerate(args.checkouts)}
        for checkout in args.checkouts:
            one_run(checkout, caches[checkout])  # writes the bytecode cache
        times: Dict[Path, List[float]] = {c: [] for c in args.checkouts}
        for _ in range(args.runs):
            for checkout in args.checkouts:
                times[checkout].append(one_run(checkout, caches[checkout]))
    base = statistics.median(times[args.checkouts[0]])
    for checkout, values in times.items():
        median = statistics.median(values)
        print(f"{checkout}: median {median:.3f} s (min {min(values):.3f}, max {max(values):.3f}, "
              f"{len(values)} runs), {median / base:.3f}x the first")


if __name__ == "__main__":
    main()
