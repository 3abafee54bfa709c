"""W&B logging with a real wandb, offline: what a run leaves on disk, in a sweep, and when W&B fails.

wandb 0.31 writes no ``files/config.yaml`` or ``files/wandb-summary.json`` for
an offline run (wandb/wandb#9646): config, summary, history, artifacts and the
exit code live only in the run's transaction log ``run-<id>.wandb``, which
``wandb sync`` uploads. ``read_offline_run`` reads that log (LevelDB log
framing around ``wandb_internal_pb2.Record`` protobufs), so these tests assert
on exactly what would be uploaded. Media files (images, box metadata, tables)
are written under ``files/media/`` as usual.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from conftest import REPO, compose, run_cli
from regioncap import loggers
from regioncap.job import execute, tracking_group, tracking_name
from regioncap.records import read_jsonl

DEMO = REPO / "regioncap" / "demo" / "demo.jsonl"


@pytest.fixture(autouse=True)
def wandb_dirs(tmp_path_factory, monkeypatch):
    """Keep wandb's staging, cache and settings dirs out of the home dir; never reach a server."""
    base = tmp_path_factory.getbasetemp() / "wandb-home"
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        (base / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(base / sub))
    monkeypatch.setenv("NETRC", str(base / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return base


# ----------------------------------------------------------- offline run reader


def _log_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, buf = 7, 32768, b""  # 7-byte file header, then 32 KiB blocks of chunks
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            return
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            yield pb.Record.FromString(chunk)
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            yield pb.Record.FromString(buf + chunk)


def _set(tree: Dict[str, Any], path: List[str], value: Any) -> None:
    """W&B sends nested values (an image's ``path``, ``width``...) leaf by leaf."""
    for key in path[:-1]:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[path[-1]] = value


def read_offline_run(run_dir: Path, wait_s: float = 30.0, sync_dir: Path | None = None) -> Dict[str, Any]:
    """The one offline W&B run under ``run_dir/wandb/`` (or the run folder ``sync_dir``, as a
    sweep keeps them: ``SWEEP_DIR/wandb/offline-run-*``): run record, config, summary, artifacts, exit.

    ``run.finish()`` returns once wandb-core has the exit record, but core writes
    the transaction log on its own schedule: the file can lack its last records
    for a moment after ``finish`` (seen under load). Wait for the exit record.
    """
    deadline = time.monotonic() + wait_s
    while True:
        run = _read_offline_run(run_dir, sync_dir)
        if run["exit_code"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.05)


def _read_offline_run(run_dir: Path, sync_dir: Path | None = None) -> Dict[str, Any]:
    if sync_dir is None:
        (sync_dir,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    (log_file,) = sync_dir.glob("run-*.wandb")
    out: Dict[str, Any] = {"dir": sync_dir, "files": sync_dir / "files", "config": {}, "summary": {},
                           "history": [], "artifacts": [], "exit_code": None}
    for rec in _log_records(log_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "summary":
            for u in rec.summary.update:
                _set(out["summary"], list(u.nested_key) or [u.key], json.loads(u.value_json))
        elif kind == "history":
            row: Dict[str, Any] = {}
            for i in rec.history.item:
                _set(row, list(i.nested_key) or [i.key], json.loads(i.value_json))
            out["history"].append(row)
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def _artifact(run: Dict[str, Any], type_: str):
    (art,) = [a for a in run["artifacts"] if a.type == type_]
    return art, {c.path: c for c in art.manifest.contents}


# ------------------------------------------------------------------ in process


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_offline_run_records_config_metrics_images_table_and_artifact(tmp_path):
    out = tmp_path / "run"
    cfg = compose(["engine=fake", "progress=false", "logger=wandb", "logger.mode=offline", "max_boxes=3",
                   "logger.log_images=4", "logger.table_rows=10", "data.references_key=objects",
                   "logger.tags=[demo]"], output_dir=out)
    t0 = time.monotonic()
    metrics = execute(cfg)
    elapsed = time.monotonic() - t0
    records = list(read_jsonl(out / "captions.jsonl"))
    run = read_offline_run(out)

    # The composed config, resolved; name, group and job type.
    assert run["config"]["max_boxes"] == 3 and run["config"]["model"]["name"] == "tiny"
    assert run["config"]["logger"]["mode"] == "offline" and run["config"]["output_dir"] == str(out)
    assert run["run"].display_name == "run" and run["run"].run_group == "" and run["run"].job_type == "caption"
    assert list(run["run"].tags) == ["demo"] and run["run"].project == "regioncap"

    # metrics.json's numeric scalars, flattened, in the summary and in the one history row.
    summary = run["summary"]
    for key in ("rows", "regions_captioned", "error_rate", "error_rows", "requests"):
        assert summary[key] == metrics[key], key
    assert summary["stages/caption/seconds"] == metrics["stages"]["caption"]["seconds"]
    assert summary["stages/visualize/rows"] == 5
    # Progress while the run goes (one row per commit of each stage), then the run's metrics once.
    *progress, history = run["history"]
    assert progress and all(any(k.startswith("progress/") for k in row) for row in progress)
    assert history["regions_captioned"] == 18

    # Sample images: the first 4 requests, each with its regions as pixel boxes at its own size.
    files = run["files"]
    requests = [(rec, spec) for rec in records for spec in rec["requests"]][:4]
    for i, (rec, spec) in enumerate(requests):
        ref = summary[f"samples/{i:02d}"]
        assert ref["_type"] == "image-file" and (files / ref["path"]).is_file()
        assert [ref["width"], ref["height"]] == spec["image_size"]
        assert ref["caption"].startswith(spec["key"])
        boxes = json.loads((files / ref["boxes"]["regions"]["path"]).read_text())
        regions = [r for r in rec["regions"] if r["id"] in spec["region_ids"]]
        assert len(boxes["box_data"]) == len(regions)
        for box, reg in zip(boxes["box_data"], regions):
            assert box["domain"] == "pixel" and box["class_id"] == reg["number"]
            p = box["position"]
            assert [p["minX"], p["minY"], p["maxX"], p["maxY"]] == reg["input_bbox"]
            assert box["box_caption"] == f"{reg['number']}: {reg['caption']}"[:80]
        assert {int(k) for k in boxes["class_labels"]} == {r["number"] for r in regions}
    assert len(list((files / "media" / "images" / "samples").glob("*.jpg"))) == 4

    # The region table, capped at table_rows; thumbnails travel in its run_table artifact.
    assert summary["regions"] == 18  # the metric; the table has its own key
    ref = summary["region_table"]
    assert ref["_type"] == "table-file" and ref["nrows"] == 10
    table = json.loads((files / ref["path"]).read_text())
    regions = [(rec, reg) for rec in records for reg in rec["regions"]][:10]
    col = {c: i for i, c in enumerate(table["columns"])}
    assert [row[col["caption"]] for row in table["data"]] == [reg["caption"] for _, reg in regions]
    assert [row[col["row_id"]] for row in table["data"]] == [rec["id"] for rec, _ in regions]
    assert [row[col["reference"]] for row in table["data"]] == [rec["objects"][reg["source_index"]]
                                                                for rec, reg in regions]
    assert [json.loads(row[col["input_bbox"]]) for row in table["data"]] == [reg["input_bbox"] for _, reg in regions]
    assert not any(row[col["missing"]] for row in table["data"])
    # Per-region reference scores (pycocoevalcap), scored among the table's rows.
    for name in ("bleu4", "rouge_l", "cider"):
        assert all(isinstance(row[col[f"score/{name}"]], float) for row in table["data"]), name
    _, contents = _artifact(run, "run_table")
    assert "region_table.table.json" in contents
    assert sum(p.startswith("media/images/") for p in contents) >= 1
    # The thumbnails are files of the run dir, one per table row, and W&B's copies for the table's
    # artifact are staged in the W&B run's own folder (what `wandb sync` reads), not in the home dir.
    assert len(list((out / "thumbnails").glob("*.jpg"))) == 10
    staged = [Path(c.local_path) for c in contents.values()]
    assert all(p.is_file() and run["dir"] in p.parents for p in staged), staged

    # The records as a dataset artifact: offline, its manifest points at the files in the run dir
    # (immutable: no copy in wandb's staging dir), which `wandb sync` uploads.
    art, contents = _artifact(run, "dataset")
    assert art.name.startswith("captions-") and set(contents) == {"captions.jsonl", "metrics.json"}
    assert Path(contents["captions.jsonl"].local_path) == out / "captions.jsonl"
    assert Path(contents["metrics.json"].local_path) == out / "metrics.json"
    assert contents["captions.jsonl"].size == (out / "captions.jsonl").stat().st_size
    assert json.loads(art.metadata)["regions_captioned"] == 18

    assert run["exit_code"] == 0
    assert elapsed < 60


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_crop_strategy_images_are_logged_without_boxes(tmp_path):
    out = tmp_path / "run"
    cfg = compose(["engine=fake", "progress=false", "logger=wandb", "prompt=crop", "logger.log_images=2",
                   "logger.log_table=false", "logger.log_artifact=false", "data.limit=1"], output_dir=out)
    execute(cfg)
    run = read_offline_run(out)
    ref = run["summary"]["samples/00"]
    assert "boxes" not in ref and (run["files"] / ref["path"]).is_file()
    assert "region_table" not in run["summary"] and not [a for a in run["artifacts"] if a.type == "dataset"]


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_missing_regions_are_flagged_in_boxes_and_table(tmp_path):
    out = tmp_path / "run"
    cfg = compose(["engine=fake", "progress=false", "logger=wandb", "engine.skip_regions=[2]",
                   "engine.answer_on_reask=false", "data.limit=1", "logger.log_images=1", "max_error_rate=1"],
                  output_dir=out)
    execute(cfg)
    run = read_offline_run(out)
    boxes = json.loads((run["files"] / run["summary"]["samples/00"]["boxes"]["regions"]["path"]).read_text())
    labels = {b["class_id"]: b["box_caption"] for b in boxes["box_data"]}
    assert labels[2] == "2: (missing: not_in_answer)" and labels[1].startswith("1: fake caption")
    table = json.loads((run["files"] / run["summary"]["region_table"]["path"]).read_text())
    col = {c: i for i, c in enumerate(table["columns"])}
    assert [row[col["missing"]] for row in table["data"]] == [row[col["number"]] == 2 for row in table["data"]]


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_logger_failure_warns_once_and_the_run_goes_on(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = compose(["engine=fake", "progress=false", "logger=wandb", "logger.mode=no-such-mode"], output_dir=out)
    with caplog.at_level(logging.WARNING, logger="regioncap"):
        metrics = execute(cfg)
    warnings = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert len(warnings) == 1 and "the run goes on without it" in warnings[0], warnings
    assert metrics["regions_captioned"] == 18 and (out / "captions.jsonl").is_file()


def test_logger_none_writes_no_wandb_dir(tmp_path):
    out = tmp_path / "run"
    execute(compose(["engine=fake", "progress=false", "logger=none"], output_dir=out))
    assert (out / "captions.jsonl").is_file() and not (out / "wandb").exists()


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_failed_job_still_finishes_its_run_with_a_nonzero_exit_code(tmp_path):
    from regioncap.run import RunError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.jpg", "bbox": [[1, 1, 5, 5]]}\n')
    out = tmp_path / "run"
    cfg = compose(["engine=fake", "progress=false", "logger=wandb", "data=jsonl", f"data.path={bad}"],
                  output_dir=out)
    with pytest.raises(RunError):
        execute(cfg)
    run = read_offline_run(out)
    assert run["exit_code"] == 1 and run["summary"]["error_rows"] == 1
    import wandb

    assert wandb.run is None  # nothing left open for the next job


# ------------------------------------------------------------------ pure parts


def test_flatten_metrics_keeps_numeric_scalars():
    flat = loggers.flatten_metrics({"rows": 5, "ok": True, "rate": None, "name": "x",
                                    "stages": {"caption": {"seconds": 1.5, "errors": {"engine_error": 2}}}})
    assert flat == {"rows": 5, "stages/caption/seconds": 1.5, "stages/caption/errors/engine_error": 2}


def test_mode_resolution(monkeypatch, wandb_dirs):
    assert loggers.resolve_mode("disabled") == "disabled"
    assert loggers.resolve_mode(None) == "offline"  # WANDB_MODE=offline (fixture)
    monkeypatch.delenv("WANDB_MODE")
    assert loggers.resolve_mode(None) == "offline"  # no key anywhere
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert loggers.resolve_mode(None) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = wandb_dirs / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'y' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert loggers.api_key_configured() and loggers.resolve_mode(None) == "online"


def test_name_and_group_outside_hydra(tmp_path):
    cfg = compose(["logger=wandb"], output_dir=tmp_path / "run")
    assert tracking_name(cfg, tmp_path / "run") == "run" and tracking_group(cfg) is None
    cfg = compose(["logger=wandb", "logger.group=ablation"], output_dir=tmp_path / "run")
    assert tracking_group(cfg) == "ablation"
    assert loggers.build_logger(compose([]).logger).__class__ is loggers.NoneLogger


def test_tracker_config_and_name_mask_secrets(tmp_path, monkeypatch):
    from regioncap import job

    cfg = compose(["engine=vllm", "+engine.extra_args.hf_token=hf_abc123"], output_dir=tmp_path / "run")
    sent = job.config_dict(cfg)
    assert sent["engine"]["extra_args"]["hf_token"] != "hf_abc123" and sent["output_dir"] == str(tmp_path / "run")
    monkeypatch.setattr(job, "job_overrides", lambda: [
        "max_boxes=2", "+engine.extra_args.hf_token=hf_abc123", "data.path=/data/set/rows.jsonl",
        "logger=wandb", "logger.mode=offline", "progress=false"])
    name = tracking_name(cfg, tmp_path / "run")
    assert "hf_abc123" not in name and "logger" not in name and "progress" not in name
    assert name.startswith("+engine.extra_args.hf_token=") and "data.path=rows.jsonl" in name and "max_boxes=2" in name


# ------------------------------------------------------------ real subprocesses


def test_multirun_gives_each_job_its_own_finished_run(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.jpg", "bbox": [[1, 1, 5, 5]]}\n')
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "engine=fake", "logger=wandb", "logger.mode=offline", "progress=false", "data=jsonl",
                    f"data.path={bad},{DEMO}", "max_boxes=2,10", "max_error_rate=0", "logger.log_table=false",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode != 0  # the failed jobs are reported...
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    assert len(jobs) == 4, proc.stderr[-3000:]
    # The sweep's offline runs are kept together (SWEEP_DIR/wandb/), one per job.
    runs = [read_offline_run(sweep, sync_dir=d) for d in sorted((sweep / "wandb").glob("offline-run-*"))]
    by_dir = {r["config"]["output_dir"]: r for r in runs}
    assert len(runs) == 4 and not list(jobs[0].glob("wandb"))
    names, run_ids = set(), set()
    for job in jobs:
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        run = by_dir[str(job)]
        failed = "bad.jsonl" in overrides
        max_boxes = 2 if "max_boxes=2\n" in overrides else 10
        assert run["run"].run_group == "sweep"
        assert run["config"]["max_boxes"] == max_boxes
        # Named by the swept overrides only, not by the ones every job shares.
        assert run["run"].display_name == f"data.path={'bad.jsonl' if failed else 'demo.jsonl'},max_boxes={max_boxes}"
        assert run["exit_code"] == (1 if failed else 0), (job, run["exit_code"])
        if not failed:  # ...after the jobs that follow them ran
            assert run["summary"]["regions_captioned"] == 18
            assert len(list(read_jsonl(job / "captions.jsonl"))) == 5
        names.add(run["run"].display_name)
        run_ids.add(run["run"].run_id)
    assert len(names) == 4 and len(run_ids) == 4
    # The log names one command for the whole sweep; the real wandb CLI finds the 4 runs with it,
    # and with no argument from the sweep dir.
    assert f"upload every run of the sweep with `wandb sync {sweep / 'wandb'}`" in proc.stdout + proc.stderr
    import os
    import subprocess
    import sys

    for args, cwd in (([str(sweep / "wandb")], tmp_path), ([], sweep)):
        out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", *args], cwd=cwd,
                             capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
        assert out.returncode == 0 and "Would sync 4 run(s)" in out.stdout + out.stderr, out.stdout + out.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_warns_and_the_run_completes_in_seconds(tmp_path):
    out = tmp_path / "run"
    # WANDB_MODE stays "offline" (conftest): logger.mode=online must win over it.
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}"}
    t0 = time.monotonic()
    proc = run_cli(["engine=fake", "progress=false", "logger=wandb", "logger.mode=online",
                    "logger.init_timeout_s=2", f"hydra.run.dir={out}"], env=env, cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "W&B start failed, the run goes on without it" in log, log[-3000:]
    assert "W&B start failed" in (out / "regioncap.log").read_text()
    assert len(list(read_jsonl(out / "captions.jsonl"))) == 5 and (out / "metrics.json").is_file()
    # Process start and imports take a few seconds; W&B may cost init_timeout_s, not minutes.
    assert elapsed < 45, elapsed


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_progress_is_logged_as_the_run_goes(tmp_path):
    """log_progress (called after each commit) lands in the offline run's history with its own clock."""
    out = tmp_path / "run"
    tracker = loggers.build_logger(compose(["logger=wandb", "logger.mode=offline"]).logger)
    tracker.start(config={"a": 1}, run_dir=out, name="progress", group=None)
    for i in range(1, 4):
        tracker.log_progress("caption", rows=8 * i, regions=20 * i, errors=i - 1, seconds=2.0 * i)
    tracker.log_progress("visualize", rows=5, regions=18, errors=0, seconds=0.0)
    tracker.finish(0)
    run = read_offline_run(out)
    def stage(name):
        p = f"progress/{name}/"
        return [{k[len(p):]: v for k, v in h.items() if k.startswith(p)} for h in run["history"] if p + "rows" in h]

    caption = stage("caption")
    assert [(p["rows"], p["regions"], p["errors"], p["seconds"]) for p in caption] == [
        (8, 20, 0, 2.0), (16, 40, 1, 4.0), (24, 60, 2, 6.0)]
    assert all(p["regions_per_s"] == 10.0 and p["rows_per_s"] == 4.0 for p in caption)
    (vis,) = stage("visualize")
    assert vis["rows"] == 5 and vis["regions_per_s"] is None
    assert run["exit_code"] == 0


def test_log_progress_is_a_no_op_for_logger_none_and_after_finish(tmp_path):
    tracker = loggers.build_logger(compose(["logger=none"]).logger)
    tracker.log_progress("caption", rows=1, regions=1, errors=0, seconds=1.0)
    wb = loggers.build_logger(compose(["logger=wandb", "logger.mode=offline"]).logger)
    wb.log_progress("caption", rows=1, regions=1, errors=0, seconds=1.0)  # never started: nothing to log to
    assert not (tmp_path / "wandb").exists() and not wb._warned
