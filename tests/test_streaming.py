"""Streaming and the preparation pool: the stages overlap without changing any output;
the mode that ran is reported; worker processes never outlive the run; images reach
the engine at the size the model's processor keeps unchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import REPO, compose
from regioncap.job import execute
from regioncap.metrics import format_summary
from regioncap.prepare import RowPool, available_cores, resolve_workers, start_fork_server
from regioncap.records import read_jsonl
from regioncap.run import RunError
from regioncap.stages.visualize import Visualizer

DEMO = REPO / "regioncap" / "demo"

#: Fields that hold the run dir or a time: everything else must be identical between modes.
_VOLATILE = ("result_file", "image_with_bbox", "timing", "latency_s")


def demo_rows(path: Path, n: int) -> Path:
    base = [json.loads(line) for line in (DEMO / "demo.jsonl").read_text().splitlines() if line.strip()]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            row = dict(base[i % len(base)], id=f"r{i}")
            row["image"] = str(DEMO / row["image"])
            if i % 7 == 3:  # an error row now and then: errors keep their place too
                row["image"] = str(DEMO / "missing.jpg")
            fh.write(json.dumps(row) + "\n")
    return path


def fake(out: Path, rows: Path, *extra: str):
    return compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={rows}", "engine.batch_size=3",
                    "commit_every=4", "max_boxes=2", "max_error_rate=0.5", *extra], output_dir=out)


def scrub(value):
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def records(path: Path) -> List[Dict]:
    return [scrub(r) for r in read_jsonl(path)]


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_overlapped_run_writes_what_the_sequential_run_writes(tmp_path):
    rows = demo_rows(tmp_path / "rows.jsonl", 23)
    runs = {"overlap": ["workers=2"], "sequential": ["overlap=false", "workers=2"], "main": ["workers=0"]}
    metrics = {name: execute(fake(tmp_path / name, rows, *extra)) for name, extra in runs.items()}
    assert metrics["overlap"]["pipeline"]["overlap"] is True and metrics["overlap"]["pipeline"]["workers"] == 2
    assert metrics["sequential"]["pipeline"] == {**metrics["sequential"]["pipeline"], "overlap": False,
                                                 "workers": 2, "reason": "overlap=false"}
    assert metrics["main"]["pipeline"]["overlap"] is False and metrics["main"]["pipeline"]["workers"] == 0
    for name in ("visualize.jsonl", "captions.jsonl"):
        want = records(tmp_path / "main" / name)
        assert [r["index"] for r in want] == list(range(23))  # input order
        assert sum(r["status"] == "error" for r in want) == 3
        for run in ("overlap", "sequential"):
            assert records(tmp_path / run / name) == want, (run, name)
    images = sorted(p.name for p in (tmp_path / "main" / "images").iterdir())
    assert any("_c01" in name for name in images)  # rows of more than max_boxes regions are chunked
    for run in ("overlap", "sequential"):
        assert sorted(p.name for p in (tmp_path / run / "images").iterdir()) == images
        for name in images:
            assert (tmp_path / run / "images" / name).read_bytes() == (tmp_path / "main" / "images" / name).read_bytes()
    for key in ("rows", "regions_captioned", "requests", "prompt_tokens", "output_tokens", "error_rows"):
        assert metrics["overlap"][key] == metrics["main"][key], key


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@pytest.mark.parametrize("extra,reason", [
    (["stages=[visualize]"], "only visualize stage requested"),
    (["engine.isolate=true"], "executor=isolated"),
    (["executor=isolated"], "executor=isolated"),
    (["workers=0"], "workers=0"),
])
def test_overlap_falls_back_and_says_why(tmp_path, extra, reason):
    metrics = execute(fake(tmp_path / "run", demo_rows(tmp_path / "rows.jsonl", 5), *extra))
    pipe = metrics["pipeline"]
    assert pipe["overlap"] is False and reason in pipe["reason"]
    assert pipe["seconds"] > 0 and pipe["images_per_s"] > 0


def test_summary_prints_throughput_per_stage_and_end_to_end(tmp_path):
    out = tmp_path / "run"
    metrics = execute(fake(out, demo_rows(tmp_path / "rows.jsonl", 6), "workers=1"))
    text = format_summary(metrics, max_error_rate=0.5, out_dir=str(out))
    lines = {line.split(":")[0]: line for line in text.splitlines()}
    for stage in ("visualize", "caption"):
        assert "images/s" in lines[stage] and "regions/s" in lines[stage]
    assert "end to end" in lines and "stages overlapped, 1 preparation worker" in lines["end to end"]
    assert "tokens:" in text and f"{metrics['prompt_tokens']} prompt" in text
    # Overlapped stages: the run's wall time is the stream's, not the sum of both stages.
    assert metrics["wall_s"] == pytest.approx(metrics["pipeline"]["seconds"], abs=1e-3)
    assert metrics["wall_s"] < metrics["stages"]["visualize"]["seconds"] + metrics["stages"]["caption"]["seconds"]


def test_overlapped_run_resumes_after_a_stop(tmp_path):
    """A stop in the middle of the stream, then resume: every row once, in both files."""
    from conftest import run_cli

    rows, out = demo_rows(tmp_path / "rows.jsonl", 20), tmp_path / "run"
    args = ["engine=fake", "progress=false", "data=jsonl", f"data.path={rows}", "engine.batch_size=2",
            "commit_every=3", "workers=1", "max_error_rate=0.5", f"hydra.run.dir={out}"]
    proc = run_cli(args, env={"REGIONCAP_FAILPOINT": "caption.after_commit:2:sigterm"}, cwd=tmp_path)
    assert proc.returncode == 143, proc.stderr[-3000:]
    vis_before = [r["index"] for r in read_jsonl(out / "visualize.jsonl")]
    cap_before = [r["index"] for r in read_jsonl(out / "captions.jsonl")]
    assert set(cap_before) <= set(vis_before) and len(vis_before) < 20
    proc = run_cli([*args, "resume=true"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("visualize.jsonl", "captions.jsonl"):
        assert sorted(r["index"] for r in read_jsonl(out / name)) == list(range(20)), name
    assert [r["index"] for r in read_jsonl(out / "visualize.jsonl")][: len(vis_before)] == vis_before
    assert json.loads((out / "metrics.json").read_text())["pipeline"]["overlap"] is True


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_default_workers_leave_the_engine_its_cores(tmp_path):
    cores = available_cores()
    base = ["engine=fake", f"data.path={DEMO / 'demo.jsonl'}"]
    assert resolve_workers(compose(base)) == (max(1, cores - 1) if cores > 1 else 0)
    # The CPU transformers engine uses every core for torch's threads: one preparation worker beside it.
    assert resolve_workers(compose(["engine=transformers", "engine.device=cpu"])) == (1 if cores > 1 else 0)
    assert resolve_workers(compose(["engine=transformers", "engine.device=cuda"])) == max(1, cores - 1) * (cores > 1)
    assert resolve_workers(compose(["engine=fake", "stages=[caption]"])) == 0  # nothing to prepare
    assert resolve_workers(compose(["engine=fake", "workers=3"])) == 3
    with pytest.raises(RunError, match="workers must be 0"):
        resolve_workers(compose(["engine=fake", "workers=-1"]))


def test_the_fork_server_starts_with_the_job_only_for_a_run_with_workers(tmp_path, monkeypatch):
    """Started early it loads the preparation modules while the job sets up; never for no workers,
    and never with the caller's main module (a script would run again in it)."""
    from multiprocessing import forkserver

    started = []
    monkeypatch.setattr(forkserver, "ensure_running", lambda: started.append(sys.modules["__main__"]))
    import dataclasses

    from regioncap.settings import typed_config

    cfg = typed_config(fake(tmp_path / "run", demo_rows(tmp_path / "rows.jsonl", 2), "workers=1"))
    start_fork_server(dataclasses.replace(cfg, workers=0))
    start_fork_server(dataclasses.replace(cfg, workers=-1))  # wrong: refused later, where workers start
    assert started == []
    start_fork_server(cfg)
    assert len(started) == 1 and not hasattr(started[0], "__file__")
    assert sys.modules["__main__"] is not started[0]
    # A process whose default start method is another one still gets its workers from the
    # fork server (the pool asks for it by name), so it is started early there too.
    import multiprocessing as mp

    monkeypatch.setattr(mp, "get_start_method", lambda allow_none=False: "spawn")
    start_fork_server(cfg)
    assert len(started) == 2


def test_a_huge_workers_value_starts_at_most_four_per_cpu(caplog):
    """workers=10000 started ten thousand processes (a minute before the first row)."""
    cap = 4 * available_cores()
    with caplog.at_level("WARNING", logger="regioncap"):
        assert resolve_workers(compose(["engine=fake", "workers=10000"])) == cap
    assert "workers=10000 is more than 4 per usable CPU" in caplog.text
    assert resolve_workers(compose(["engine=fake", f"workers={cap}"])) == cap


_KILLED_PARENT = """
import os, sys, time
sys.path.insert(0, {tests!r})
from conftest import compose
from regioncap.prepare import RowPool
from regioncap.data import InputRow

cfg = compose(["engine=fake"], output_dir={out!r})
with RowPool(cfg, 2, None) as pool:
    rows = (InputRow(index=i, row_id=str(i), image_path={image!r}) for i in range(4))
    assert len(list(pool.map(rows))) == 4
    print(" ".join(str(p) for p in pool._executor._processes), flush=True)
    time.sleep(60)
"""


def test_workers_exit_when_the_run_is_killed(tmp_path):
    """A SIGKILL (OOM killer, lost node) gives the workers no signal: they notice and exit."""
    code = _KILLED_PARENT.format(tests=str(REPO / "tests"), out=str(tmp_path), image=str(DEMO / "images" / "rocket.jpg"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if _alive(p)]
    assert not alive, f"worker processes {alive} outlived their run"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_pool_keeps_input_order_with_a_small_window(tmp_path):
    cfg = fake(tmp_path / "run", demo_rows(tmp_path / "rows.jsonl", 9), "workers=2")
    stage = Visualizer(cfg)
    (tmp_path / "run" / "images").mkdir(parents=True)
    from regioncap.data import iter_rows

    with RowPool(cfg, 2, stage.process_row, window=2) as pool:
        got = [r["index"] for r in pool.map(iter_rows(cfg.data))]
    assert got == list(range(9))


@pytest.mark.slow  # starts worker processes: the slow tier
def test_pool_calls_its_first_wait_hook_once_before_the_first_record_and_never_without_rows(tmp_path):
    """The hook is where a streaming run starts its engine: while the workers start and prepare."""
    cfg = fake(tmp_path / "run", demo_rows(tmp_path / "rows.jsonl", 5), "workers=1")
    stage = Visualizer(cfg)
    (tmp_path / "run" / "images").mkdir(parents=True)
    from regioncap.data import iter_rows

    events = []
    with RowPool(cfg, 1, stage.process_row, window=2, on_first_wait=lambda: events.append("hook")) as pool:
        for rec in pool.map(iter_rows(cfg.data)):
            events.append(rec["index"])
        assert list(pool.map(iter(()))) == []
    assert events == ["hook", 0, 1, 2, 3, 4]
    with RowPool(cfg, 1, stage.process_row, on_first_wait=lambda: events.append("again")) as pool:
        assert list(pool.map(iter(()))) == []
    assert "again" not in events


# ------------------------------------------- images reach the engine at their final size


@pytest.mark.parametrize("model,extra", [
    ("qwen25vl_3b", []),
    ("qwen25vl_3b", ["prompt=crop"]),
    ("qwen2vl_2b", ["prompt=coords"]),
    ("tiny", []),
])
@pytest.mark.slow  # several seconds: the slow tier runs it (the unit tier stays under 2 min)
def test_prepared_images_pass_the_processor_unchanged(tmp_path, model, extra):
    """The image each request names is already at the size Qwen2-VL's processor (which vLLM
    runs too, with the same min/max pixels) resizes to: its resize is the identity, and the
    real image processor gives a grid of exactly the image's size."""
    import importlib.util

    from PIL import Image

    if importlib.util.find_spec("torchvision") is not None:
        from transformers import Qwen2VLImageProcessor
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    else:  # the CPU-only set-up: the PIL image processor (transformers 5)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as Qwen2VLImageProcessor, smart_resize)

    big = tmp_path / "big.jpg"
    Image.open(DEMO / "images" / "astronaut.jpg").convert("RGB").resize((3264, 2448)).save(big)  # 8 MP
    rows = tmp_path / "rows.jsonl"
    lines = [json.dumps({"id": "big", "image": str(big), "bbox": [[300, 400, 900, 700], [2000, 100, 600, 900]]})]
    lines += [json.dumps(dict(json.loads(line), image=str(DEMO / json.loads(line)["image"])))
              for line in (DEMO / "demo.jsonl").read_text().splitlines() if line.strip()]
    rows.write_text("\n".join(lines) + "\n")
    cfg = compose([f"model={model}", "engine=fake", "stages=[visualize]", "progress=false", "data=jsonl",
                   f"data.path={rows}", "workers=1", *extra], output_dir=tmp_path / "run")
    execute(cfg)
    m = cfg.model
    factor = int(m.patch_size) * int(m.merge_size)
    processor = Qwen2VLImageProcessor(patch_size=int(m.patch_size), merge_size=int(m.merge_size),
                                      size={"shortest_edge": int(m.min_pixels), "longest_edge": int(m.max_pixels)})
    checked = 0
    for rec in read_jsonl(tmp_path / "run" / "visualize.jsonl"):
        assert rec["status"] == "pending", rec.get("error")
        for spec in rec["requests"]:
            with Image.open(tmp_path / "run" / spec["image"]) as im:
                w, h = im.size
                pixels = im.convert("RGB")
            assert [w, h] == spec["image_size"]
            assert smart_resize(h, w, factor=factor, min_pixels=int(m.min_pixels),
                                max_pixels=int(m.max_pixels)) == (h, w)
            grid = processor(images=[pixels], return_tensors="pt")["image_grid_thw"][0].tolist()
            assert grid == [1, h // int(m.patch_size), w // int(m.patch_size)]
            checked += 1
    assert checked >= 6


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_engine_failure_in_a_stream_says_to_resume_both_stages(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # passes path resolution, fails to load
    out = tmp_path / "run"
    cfg = compose(["engine=transformers", "engine.device=cpu", "progress=false", "workers=1", "commit_every=2",
                   "engine.batch_size=1", f"model.path={broken}", "model.builder=null"], output_dir=out)
    with pytest.raises(RunError, match=r"could not start.*go on with both stages with resume=true") as info:
        execute(cfg)
    assert "stages=[caption]" not in str(info.value)
    # The engine starts as the first rows go to the worker (side by side with their preparation),
    # so it fails before any is committed; the resume prepares them again.
    assert (out / "visualize.jsonl").exists() and list(read_jsonl(out / "visualize.jsonl")) == []
