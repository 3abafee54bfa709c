"""Sharded runs (data.num_shards / data.shard_index) and ``regioncap.merge``: the
shards together hold every row of the unsharded run exactly once, and the merge
refuses duplicated, missing or differently configured shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from conftest import REPO, compose, run_cli
from regioncap.data import DataError, iter_rows
from regioncap.job import execute
from regioncap.merge import MergeRefused, merge
from regioncap.metricspec import SPEC
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


def run_shard(tmp_path: Path, data: Optional[Path], name: str, overrides=()) -> Path:
    """A run of the fake engine over ``data`` (a JSONL file; None: data=shapes) in ``tmp_path/name``."""
    out = tmp_path / name
    given = ["data=jsonl", f"data.path={data}"] if data is not None else ["data=shapes", "model=shapes"]
    cfg = compose(["engine=fake", "progress=false", *given, *overrides], output_dir=out)
    execute(cfg)
    return out


def shards3(tmp_path: Path, data: Path, extra=()) -> list:
    return [run_shard(tmp_path, data, f"shard{i}", ["data.num_shards=3", f"data.shard_index={i}", *extra])
            for i in range(3)]


def comparable(rec: dict) -> dict:
    rec = {k: v for k, v in rec.items() if k not in RUN_DIR_FIELDS}
    rec["requests"] = [{k: v for k, v in r.items() if k not in ("image", "latency_s")} for r in rec["requests"]]
    return rec


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
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


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
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


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
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


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
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
    man = json.loads((tmp_path / "forced" / "manifest.json").read_text())
    assert man["shards"][1]["config_changes"] == ["max_boxes: 10 -> 2"] and man["shards"][2]["config_changes"] == []
    assert any("max_boxes: 10 -> 2" in d for d in man["config_differences"])


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
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
    # The merged dir's overrides are the unsharded run's: the sweep's, less the sharding.
    import yaml

    overrides = yaml.safe_load((tmp_path / "merged" / ".hydra" / "overrides.yaml").read_text())
    assert "engine=fake" in overrides and not any(o.startswith("data.") for o in overrides)
    man = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert [s["overrides"] for s in man["shards"]] == [
        yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) for job in jobs]
    assert man["hydra"]["overrides"] == overrides and man["hydra"]["choices"]["engine"] == "fake"


# ------------------------------------------------------------ a merged dir is a run dir

#: metrics.json figures that time one process (its wall time, stage seconds and rates, the scorer's
#: seconds, the pid): regioncap.metricspec declares them with ``aggregation="process"``. A merge sums
#: the shards' seconds, so these differ from an unsharded run's by how fast each process went, never by
#: what was computed. Request latencies are in the records: the merge's equal those of the merged
#: records, but two runs (sharded or not) never measure the same. Every other key must be equal.
PER_PROCESS_METRICS = tuple(m.path for m in SPEC if m.aggregation == "process") + (
    "latency_s.*", "reask_latency_s.*")
#: Only a merge has these: the sharded run as a whole.
MERGE_ONLY_METRICS = ("shards.*",)


def flat(node, prefix=""):
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def without(metrics: dict, patterns) -> dict:
    import fnmatch

    return {k: v for k, v in flat(metrics).items() if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}


_RUNS: dict = {}


@pytest.fixture(scope="module")
def shapes_runs(tmp_path_factory):
    """``data=shapes`` (8 rows with references) with the fake engine: the unsharded run, and the
    shards of ``n`` and their merge (made once per ``n``)."""
    root = tmp_path_factory.mktemp("shapes")

    def runs(n: int):
        if "whole" not in _RUNS:
            _RUNS["whole"] = run_shard(root, None, "whole")
        if n not in _RUNS:
            shards = [run_shard(root, None, f"n{n}/{k}", [f"data.num_shards={n}", f"data.shard_index={k}"])
                      for k in range(n)]
            merged = root / f"n{n}" / "merged"
            _RUNS[n] = (shards, merged, merge(merged, shards))
        return (_RUNS["whole"], *_RUNS[n])

    yield runs
    _RUNS.clear()


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@pytest.mark.parametrize("n", [2, 3])
def test_merged_metrics_equal_the_unsharded_runs(shapes_runs, n):
    # The per-process keys are those of docs/formats.md's merge section (held here to the spec).
    assert set(PER_PROCESS_METRICS) == {
        "wall_s", "regions_per_s", "images_per_s", "latency_s.*", "reask_latency_s.*", "stages.*.seconds",
        "stages.*.rows_per_s", "stages.*.images_per_s", "stages.*.regions_per_s", "stages.*.pid",
        "pipeline.seconds", "pipeline.images_per_s", "pipeline.regions_per_s", "references.scoring_s",
        "references.scoring_meteor_s", "densecap.meteor_s", "shards.wall_s_max", "shards.span_s",
        "shards.regions_per_s", *(f"stages.caption.{k}" for k in (
            "prompt_tokens_per_s", "output_tokens_per_s", "steady.seconds", "steady.rows", "steady.images",
            "steady.regions", "steady.prompt_tokens", "steady.output_tokens", "startup.engine_load_s",
            "startup.first_batch_s", "startup.time_to_first_caption_s", "startup.process_start_s", "startup.cluster_start_s",
            "startup.replicas_start_s", "startup.engines", "steady.basis"))}
    whole, shards, merged, summary = shapes_runs(n)
    assert summary["status"] == "ok" and summary["metrics"] == "metrics.json"
    expected = json.loads((whole / "metrics.json").read_text())
    got = json.loads((merged / "metrics.json").read_text())
    assert expected["references"]["regions_scored"] > 0  # the scores are compared, not only counts
    assert expected["references"]["intervals"]["exact_match"]["n_boot"] > 0  # and their seeded intervals
    assert without(got, PER_PROCESS_METRICS + MERGE_ONLY_METRICS) == without(expected, PER_PROCESS_METRICS)
    # The per-process figures are the shards' sums (process-seconds), and the rates follow from them.
    parts = [json.loads((s / "metrics.json").read_text()) for s in shards]
    for stage in ("visualize", "caption"):
        seconds = sum(p["stages"][stage]["seconds"] for p in parts)
        assert got["stages"][stage]["seconds"] == pytest.approx(seconds, abs=1e-3)
    assert got["stages"]["visualize"]["rows_per_s"] == round(got["rows"] / got["stages"]["visualize"]["seconds"], 3)
    # The caption stage's rates are over its steady part: the shards' steady parts summed.
    steady = got["stages"]["caption"]["steady"]
    assert steady["rows"] == sum(p["stages"]["caption"]["steady"]["rows"] for p in parts)
    assert got["stages"]["caption"]["rows_per_s"] == pytest.approx(steady["rows"] / steady["seconds"], rel=0.01)
    assert got["pipeline"]["seconds"] == pytest.approx(sum(p["pipeline"]["seconds"] for p in parts), abs=1e-3)
    assert got["wall_s"] == got["pipeline"]["seconds"]
    assert got["shards"]["count"] == n
    assert got["shards"]["wall_s_max"] == max(p["wall_s"] for p in parts)
    assert got["shards"]["span_s"] >= got["shards"]["wall_s_max"]


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_merged_manifest_and_config_name_the_shards(shapes_runs):
    whole, shards, merged, _ = shapes_runs(3)
    from regioncap.manifest import read_manifest

    man = read_manifest(merged)
    assert man["kind"] == "merge" and man["run_dir"] == str(merged.absolute())
    assert [s["shard_index"] for s in man["shards"]] == [0, 1, 2]
    for entry, shard in zip(man["shards"], shards):
        own = read_manifest(shard)
        key = json.loads((shard / "run_key.json").read_text())
        assert entry["dir"] == str(shard.absolute()) and entry["run_key_hash"] == key["hash"]
        assert entry["git_sha"] == own["git"]["sha"]
        assert entry["overrides"] == (own["hydra"]["overrides"] or [])  # none under the compose API
        assert entry["rows"] == len(list(read_jsonl(shard / "captions.jsonl")))
        assert entry["records"]["sha256"] == own["outputs"]["captions.jsonl"]["sha256"]
        assert (merged / entry["dir_relative"]).resolve() == shard.resolve()
        assert entry["config_changes"] == []  # the shards' configs differ in shard_index and run dir only
        assert entry["threads"] == own["threads"]
    # A reader of a run's manifest can read a merged one: every field of the one is in the other.
    assert set(read_manifest(whole)) <= set(man)
    assert man["threads"] == read_manifest(shards[0])["threads"]
    assert man["data"] == read_manifest(shards[0])["data"]  # the same input, fingerprinted once
    assert set(man["outputs"]) == {"captions.jsonl", "metrics.json"}
    # The config is the unsharded run's: the report's header and export read it.
    import yaml

    config = yaml.safe_load((merged / ".hydra" / "config.yaml").read_text())
    assert (config["data"]["num_shards"], config["data"]["shard_index"]) == (1, 0)
    assert config["output_dir"] == str(merged.absolute())
    assert without(config, ("output_dir",)) == without(read_manifest(whole)["config"], ("output_dir",))


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_merged_report_shows_images_header_and_shards(shapes_runs, tmp_path):
    import shutil

    from regioncap.report import write_report

    _, shards, merged, summary = shapes_runs(3)
    page = (merged / "report.html").read_text()
    assert summary["report"] and "image not available" not in page
    assert page.count('<img src="data:image/jpeg') >= 8
    assert "<b>shapes</b>" in page and "<b>marked</b>" in page and "<b>fake</b>" in page  # the header
    assert "<h2>Shards</h2>" in page and all(str(s.absolute()) in page for s in shards)
    # The merged dir holds its images: moved elsewhere, its report still shows every one.
    assert summary["images"]["files"] == len(list(merged.glob("images/*"))) > 0
    moved = shutil.copytree(merged, tmp_path / "moved")
    (moved / "report.html").unlink()
    again = write_report(moved).read_text()
    assert "image not available" not in again and again.count('<img src="data:image/jpeg') >= 8


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_merge_refuses_shards_scored_differently(tmp_path, rows7):
    shards = shards3(tmp_path, rows7)
    other = run_shard(tmp_path, rows7, "other", ["data.num_shards=3", "data.shard_index=2",
                                                 "data.references_key=refs"])
    with pytest.raises(MergeRefused) as exc:
        merge(tmp_path / "m", [shards[0], shards[1], other])
    text = str(exc.value)
    assert 'data.references_key: "references" -> "refs" (scores the records)' in text
    assert str(shards[0]) in text and str(other) in text and "--force" in text
    assert not (tmp_path / "m" / "metrics.json").exists()
    # An out dir that holds a merge already is refused: its files are never written over.
    merge(tmp_path / "ok", shards)
    with pytest.raises(MergeRefused, match="already exists"):
        merge(tmp_path / "ok", shards, stage="visualize")
    # A shard with no recorded config: the records merge, metrics.json is not guessed.
    (shards[1] / "manifest.json").unlink()
    summary = merge(tmp_path / "bare", shards, report=False)
    assert summary["status"] == "ok" and summary["rows"] == 7
    assert summary["metrics"].startswith(f"not written: {shards[1]} has no manifest.json")
    assert not (tmp_path / "bare" / "metrics.json").exists() and not (tmp_path / "bare" / "report.html").exists()
    assert json.loads((tmp_path / "bare" / "manifest.json").read_text())["shards"][1]["dir"] == str(shards[1])


@pytest.mark.slow
def test_merged_report_images_render_in_chromium(shapes_runs, tmp_path):
    from test_report import _check_in_browser

    _, shards, merged, _ = shapes_runs(3)
    state = _check_in_browser(merged / "report.html", "merged-report-screenshot.png", tmp_path)
    photos = [i for i in state["images"] if i["src"].startswith("data:image/jpeg")]
    assert len(photos) >= 8 and all(i["complete"] and i["w"] > 0 for i in photos)
    assert "image not available" not in state["text"]
    assert "Shards" in state["text"] and all(str(s.absolute()) in state["text"] for s in shards)


@pytest.mark.slow
def test_merge_scores_with_the_shards_meteor_setting(tmp_path):
    """metrics.meteor=true on the shards: the merge runs METEOR too, and gets the unsharded run's score.
    (Two METEOR starts: the whole run's and the merge's; the shards' own METEOR is not what is tested.)"""
    on = ["metrics.meteor=true"]
    whole = run_shard(tmp_path, None, "whole", on)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("regioncap.metrics.meteor_absent", lambda: "left out of the shards by the test")
        shards = [run_shard(tmp_path, None, f"s{k}", [*on, "data.num_shards=2", f"data.shard_index={k}"])
                  for k in range(2)]
    merge(tmp_path / "merged", shards, report=False)
    expected = json.loads((whole / "metrics.json").read_text())
    got = json.loads((tmp_path / "merged" / "metrics.json").read_text())
    assert expected["references"]["meteor"] is not None, expected["references"].get("meteor_absent")
    assert without(got, PER_PROCESS_METRICS + MERGE_ONLY_METRICS) == without(expected, PER_PROCESS_METRICS)


def test_a_shard_dir_that_is_not_there_is_named_as_such(tmp_path):
    # Found by a merge with a mistyped shard dir: it was "no captions.jsonl (did that shard run the
    # caption stage?)" and one of "the shards were run with other settings ... add --force", which
    # --force could not fix.
    shard = tmp_path / "0"
    shard.mkdir()
    (shard / "captions.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "index": i}) + "\n" for i in (0, 2)))
    (shard / "run_key.json").write_text(json.dumps({"hash": "x", "values": {"data": {"num_shards": 2,
                                                                                     "shard_index": 0}}}))
    with pytest.raises(MergeRefused) as exc:
        merge(tmp_path / "merged", [shard, tmp_path / "1"], expect=4, report=False)
    message = str(exc.value)
    assert f"{tmp_path / '1'}: no such folder" in message
    assert "--force" not in message and "run_key" not in message


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_a_shard_with_no_rows_of_its_own_succeeds_and_merges(tmp_path, rows7):
    # Found by sharding 3 rows 5 ways: shards 3 and 4 failed with "no input rows were read from
    # rows.jsonl: nothing to caption", though the file has rows and the merge needs those shards.
    two = write_rows(tmp_path / "two.jsonl", [json.loads(line) for line in rows7.read_text().splitlines()[:2]])
    shards = [run_shard(tmp_path, two, f"s{i}", ["data.num_shards=3", f"data.shard_index={i}"]) for i in range(3)]
    assert list(read_jsonl(shards[2] / "captions.jsonl")) == []
    # Its error rate is of no rows: null (it was 1.0, "100% errors" beside a job that succeeded).
    empty_metrics = json.loads((shards[2] / "metrics.json").read_text())
    assert empty_metrics["error_rate"] is None and empty_metrics["captioned_share"] is None
    merged = merge(tmp_path / "merged", shards, report=False)
    assert merged["rows"] == 2
    # Nor does it pull the merged rate: recomputed from the summed counts.
    assert json.loads((tmp_path / "merged" / "metrics.json").read_text())["error_rate"] == 0.0
    # The run report and a sweep report over the shards show it as ok, its rate as none.
    from regioncap.report import write_report

    assert "error rate" in write_report(shards[2]).read_text(encoding="utf-8")
    sweep = tmp_path / "sweep"
    for shard in shards:
        shutil.copytree(shard, sweep / shard.name)
    page = write_report(sweep).read_text(encoding="utf-8")
    assert "over max_error_rate" not in page and "s2" in page
    # A file with no rows at all is still a failed run, sharded or not.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(Exception, match="no input rows were read"):
        run_shard(tmp_path, empty, "e", ["data.num_shards=3", "data.shard_index=2"])


def test_the_shards_row_counts_add_up_to_the_whole(tmp_path):
    from regioncap.data import count_rows, rows_of_all_shards

    path = tmp_path / "rows.jsonl"
    data = compose(["data=jsonl", f"data.path={path}"]).data
    for n, shards, skip, limit in [(3, 5, 0, None), (7, 3, 1, 4), (0, 2, 0, None), (10, 4, 12, None), (9, 1, 2, 3)]:
        path.write_text("".join('{"image": "a.png"}\n' for _ in range(n)))
        data.num_shards, data.skip, data.limit = shards, skip, limit
        whole = rows_of_all_shards(data)
        assert whole == len(range(n)[skip:][:limit])
        total = 0
        for k in range(shards):
            data.shard_index = k
            total += count_rows(data)
        data.shard_index = 0
        assert total == whole


def _hand_shard(path: Path, indexes, *, num_shards: int, shard_index: int, rows_read: Optional[int] = None) -> Path:
    """A shard dir written by hand: its records (index only), run key, and a manifest when ``rows_read`` is given."""
    path.mkdir()
    (path / "captions.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "index": i}) + "\n" for i in indexes))
    (path / "run_key.json").write_text(json.dumps({"hash": "x", "values": {"data": {
        "num_shards": num_shards, "shard_index": shard_index}}}))
    if rows_read is not None:
        (path / "manifest.json").write_text(json.dumps({"data": {"rows": None, "rows_read": rows_read}}))
    return path


def test_shards_all_killed_mid_run_are_not_merged_as_if_complete(tmp_path):
    # Found by killing both shards of a run at once (SIGKILL: no manifest.json anywhere): the merge
    # wrote 81 of 120 rows and exited 0, as nothing said how many rows there were.
    shards = [_hand_shard(tmp_path / "0", [0, 2], num_shards=2, shard_index=0),
              _hand_shard(tmp_path / "1", [1, 3, 5], num_shards=2, shard_index=1)]
    with pytest.raises(MergeRefused) as exc:
        merge(tmp_path / "merged", shards, report=False)
    message = str(exc.value)
    assert "cannot tell whether every row is in a shard" in message and "--expect N" in message
    assert f"have no manifest.json, so their runs never ended (killed): {shards[0]}, {shards[1]}" in message
    assert "resume=true" in message
    with pytest.raises(MergeRefused, match=r"1 of 6 row\(s\) are in no shard: indexes 4; 2 shard\(s\) have no"):
        merge(tmp_path / "given", shards, expect=6, report=False)


def test_a_finished_shards_rows_read_is_what_the_merge_expects_and_a_killed_shard_is_named(tmp_path):
    done = _hand_shard(tmp_path / "0", [0, 2, 4], num_shards=2, shard_index=0, rows_read=6)
    killed = _hand_shard(tmp_path / "1", [1], num_shards=2, shard_index=1)
    with pytest.raises(MergeRefused) as exc:
        merge(tmp_path / "merged", [done, killed], report=False)
    assert (f"2 of 6 row(s) are in no shard: indexes 3, 5; 1 shard(s) have no manifest.json, so their runs never "
            f"ended (killed): {killed}: run each again with resume=true in its dir") in str(exc.value)
    (killed / "captions.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "index": i}) + "\n" for i in (1, 3, 5)))
    (killed / "manifest.json").write_text(json.dumps({"data": {"rows": None, "rows_read": 6}}))
    summary = merge(tmp_path / "merged2", [done, killed], report=False)
    assert summary["rows"] == 6 and summary["expected"] == 6 and summary["expected_from"] == "manifest.json"
