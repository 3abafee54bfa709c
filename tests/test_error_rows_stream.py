"""Rows that need no engine (error rows, rows without regions) are committed as they stream by.

A run over a long stretch of such rows must not hold them until a row with
work arrives or the input ends: memory would grow with the data set (measured
in docs/reliability.md, "Memory with error rows"). The tests watch the
records files while the input is still being read: each stage's file must
already hold almost every row read so far.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from conftest import compose
from regioncap.job import execute
from regioncap.records import read_jsonl
from regioncap.stages.loop import grouped


def lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        return fh.read().count(b"\n")


def watched(source: Callable[..., Iterator[Any]], files: List[Path], seen: List[Tuple[int, List[int]]],
            every: int = 100) -> Callable[..., Iterator[Any]]:
    """``source`` that notes, every ``every`` items it hands out, how many lines each of ``files`` holds."""

    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for n, item in enumerate(source(*args, **kwargs)):
            if n % every == 0:
                seen.append((n, [lines(f) for f in files]))
            yield item

    return wrapper


def missing_image_rows(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i}", "image": f"nowhere/{i}.jpg", "bbox": [[1, 2, 30, 40]]}) + "\n")
    return path


def boxless_rows(tmp_path: Path, n: int) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 24), (200, 10, 10)).save(tmp_path / "tiny.png")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "image": "tiny.png", "bbox": []}) + "\n" for i in range(n)))
    return path


def cfg(out: Path, rows: Path, *extra: str):
    return compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={rows}", "max_error_rate=1",
                    "commit_every=32", "engine.batch_size=8", *extra], output_dir=out)


def test_grouped_caps_rows_that_need_no_engine():
    errors = [{"status": "error"}] * 100
    batches = list(grouped(iter(errors), max_requests=8, max_rows=32))
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    work = [{"status": "pending", "requests": [1, 2, 3]}] * 6
    assert [len(b) for b in grouped(iter(work), max_requests=8, max_rows=32)] == [3, 3]


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@pytest.mark.parametrize("kind,n", [("missing", 2000), ("boxless", 400)])
def test_caption_stage_commits_rows_without_work_while_it_reads(tmp_path, monkeypatch, kind, n):
    import regioncap.executors.local as local

    rows = missing_image_rows(tmp_path / "rows.jsonl", n) if kind == "missing" else boxless_rows(tmp_path, n)
    out = tmp_path / "run"
    seen: List[Tuple[int, List[int]]] = []
    monkeypatch.setattr(local, "read_jsonl", watched(local.read_jsonl, [out / "captions.jsonl"], seen, every=50))
    metrics = execute(cfg(out, rows, "workers=0"))
    assert metrics["rows"] == n
    assert len(list(read_jsonl(out / "captions.jsonl"))) == n
    status = "error" if kind == "missing" else "no_regions"
    assert all(r["status"] == status for r in read_jsonl(out / "captions.jsonl"))
    # When the caption stage has read k rows, captions.jsonl holds all but the batch in hand
    # (at most max(commit_every, batch_size) = 32 rows), not 0 until the end.
    assert len(seen) >= n // 50 - 1
    for k, (written,) in seen:
        assert written >= k - 32, (k, written)


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@pytest.mark.parametrize("workers", [0, 1])
def test_visualize_and_caption_commit_error_rows_while_the_input_is_read(tmp_path, monkeypatch, workers):
    import regioncap.run as run

    n = 1500
    rows, out = missing_image_rows(tmp_path / "rows.jsonl", n), tmp_path / "run"
    seen: List[Tuple[int, List[int]]] = []
    files = [out / "visualize.jsonl", out / "captions.jsonl"]
    monkeypatch.setattr(run, "iter_rows", watched(run.iter_rows, files, seen))
    execute(cfg(out, rows, f"workers={workers}"))
    assert [len(list(read_jsonl(f))) for f in files] == [n, n]
    # The preparation window (a few rows per worker, at least commit_every) plus a commit's rows.
    lag = 64 + 32
    for k, (vis, cap) in seen:
        assert vis >= k - lag, (k, vis)
        if workers:  # the stages stream into each other: captions grow while the input is read
            assert cap >= k - 2 * lag, (k, cap)
