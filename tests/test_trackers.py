"""logger=csv, logger=tensorboard, logger=mlflow and logger=many: what each records, read back with
the tool's own reader (the csv module, TensorBoard's EventAccumulator, MLflow's client on a store
the test makes), alone, several at once, and grouped in a sweep."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import compose, requires, run_cli
from regioncap import trackers
from regioncap.errors import RunError
from regioncap.job import execute
from regioncap.requirements import missing_requirements
from regioncap.settings import check_config


def _rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _events(events_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# ------------------------------------------------------------------ config


def test_many_types_each_trackers_settings_and_refuses_unknown_names():
    """(Every option composes and passes its checks: tests/test_config.py.)"""
    import copy

    composed = compose(["logger=many", "logger.use=[csv,mlflow]", "logger.mlflow.log_images=2"])
    cfg = copy.deepcopy(composed)
    check_config(cfg)
    assert list(cfg.logger.use) == ["csv", "mlflow"] and cfg.logger.mlflow.log_images == 2
    assert cfg.logger.mlflow._target_ == "regioncap.trackers.MlflowLogger"
    misspelt = copy.deepcopy(composed)
    misspelt.logger.use = ["csv", "tensorbord"]
    with pytest.raises(RunError, match=r"logger\.use must be a list of distinct names out of csv, tensorboard"):
        check_config(misspelt)
    negative = copy.deepcopy(composed)
    negative.logger.tensorboard.log_images = -1
    with pytest.raises(RunError, match=r"logger\.tensorboard\.log_images must be a whole number >= 0"):
        check_config(negative)


def test_many_names_the_extra_of_each_tracker_it_uses(monkeypatch):
    for name in ("mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)  # not importable: find_spec returns None
    problems = missing_requirements(compose(["engine=fake", "logger=many", "logger.use=[csv,mlflow,wandb]"]))
    assert problems == [
        'logger=many with mlflow needs mlflow, which is not installed: pip install "regioncap[trackers]"',
        'logger=many with wandb needs wandb, which is not installed: pip install "regioncap[wandb]"']
    assert missing_requirements(compose(["engine=fake", "logger=many", "logger.use=[csv]"])) == []


# ------------------------------------------------------------------ helpers


def test_flatten_config_gives_every_key_one_scalar():
    flat = trackers.flatten_config({"a": {"b": 1, "c": [1, 2], "d": {}}, "e": None, "f": "x"})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "a.d": "{}", "e": None, "f": "x"}


def test_tensorboard_dir_is_the_run_dirs_own_or_group_and_name_under_a_root(tmp_path):
    assert trackers.tensorboard_dir(None, tmp_path / "run", "g", "n") == tmp_path / "run" / "tensorboard"
    assert trackers.tensorboard_dir(str(tmp_path), tmp_path / "run", "g", "a=1,b=x/y") == tmp_path / "g" / "a=1,b=x_y"
    assert trackers.tensorboard_dir(str(tmp_path), tmp_path / "run", None, "n") == tmp_path / "n"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["0", "1", "2", "10"]),
                          st.dictionaries(st.sampled_from(["rows", "regions", "error_rate"]),
                                          st.integers(0, 99), max_size=3)), min_size=1, max_size=6))
def test_sweep_table_holds_each_jobs_last_row_in_job_order(tmp_path_factory, jobs):
    table = tmp_path_factory.mktemp("sweep") / "metrics.csv"
    for job, metrics in jobs:
        trackers.add_sweep_row(table, {"job": job, **metrics})
    last = {job: metrics for job, metrics in jobs}
    rows = _rows(table)
    assert [r["job"] for r in rows] == sorted(last, key=int)
    for row in rows:
        assert {k: v for k, v in row.items() if v != "" and k != "job"} == {k: str(v) for k, v in last[row["job"]].items()}


# ------------------------------------------------------------------ in-process runs


@pytest.mark.slow  # over a second: the full suite, not the unit tier
@requires("tensorboard")
def test_csv_records_the_run_while_a_failing_tracker_beside_it_only_warns(tmp_path, caplog):
    """logger=many: the CSV files of a run, and a TensorBoard that cannot start (its dir is a file)
    warns once while the CSV logger and the run go on."""
    out = tmp_path / "run"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = compose(["engine=fake", "progress=false", "data.limit=2", "logger=many", "logger.use=[tensorboard,csv]",
                   f"logger.tensorboard.dir={blocker}"], output_dir=out)
    with caplog.at_level(logging.WARNING, logger="regioncap"):
        metrics = execute(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("tensorboard start failed, the run goes on"), warnings
    config = {r["key"]: r["value"] for r in _rows(out / "csv" / "config.csv")}
    assert config["engine._target_"].endswith("FakeEngine") and config["data.limit"] == "2"
    progress = _rows(out / "csv" / "progress.csv")
    assert {r["stage"] for r in progress} == {"visualize", "caption"}
    last = [r for r in progress if r["stage"] == "caption"][-1]
    assert int(last["rows"]) == 2 and int(last["regions"]) == metrics["regions"]
    (row,) = _rows(out / "csv" / "metrics.csv")
    assert row["exit_code"] == "0" and int(row["regions_captioned"]) == metrics["regions_captioned"]
    assert float(row["stages/caption/seconds"]) == metrics["stages"]["caption"]["seconds"]
    regions = _rows(out / "csv" / "regions.csv")
    assert len(regions) == metrics["regions"] and all(r["caption"] for r in regions)
    assert list(regions[0]) == list(trackers.REGION_COLUMNS) and regions[0]["row_id"] == "astronaut"
    assert not (tmp_path / "metrics.csv").exists()  # a single run: no sweep table


def test_a_failed_job_leaves_its_exit_code(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.jpg", "bbox": [[1, 1, 5, 5]]}\n')
    out = tmp_path / "run"
    with pytest.raises(RunError):
        execute(compose(["engine=fake", "progress=false", "logger=csv", "data=jsonl", f"data.path={bad}"],
                        output_dir=out))
    (row,) = _rows(out / "csv" / "metrics.csv")
    assert row["exit_code"] == "1" and row["error_rows"] == "1"


@requires("tensorboard")
def test_annotated_sample_draws_the_boxes_and_adds_the_caption_strip(tmp_path):
    from PIL import Image

    path = tmp_path / "im.png"
    Image.new("RGB", (64, 48), "white").save(path)
    sample = {"path": str(path), "caption": "row\n1: a red thing", "boxes": [(1, [4, 4, 30, 30], "1: a red thing",
                                                                              "input")]}
    image = trackers.annotated_sample(sample, {"draw": {"palette": ["red"]}})
    assert image.width == 64 and image.height > 48
    assert image.getpixel((4, 20)) == (255, 0, 0)  # the box's left edge, in the run's palette
    assert image.getpixel((60, 40)) == (255, 255, 255)  # outside the box: untouched
    plain = trackers.annotated_sample({**sample, "boxes": None}, {})
    assert plain.getpixel((4, 20)) == (255, 255, 255)  # a crop: no box drawn


@pytest.mark.slow
@requires("mlflow")
def test_an_unreachable_mlflow_server_is_one_warning_and_its_settings_are_put_back(tmp_path, caplog, monkeypatch):
    import os
    import socket

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    cfg = compose(["engine=fake", "progress=false", "data.limit=1", "logger=mlflow", "logger.http_retries=0",
                   f"logger.tracking_uri=http://127.0.0.1:{port}"], output_dir=out)
    with caplog.at_level(logging.WARNING, logger="regioncap"):
        metrics = execute(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.name == "regioncap" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow start failed, the run goes on"), warnings
    assert metrics["rows"] == 1 and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


# ------------------------------------------------------------------ through the CLI


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made once: making one runs MLflow's schema migrations (seconds),
    and each test copies this file to where it wants its own store."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def _store_at(template: Path, path: Path) -> str:
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@pytest.mark.cli
@pytest.mark.slow
@requires("tensorboard")
def test_tensorboard_through_the_cli(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["engine=fake", "progress=false", "data.limit=2", "logger=tensorboard", "logger.log_images=2",
                    f"hydra.run.dir={out}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = _events(out / "tensorboard")
    tags = acc.Tags()
    assert {"progress/caption/rows", "progress/visualize/regions", "regions_captioned", "exit_code",
            "stages/caption/seconds"} <= set(tags["scalars"])
    assert acc.Scalars("regions_captioned")[0].value > 0 and acc.Scalars("exit_code")[0].value == 0
    assert [e.step for e in acc.Scalars("progress/caption/rows")] == [1]
    assert tags["images"] == ["samples/00", "samples/01"]
    image = acc.Images("samples/00")[0]
    assert image.width > 0 and image.height > image.width  # the caption strip under the square request image
    config = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert '"limit": 2' in config
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert f"tensorboard --logdir {out / 'tensorboard'}" in proc.stdout + proc.stderr


@pytest.mark.cli
@pytest.mark.slow
@requires("mlflow")
def test_mlflow_through_the_cli_in_a_sqlite_store_the_test_makes(tmp_path, empty_mlflow_store):
    from mlflow.tracking import MlflowClient

    uri = _store_at(empty_mlflow_store, tmp_path / "store" / "mlflow.db")
    out = tmp_path / "run"
    proc = run_cli(["engine=fake", "progress=false", "data.limit=2", "logger=mlflow", f"logger.tracking_uri={uri}",
                    "logger.experiment=trackers-test", "logger.log_images=1", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("trackers-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and "mlflow.parentRunId" not in run.data.tags  # a single run: no parent
    assert run.data.params["data.limit"] == "2" and run.data.params["engine._target_"].endswith("FakeEngine")
    assert run.data.metrics["regions_captioned"] > 0 and run.data.metrics["rows"] == 2
    history = client.get_metric_history(run.info.run_id, "progress/caption/rows")
    assert [(m.step, m.value) for m in history] == [(1, 2.0)]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "samples", "records"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/00.png"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "records")} == {
        "records/captions.jsonl", "records/metrics.json"}
    # The artifacts sit beside the store, not in the folder the command was started from.
    assert (tmp_path / "store" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


@pytest.mark.cli
@pytest.mark.slow
@requires("mlflow", "tensorboard")
def test_a_sweep_groups_its_jobs_in_every_tracker(tmp_path, empty_mlflow_store):
    """logger=many with csv, tensorboard and mlflow, two jobs: one sweep table, every job's events under the
    sweep dir, one MLflow parent run with the jobs as its children, in the store made in the sweep dir."""
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "sweep"
    uri = _store_at(empty_mlflow_store, sweep / "mlflow.db")  # where logger.tracking_uri=null puts the store
    proc = run_cli(["-m", "engine=fake", "progress=false", "data.limit=1", "max_boxes=1,2", "logger=many",
                    "logger.use=[csv,tensorboard,mlflow]", "logger.tensorboard.log_images=0",
                    "logger.mlflow.log_images=0", "logger.mlflow.log_artifact=false", f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(sweep / "metrics.csv")
    assert [(r["job"], r["group"], r["exit_code"]) for r in rows] == [("0", "sweep", "0"), ("1", "sweep", "0")]
    assert ["max_boxes=1" in rows[0]["name"], "max_boxes=2" in rows[1]["name"]] == [True, True]
    for row in rows:
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert int(row["regions_captioned"]) == metrics["regions_captioned"] > 0
        (own,) = _rows(sweep / row["job"] / "csv" / "metrics.csv")  # the job's own row is the table's
        assert own == {k: v for k, v in row.items() if k != "job"}
    for job in ("0", "1"):
        assert _events(sweep / job / "tensorboard").Scalars("exit_code")[0].value == 0
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("regioncap").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("regioncap.sweep") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and sorted(r.data.params["max_boxes"] for r in children) == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
