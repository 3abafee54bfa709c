"""Soak: a run of a few thousand rows SIGKILLed several times, then resumed until done.

The whole process group (main process, fork server, preparation worker) is
killed at random points (by progress, polled asynchronously, so a kill lands
anywhere: mid-commit, between stages, while a batch is in the engine), and
once during start-up. After the last resume every row is in each records file
exactly once and every caption is the one an uninterrupted run gives.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
from PIL import Image

from conftest import REPO, pinned
from regioncap.records import read_jsonl

ROWS = 3000


def make_rows(folder: Path, n: int) -> Path:
    """``n`` rows over a few small images, 1-4 boxes each (fast to prepare: the soak is about commits)."""
    rng = random.Random(7)
    for i, (size, color) in enumerate([((64, 48), (200, 30, 30)), ((40, 90), (20, 160, 60)), ((96, 96), (0, 0, 200))]):
        Image.new("RGB", size, color).save(folder / f"img{i}.png")
    path = folder / "rows.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            k = rng.randrange(3)
            boxes = [[rng.randrange(10), rng.randrange(10), 5 + rng.randrange(20), 5 + rng.randrange(20)]
                     for _ in range(1 + rng.randrange(4))]
            row = {"id": f"s{i}", "image": f"img{k}.png", "bbox": boxes}
            if i % 97 == 0:
                row["image"] = "missing.png"  # an error row now and then
            fh.write(json.dumps(row) + "\n")
    return path


def lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


def start(args: List[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("REGIONCAP_FAILPOINT", None)
    return subprocess.Popen([sys.executable, "-m", "regioncap", *pinned(args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the kill takes every process


def kill_group(proc: subprocess.Popen) -> int:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)
    return proc.returncode


def captions(path: Path) -> Dict[str, dict]:
    records = list(read_jsonl(path))
    indexes = sorted(r["index"] for r in records)
    assert indexes == list(range(ROWS)), f"{path.name}: {len(records)} records, rows missing or twice"
    return {r["id"]: {"status": r["status"], "error": (r.get("error") or {}).get("kind"),
                      "captions": [g.get("caption") for g in r["regions"]]} for r in records}


@pytest.mark.slow
@pytest.mark.cli
def test_sigkilled_again_and_again_then_resumed_gives_the_uninterrupted_records(tmp_path):
    rows = make_rows(tmp_path, ROWS)
    args = ["engine=fake", "progress=false", "data=jsonl", f"data.path={rows}", "workers=1", "commit_every=16",
            "engine.batch_size=8", "max_error_rate=0.5"]
    reference = tmp_path / "reference"
    proc = start([*args, f"hydra.run.dir={reference}"], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

    rng = random.Random(int(os.environ.get("REGIONCAP_SOAK_SEED", "20261130")))
    out = tmp_path / "run"
    # Kill points by progress: one in the visualize file only, the rest in the captions file,
    # and one right at start-up (before anything is written).
    targets = [("startup", 0)] + [("visualize", rng.randrange(50, ROWS // 4))] + sorted(
        (("caption", rng.randrange(100, ROWS - 100)) for _ in range(rng.randint(2, 3))), key=lambda t: t[1])
    landed = []
    for what, at in targets:
        proc = start([*args, f"hydra.run.dir={out}", *(["resume=true"] if landed or out.exists() else [])], tmp_path)
        watched = out / ("visualize.jsonl" if what == "visualize" else "captions.jsonl")
        deadline = time.monotonic() + 300
        if what == "startup":
            time.sleep(rng.uniform(0.05, 0.5))
        else:
            while proc.poll() is None and lines(watched) < at and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.001, 0.01))
        finished = proc.poll() is not None
        code = kill_group(proc)
        if not finished:
            assert code == -signal.SIGKILL
            landed.append((what, at, lines(out / "visualize.jsonl"), lines(out / "captions.jsonl")))
    print("kills (stage watched, target, visualize lines, captions lines):", landed)
    assert len(landed) >= 3, landed

    for _ in range(3):  # resume until done (one is enough; a second would change nothing)
        proc = start([*args, f"hydra.run.dir={out}", "resume=true"], tmp_path)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        if lines(out / "captions.jsonl") >= ROWS:
            break
    assert captions(out / "visualize.jsonl").keys() == captions(reference / "visualize.jsonl").keys()
    assert captions(out / "captions.jsonl") == captions(reference / "captions.jsonl"), landed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == ROWS
