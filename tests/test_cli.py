"""The command line as a user runs it: real Hydra, real subprocesses, the offline default."""

from __future__ import annotations

import json
import time

import pytest

from conftest import REPO, run_cli
from regioncap.records import read_jsonl


@pytest.mark.slow
def test_offline_default_runs_end_to_end(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    proc = run_cli([f"hydra.run.dir={out}", f"model.path={tiny_model_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = list(read_jsonl(out / "captions.jsonl"))
    assert [r["id"] for r in records] == ["astronaut", "chelsea", "coffee", "rocket", "grace_hopper"]
    # Constrained decoding gives every region an answer line, even from random weights.
    for rec in records:
        assert rec["status"] == "ok", rec["error"]
        assert all(r["caption"] for r in rec["regions"])
        assert rec["tokens"]["prompt"] > 0 and rec["tokens"]["output"] > 0
        assert (out / rec["requests"][0]["image"]).is_file()
    for name in ("visualize.jsonl", "metrics.json", "regioncap.log", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["regions_captioned"] == 18 and metrics["error_rows"] == 0
    log = proc.stdout + proc.stderr
    assert "regions 18: captioned 18" in log and f"outputs: {out}" in log


@pytest.mark.slow
def test_default_model_is_built_into_the_cache_once(tmp_path):
    cache = tmp_path / "cache"
    env = {"REGIONCAP_CACHE": str(cache)}
    proc = run_cli([f"hydra.run.dir={tmp_path / 'a'}", "data.limit=1"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = cache / "tiny-qwen2.5-vl-v1"
    assert (built / "config.json").exists()
    stamp = (built / "config.json").stat().st_mtime_ns
    proc = run_cli([f"hydra.run.dir={tmp_path / 'b'}", "data.limit=1"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (built / "config.json").stat().st_mtime_ns == stamp


def test_missing_hub_model_fails_fast_with_a_fix(tmp_path):
    start = time.monotonic()
    proc = run_cli([f"hydra.run.dir={tmp_path / 'run'}", "model=qwen25vl_3b"], cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in err and "model.path=" in err and "model=tiny" in err
    # Fails before the visualize stage does any work.
    assert not (tmp_path / "run" / "visualize.jsonl").exists()
    assert elapsed < 60


def test_bad_value_fails_at_compose_time_with_hydra_message(tmp_path):
    proc = run_cli([f"hydra.run.dir={tmp_path / 'run'}", "max_boxes=ten"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "max_boxes" in proc.stderr and "ten" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_real_hydra_multirun_sweeps_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "engine=fake", "max_boxes=2,10", "prompt=marked,coords", f"hydra.sweep.dir={sweep}",
                    "progress=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        records = list(read_jsonl(job / "captions.jsonl"))
        assert sum(len(r["regions"]) for r in records) == 18
        max_boxes = 2 if "max_boxes=2" in overrides else 10
        astro = records[0]
        strategy = "coords" if "prompt=coords" in overrides else "marked"
        assert len(astro["requests"]) == -(-5 // max_boxes)
        seen.add((max_boxes, strategy))
    assert seen == {(2, "marked"), (10, "marked"), (2, "coords"), (10, "coords")}
    # Every job leaves its manifest and report; the sweep gets a comparison report.
    for job in jobs:
        assert (job / "manifest.json").is_file() and (job / "report.html").is_file()
    assert "max_boxes" in (sweep / "report.html").read_text()


def test_one_failed_job_does_not_stop_the_sweep(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.jpg", "bbox": [[1, 1, 5, 5]]}\n')
    sweep = tmp_path / "sweep"
    good = REPO / "regioncap" / "demo" / "demo.jsonl"
    proc = run_cli(["-m", "engine=fake", "data=jsonl", f"data.path={bad},{good}", f"hydra.sweep.dir={sweep}",
                    "progress=false"], cwd=tmp_path)
    assert proc.returncode != 0  # the sweep reports the failure...
    assert len(list(read_jsonl(sweep / "1" / "captions.jsonl"))) == 5  # ...after running the next job


def test_data_file_with_relative_images_from_another_cwd(tmp_path):
    from PIL import Image

    data_dir = tmp_path / "data" / "imgs"
    data_dir.mkdir(parents=True)
    Image.new("RGB", (300, 200), (90, 30, 160)).save(data_dir / "x.jpg")
    rows = tmp_path / "data" / "rows.jsonl"
    rows.write_text(json.dumps({"image": "imgs/x.jpg", "bbox": [[10, 10, 100, 50]], "tag": "t"}) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli(["engine=fake", "data=jsonl", "data.path=../data/rows.jsonl", "data.bbox_format=xywh",
                    f"hydra.run.dir={tmp_path / 'run'}", "progress=false"], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = read_jsonl(tmp_path / "run" / "captions.jsonl")
    assert rec["status"] == "ok" and rec["tag"] == "t"


def test_missing_data_file_is_a_one_line_error(tmp_path):
    proc = run_cli(["engine=fake", "data=jsonl", f"data.path={tmp_path / 'nope.jsonl'}",
                    f"hydra.run.dir={tmp_path / 'run'}", "progress=false"], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert f"data file {tmp_path / 'nope.jsonl'} does not exist" in out
    assert "Traceback" not in out
