"""``executor=ray``: the caption stage over a real local Ray cluster (2 CPUs) gives the
same records as the local stage, every row exactly once and in input order, error rows
kept; resume skips done rows; the CLI runs it end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, compose, run_cli
from regioncap.job import execute
from regioncap.records import read_jsonl
from regioncap.run import RegionCapRun, RunError
from test_pipeline import make_image, write_rows

#: Fields that differ between two runs of the same rows (run dir, timings).
RUN_FIELDS = ("result_file", "image_with_bbox", "timing")
#: A small local cluster: this machine has 2 cores and other work on it.
SMALL = ["executor.local_num_cpus=2", "executor.object_store_mb=100"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    """23 rows: one to three boxes each, plus a missing image, a bad box and a row without boxes."""
    d = tmp_path_factory.mktemp("raydata")
    img = make_image(d / "a.png", size=(320, 240))
    out = [{"id": f"r{i}", "image": str(img), "bbox": [[10 + 30 * k, 20, 40, 40] for k in range(1 + i % 3)]}
           for i in range(20)]
    out.insert(5, {"id": "gone", "image": str(d / "missing.png"), "bbox": [[1, 1, 5, 5]]})
    out.insert(11, {"id": "badbox", "image": str(img), "bbox": "not a box"})
    out.insert(17, {"id": "nobox", "image": str(img), "bbox": []})
    return write_rows(d / "rows.jsonl", out)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster (2 CPUs, small object store) for the in-process tests of this module."""
    import ray

    ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def comparable(rec: dict) -> dict:
    rec = {k: v for k, v in rec.items() if k not in RUN_FIELDS}
    rec["requests"] = [{k: v for k, v in r.items() if k != "latency_s"} for r in rec["requests"]]
    return rec


def run_fake(out: Path, data: Path, overrides=()):
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}", "max_boxes=2",
                   "max_error_rate=1", "engine.fail_keys=[r7/]", *overrides], output_dir=out)
    return execute(cfg)


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_executor_group_composes_and_local_is_the_default(tmp_path):
    from regioncap.executors import executor_of
    from regioncap.executors.local import LocalExecutor

    assert executor_of(compose([]).executor) is LocalExecutor
    cfg = compose(["executor=ray", "executor.num_replicas=3", "executor.num_gpus=1"], output_dir=tmp_path)
    assert (cfg.executor.address, cfg.executor.num_replicas, cfg.executor.num_gpus) == (None, 3, 1.0)
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose(["executor=ray", "executor.replicas=2"])
    with pytest.raises(ConfigCompositionException):
        compose(["executor=local", "executor.num_replicas=2"])


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_cluster_shuts_down_with_the_collector_off(monkeypatch):
    """ray.shutdown() stops the core worker before it forgets it; a reference released in
    between by the cyclic collector makes Ray end the process with exit 1. The run's
    cluster collects first and keeps the collector off during the shutdown."""
    import gc

    import ray

    from regioncap.executors import ray_executor

    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "shutdown", lambda: seen.append(gc.isenabled()))
    # The typed section a job hands the executor (nothing below the job reads a DictConfig).
    cfg = ray_executor.RayExecutor.Config(address=None, local_num_cpus=1, local_num_gpus=None, object_store_mb=100)
    assert gc.isenabled()
    with ray_executor.ray_cluster(cfg):
        assert not seen
    assert seen == [False]
    assert gc.isenabled()


def test_ray_is_imported_only_when_picked():
    code = ("import sys; from regioncap.config import register_configs; import regioncap.run, regioncap.job; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@pytest.mark.slow  # starts a Ray cluster (seconds): not the unit tier
def test_fake_engine_two_replicas_same_records_as_local(tmp_path, rows, ray_cluster):
    local = run_fake(tmp_path / "local", rows)
    t0 = time.perf_counter()
    metrics = run_fake(tmp_path / "ray", rows, ["executor=ray", "executor.num_replicas=2", "executor.batch_size=3"])
    took = time.perf_counter() - t0
    got = list(read_jsonl(tmp_path / "ray" / "captions.jsonl"))
    want = list(read_jsonl(tmp_path / "local" / "captions.jsonl"))
    # Every input row exactly once, in input order, with the same fields and values as the local stage.
    assert [r["index"] for r in got] == list(range(23))
    assert [comparable(r) for r in got] == [comparable(r) for r in want]
    kinds = {r["id"]: (r["status"], (r["error"] or {}).get("kind")) for r in got}
    assert kinds["gone"][0] == "error" and kinds["badbox"][0] == "error" and kinds["nobox"][0] == "no_regions"
    assert kinds["r7"] == ("error", "engine_error")  # an engine error row (fail_keys) is kept
    assert metrics["rows"] == local["rows"] == 23 and metrics["error_rows"] == local["error_rows"]
    # Each replica that captioned sent its start-up back to the driver; its first call's rows are marked.
    startup = metrics["stages"]["caption"]["startup"]
    assert 1 <= startup["engines"] <= 2 and startup["engine_load_s"] >= 0 and startup["first_batch_s"] >= 0
    assert 1 <= sum(1 for r in got if r["timing"].get("first_batch")) <= 2 * 3
    assert startup["cluster_start_s"] >= 0 and startup["replicas_start_s"] > 0
    # The cluster had room for both replicas: both were up before the first batch went out, and both
    # captioned rows (the manifest says where each replica ran and what it did).
    replicas = json.loads((tmp_path / "ray" / "manifest.json").read_text())["engine"]["describe"]["replicas"]
    assert len({r["pid"] for r in replicas}) == 2 and all(r["rows"] > 0 and r["batches"] > 0 for r in replicas)
    assert sum(r["rows"] for r in replicas) == 23
    print(f"ray fake engine: 23 rows, 2 replicas, {took:.1f}s")


@pytest.mark.slow  # starts a Ray cluster (seconds): not the unit tier
def test_resume_sends_only_the_rows_not_done(tmp_path, rows, ray_cluster):
    out = tmp_path / "run"
    run_fake(out, rows, ["data.limit=9"])  # a local run of the first 9 rows
    first = (out / "captions.jsonl").read_text()
    run_fake(out, rows, ["executor=ray", "executor.num_replicas=2", "executor.batch_size=4", "resume=true"])
    got = list(read_jsonl(out / "captions.jsonl"))
    assert (out / "captions.jsonl").read_text().startswith(first)  # the done rows are left as they were
    assert [r["index"] for r in got] == list(range(23))
    assert len({r["id"] for r in got}) == 23


@pytest.mark.slow  # starts a Ray cluster (seconds): not the unit tier
def test_engine_that_cannot_start_names_the_cause(tmp_path, rows, ray_cluster):
    cfg = compose(["engine=transformers", "progress=false", "data=jsonl", f"data.path={rows}",
                   "executor=ray", "executor.num_replicas=1", "stages=[visualize]"], output_dir=tmp_path / "r")
    RegionCapRun(cfg).run()
    cfg.stages = ["caption"]
    run = RegionCapRun(cfg, model_path=str(tmp_path / "no-such-model"))
    try:
        with pytest.raises(RunError, match="could not start"):
            run.run()
    finally:
        run.close()


@pytest.mark.slow  # starts a Ray cluster (seconds): not the unit tier
def test_more_replicas_than_the_cluster_holds_is_refused(tmp_path, rows, ray_cluster):
    with pytest.raises(RunError, match="Ray cluster has 2"):
        run_fake(tmp_path / "r", rows, ["executor=ray", "executor.num_replicas=3"])


@pytest.mark.slow
def test_tiny_model_transformers_two_replicas_every_row_once(tmp_path, ray_cluster, tiny_model_dir):
    """The real engine in each replica: the offline tiny Qwen2.5-VL on the CPU."""
    out = tmp_path / "run"
    cfg = compose(["model=tiny", f"model.path={tiny_model_dir}", "engine=transformers", "engine.batch_size=2",
                   "sampling.max_tokens=8", "progress=false", "max_error_rate=1", "executor=ray",
                   "executor.num_replicas=2", "executor.batch_size=2"], output_dir=out)
    t0 = time.perf_counter()
    metrics = execute(cfg)
    took = time.perf_counter() - t0
    got = list(read_jsonl(out / "captions.jsonl"))
    vis = list(read_jsonl(out / "visualize.jsonl"))
    assert [r["index"] for r in got] == [r["index"] for r in vis] == list(range(len(vis)))
    assert [r["id"] for r in got] == [r["id"] for r in vis]
    captioned = [r for r in got if r["status"] in ("ok", "partial", "error") and r["requests"]]
    assert captioned and all(s.get("answer") is not None or s.get("error") for r in captioned
                             for s in r["requests"])
    assert metrics["rows"] == len(vis)
    print(f"ray tiny model: {len(vis)} rows, 2 replicas, {took:.1f}s")


@pytest.mark.slow
def test_cli_executor_ray_starts_and_stops_its_own_cluster(tmp_path, rows):
    out = tmp_path / "cli"
    t0 = time.perf_counter()
    res = run_cli(["executor=ray", "executor.num_replicas=2", "executor.batch_size=4", *SMALL, "engine=fake",
                   "data=jsonl", f"data.path={rows}", "max_error_rate=1", "progress=false",
                   f"hydra.run.dir={out}"], timeout=300)
    took = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    got = list(read_jsonl(out / "captions.jsonl"))
    assert [r["index"] for r in got] == list(range(23))
    assert json.loads((out / "metrics.json").read_text())["rows"] == 23
    assert "over Ray: 2 replica(s)" in (out / "regioncap.log").read_text()
    print(f"ray CLI: {took:.1f}s")


@pytest.mark.slow
def test_sigterm_stops_after_a_commit_and_resume_finishes_every_row_once(tmp_path, rows):
    """A scheduler's SIGTERM to the driver: it stops after the batch it is writing (exit 143),
    shuts its cluster down, and ``resume=true`` sends only the rows not yet written."""
    out = tmp_path / "run"
    args = ["executor=ray", "executor.num_replicas=2", "executor.batch_size=3", *SMALL, "engine=fake", "data=jsonl",
            f"data.path={rows}", "max_error_rate=1", "progress=false", f"hydra.run.dir={out}"]
    res = run_cli(args, env={"REGIONCAP_FAILPOINT": "caption.after_commit:2:sigterm"}, timeout=300)
    assert res.returncode == 143, res.stderr[-3000:]
    first = [r["index"] for r in read_jsonl(out / "captions.jsonl")]
    assert first == list(range(len(first))) and 0 < len(first) < 23
    res = run_cli([*args, "resume=true"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["index"] for r in read_jsonl(out / "captions.jsonl")] == list(range(23))
    assert f"skipped {len(first)} row(s) already done" in (out / "regioncap.log").read_text()


def test_an_address_nothing_answers_at_fails_at_once_naming_it():
    """``ray.init`` would retry such an address for minutes without a word."""
    import socket

    from regioncap.executors.ray_executor import _check_reachable

    with socket.socket() as s:  # a port that was just free: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RunError, match=rf"executor.address='127.0.0.1:{port}': nothing answers at 127.0.0.1:{port}"):
        _check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(RunError, match="nothing answers"):
        _check_reachable(f"ray://127.0.0.1:{port}", timeout_s=2)
    with socket.socket() as s:  # something listens: left to Ray
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        _check_reachable(f"127.0.0.1:{s.getsockname()[1]}", timeout_s=2)
    _check_reachable("auto")  # not host:port: Ray's own lookup
