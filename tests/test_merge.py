"""Sharded runs (data.num_shards / data.shard_index) and ``regioncap.merge``: the
shards together hold every row of the unsharded run exactly once, and the merge
refuses duplicated, missing or differently configured shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose, run_cli
from regioncap.data import DataError, iter_rows
from regioncap.job import execute
from regioncap.merge import MergeRefused, merge
from regioncap.records import read_jsonl
from regioncap.run import run_key_values
from test_pipeline import make_image, write_rows

#: Fields that name the run dir (or time the run) and so differ between a shard and the unsharded run.
RUN_DIR_FIELDS = ("result_file", "image_with_bbox", "timing")


@pytest.fixture
def rows7(tmp_path: Path) -> Path:
    img = make_image(tmp_path / "a.png", size=(320, 240))
    rows = [{"image": str(img), "bbox": [[10 + 20 * k, 10, 30, 30] for k in range(1 + i % 3)]} for i in range(7)]
    rows[2]["id"] = "two"
    return write_rows(tmp_path / "rows.jsonl", rows)


def run_shard(tmp_path: Path, data: Path, name: str, overrides=()) -> Path:
    out = tmp_path / name
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}", *overrides], output_dir=out)
    execute(cfg)
    return out


def shards3(tmp_path: Path, data: Path, extra=()) -> list:
    return [run_shard(tmp_path, data, f"shard{i}", ["data.num_shards=3", f"data.shard_index={i}", *extra])
            for i in range(3)]


def comparable(rec: dict) -> dict:
    rec = {k: v for k, v in rec.items() if k not in RUN_DIR_FIELDS}
    rec["requests"] = [{k: v for k, v in r.items() if k not in ("image", "latency_s")} for r in rec["requests"]]
    return rec


def test_iter_rows_shards_split_the_unsharded_rows_keeping_their_indexes(rows7):
    def rows(**data):
        cfg = compose(["data=jsonl", f"data.path={rows7}", *(f"data.{k}={v}" for k, v in data.items())])
        return [(r.index, r.row_id) for r in iter_rows(cfg.data)]

    whole = rows()
    assert rows(num_shards=1, shard_index=0) == whole
    parts = [rows(num_shards=3, shard_index=k) for k in range(3)]
    assert [i for i, _ in parts[1]] == [1, 4]
    assert sorted(sum(parts, [])) == whole
    # skip/limit pick the rows first; shards split those, with the same indexes.
    picked = rows(skip=1, limit=5)
    assert sorted(rows(skip=1, limit=5, num_shards=2, shard_index=0) + rows(skip=1, limit=5, num_shards=2,
                                                                            shard_index=1)) == picked
    for bad in (dict(num_shards=0), dict(num_shards=2, shard_index=2), dict(num_shards=2, shard_index=-1)):
        with pytest.raises(DataError, match="data.num_shards|data.shard_index"):
            rows(**bad)


def test_run_key_names_shards_only_when_sharded():
    assert "num_shards" not in run_key_values(compose(["engine=fake"]))["data"]
    key = run_key_values(compose(["engine=fake", "data.num_shards=3", "data.shard_index=1"]))["data"]
    assert (key["num_shards"], key["shard_index"]) == (3, 1)


def test_resume_with_another_shard_is_refused(tmp_path, rows7):
    out = run_shard(tmp_path, rows7, "s", ["data.num_shards=3", "data.shard_index=0"])
    assert [r["index"] for r in read_jsonl(out / "captions.jsonl")] == [0, 3, 6]
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={rows7}", "data.num_shards=3",
                   "data.shard_index=1", "resume=true"], output_dir=out)
    with pytest.raises(Exception, match="shard_index"):
        execute(cfg)
    # The same shard resumes (nothing left to do).
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={rows7}", "data.num_shards=3",
                   "data.shard_index=0", "resume=true"], output_dir=out)
    assert execute(cfg)["rows"] == 3


def test_three_shards_merge_to_the_unsharded_run(tmp_path, rows7):
    whole = run_shard(tmp_path, rows7, "whole")
    shards = shards3(tmp_path, rows7)
    summary = merge(tmp_path / "merged", shards)
    assert summary["status"] == "ok" and summary["rows"] == 7
    assert summary["expected"] == 7 and summary["expected_from"] == "manifest.json"
    merged = list(read_jsonl(tmp_path / "merged" / "captions.jsonl"))
    assert [r["index"] for r in merged] == list(range(7))
    expected = list(read_jsonl(whole / "captions.jsonl"))
    assert [comparable(r) for r in merged] == [comparable(r) for r in expected]
    assert merged[2]["id"] == "two" and merged[2]["regions"][0]["caption"].startswith("fake caption of region 1")
    # Image paths point into the merged dir, which holds the shards' images.
    for rec in merged:
        assert Path(rec["result_file"]) == (tmp_path / "merged").absolute()
        assert Path(rec["image_with_bbox"]) == Path(rec["result_file"]) / rec["requests"][0]["image"]
        assert all((tmp_path / "merged" / q["image"]).is_file() for q in rec["requests"])
    written = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert written["missing"] == [] and written["duplicates"] == [] and len(written["shards"]) == 3
    # The visualize stage merges the same way.
    assert merge(tmp_path / "vis", shards, stage="visualize")["rows"] == 7
    # An existing merged file is never overwritten.
    with pytest.raises(MergeRefused, match="already exists"):
        merge(tmp_path / "merged", shards)


def test_merge_refuses_duplicated_missing_and_mismatched_shards(tmp_path, rows7):
    shards = shards3(tmp_path, rows7)
    with pytest.raises(MergeRefused) as exc:
        merge(tmp_path / "dup", [*shards, shards[1]])
    assert "index 1 in" in str(exc.value) and str(shards[1]) in str(exc.value)
    summary = json.loads((tmp_path / "dup" / "merge.json").read_text())
    assert summary["status"] == "refused" and summary["duplicates"][0]["index"] == 1
    assert not (tmp_path / "dup" / "captions.jsonl").exists()

    with pytest.raises(MergeRefused, match=r"2 of 7 row\(s\) are in no shard: indexes 1, 4"):
        merge(tmp_path / "missing", [shards[0], shards[2]], expect=7)
    assert json.loads((tmp_path / "missing" / "merge.json").read_text())["missing"] == [1, 4]

    other = run_shard(tmp_path, rows7, "other", ["data.num_shards=3", "data.shard_index=1", "max_boxes=2"])
    with pytest.raises(MergeRefused, match=r"max_boxes: 10 -> 2"):
        merge(tmp_path / "mixed", [shards[0], other, shards[2]])
    assert merge(tmp_path / "forced", [shards[0], other, shards[2]], force=True)["rows"] == 7


def test_unsorted_shard_is_sorted_in_memory(tmp_path, rows7):
    shards = shards3(tmp_path, rows7)
    path = shards[0] / "captions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(reversed(lines)))
    merged = merge(tmp_path / "m", shards)
    assert not merged["shards"][0]["sorted"]
    assert [r["index"] for r in read_jsonl(tmp_path / "m" / "captions.jsonl")] == list(range(7))


def test_merge_cli(tmp_path, rows7):
    shards = shards3(tmp_path, rows7)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "regioncap.merge", *map(str, args)], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=120)

    proc = cli("--out", tmp_path / "m", *shards)
    assert proc.returncode == 0, proc.stderr
    assert "7 row(s) from 3 shard(s)" in proc.stdout
    proc = cli("--out", tmp_path / "m2", "--expect", "7", shards[0], shards[1])
    assert proc.returncode == 2 and "refused" in proc.stderr and "indexes 2, 5" in proc.stderr


def test_hydra_multirun_fans_out_shards(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "engine=fake", "data.num_shards=3", "data.shard_index=range(3)",
                    f"hydra.sweep.dir={sweep}", "progress=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 3
    summary = merge(tmp_path / "merged", jobs)
    assert summary["rows"] == 5 and summary["expected"] == 5
    records = list(read_jsonl(tmp_path / "merged" / "captions.jsonl"))
    assert [r["id"] for r in records] == ["astronaut", "chelsea", "coffee", "rocket", "grace_hopper"]
