#!/usr/bin/env python
"""Build the tiny random-weight Qwen2.5-VL into OUT_DIR (offline, a few seconds).

    python scripts/build_tiny_model.py ~/.cache/regioncap/tiny-qwen2.5-vl-v1 [--seed 0]

A complete folder is reused; see ``regioncap.tiny`` for what is built.
"""

from __future__ import annotations

import argparse
import logging
import time

from regioncap.tiny import build_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to build into (reused when already complete)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tokenizer corpus and the weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    path = build_tiny_model(args.out_dir, seed=args.seed)
    print(f"{path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
