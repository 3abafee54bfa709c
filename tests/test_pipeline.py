"""The visualize and caption stages end to end with the fake engine (no model):
every input row comes out exactly once, captions land on the right boxes,
bad input becomes error rows that name the input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import compose
from regioncap.job import execute
from regioncap.records import read_jsonl
from regioncap.run import RunError

DATAFLOW_FIELDS = ["image", "type", "bbox", "normalized_bbox", "result_file", "image_with_bbox",
                   "valid_bboxes_num", "prompt", "answer"]


def write_rows(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def make_image(path: Path, size=(320, 240), colour=(40, 120, 200)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def run_fake(tmp_path: Path, overrides=(), data_file: Path | None = None):
    out = tmp_path / "run"
    args = ["engine=fake", "progress=false", *overrides]
    if data_file is not None:
        args += ["data=jsonl", f"data.path={data_file}"]
    cfg = compose(args, output_dir=out)
    metrics = execute(cfg)
    return out, metrics, list(read_jsonl(out / "captions.jsonl"))


def test_demo_data_end_to_end(tmp_path):
    out, metrics, records = run_fake(tmp_path)
    assert [r["id"] for r in records] == ["astronaut", "chelsea", "coffee", "rocket", "grace_hopper"]
    assert metrics["rows"] == 5 and metrics["error_rows"] == 0
    assert metrics["regions"] == metrics["regions_captioned"] == 18
    for rec in records:
        for field in DATAFLOW_FIELDS:
            assert field in rec, field
        assert rec["status"] == "ok" and rec["type"] == "with_bbox"
        assert Path(rec["image_with_bbox"]).is_file()
        assert len(rec["normalized_bbox"]) == 10 and rec["valid_bboxes_num"] == len(rec["bbox"])
        # Extra input fields are carried through untouched.
        assert len(rec["objects"]) == len(rec["bbox"]) and rec["source"]
        w, h = rec["input_size"]
        assert w % 28 == 0 and h % 28 == 0 and 3136 <= w * h <= 50176
        for reg in rec["regions"]:
            # The fake answers "region <n> in <request key>": the caption of each
            # region must be the one its own request gave for its own number.
            assert reg["caption"].startswith(f"fake caption of region {reg['number']} in {rec['id']}/c{reg['chunk']}")
    assert (out / "visualize.jsonl").exists() and (out / "metrics.json").exists()
    # The visualize records are the stage boundary: same rows, prompts, no answers.
    vis = list(read_jsonl(out / "visualize.jsonl"))
    assert [v["id"] for v in vis] == [r["id"] for r in records]
    assert all("answer" not in v for v in vis)


def test_normalized_bbox_matches_dataflow(tmp_path):
    img = make_image(tmp_path / "a.png", size=(1000, 500))
    data = write_rows(tmp_path / "rows.jsonl", [{"image": "a.png", "bbox": [[100, 50, 200, 100]]}])
    _, _, (rec,) = run_fake(tmp_path, data_file=data)
    assert rec["normalized_bbox"][0] == [0.1, 0.1, 0.3, 0.3]
    assert rec["normalized_bbox"][1:] == [[0.0, 0.0, 0.0, 0.0]] * 9
    assert rec["regions"][0]["bbox"] == [100.0, 50.0, 300.0, 150.0]
    assert img.exists()


def test_more_boxes_than_max_boxes_are_chunked_never_dropped(tmp_path):
    make_image(tmp_path / "a.png", size=(640, 480))
    boxes = [[10 + 25 * i, 10 + 15 * i, 20, 20] for i in range(23)]
    data = write_rows(tmp_path / "rows.jsonl", [{"image": "a.png", "bbox": boxes}])
    out, metrics, (rec,) = run_fake(tmp_path, ["max_boxes=10"], data_file=data)
    assert len(rec["requests"]) == 3
    assert [len(s["region_ids"]) for s in rec["requests"]] == [10, 10, 3]
    assert len({s["image"] for s in rec["requests"]}) == 3
    assert all((out / s["image"]).is_file() for s in rec["requests"])
    assert [r["source_index"] for r in rec["regions"]] == list(range(23))
    assert all(r["caption"] for r in rec["regions"])
    # Marks restart at 1 on each chunk image; ids stay global.
    assert [r["number"] for r in rec["regions"]][10:13] == [1, 2, 3]
    assert rec["regions"][22]["caption"].startswith(f"fake caption of region 3 in {rec['id']}/c2")
    assert len(rec["normalized_bbox"]) == 23
    assert metrics["regions_captioned"] == 23


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_bad_input_rows_become_error_rows_and_nothing_is_lost(tmp_path):
    make_image(tmp_path / "ok.png")
    (tmp_path / "text.jpg").write_text("not an image at all")
    good = tmp_path / "good.jpg"
    Image.frombytes("RGB", (400, 300), bytes((i * 7919) % 251 for i in range(360000))).save(good, quality=90)
    data_bytes = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data_bytes[: len(data_bytes) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "adir").mkdir()
    Image.new("RGB", (4000, 3000)).save(tmp_path / "huge.png")
    rows = [
        {"image": "ok.png", "bbox": [[10, 10, 50, 50]]},                      # 0 ok
        {"image": "missing.png", "bbox": [[10, 10, 50, 50]]},                 # 1 missing_file
        {"image": "text.jpg", "bbox": [[10, 10, 50, 50]]},                    # 2 not_an_image
        {"image": "truncated.jpg", "bbox": [[10, 10, 50, 50]]},               # 3 corrupt_image
        '{"image": "ok.png", "bbox": [[1, 2, 3, 4]',                          # 4 invalid_json
        {"image": "ok.png", "bbox": "[[1, 2"},                                 # 5 bad_bbox
        {"image": "ok.png", "bbox": [["a", 1, 2, 3], [1, 2, 3], [5, 5, -1, 4], [9e9, 9e9, 5, 5]]},  # 6 no_valid_boxes
        {"image": "ok.png", "bbox": [[10, 10, 50, 50], [float("nan"), 1, 2, 3]]},  # 7 ok, one dropped
        {"image": "ok.png", "bbox": []},                                       # 8 no regions
        {"image": "huge.png", "bbox": [[10, 10, 50, 50]]},                    # 9 image_too_large
        {"image": "empty.png", "bbox": [[10, 10, 50, 50]]},                   # 10 empty_file
        {"image": "adir", "bbox": [[10, 10, 50, 50]]},                        # 11 not_a_file
        {"bbox": [[10, 10, 50, 50]]},                                         # 12 missing_image_field
        {"image": 42, "bbox": [[10, 10, 50, 50]]},                            # 13 bad_image_value
        "[1, 2, 3]",                                                           # 14 invalid_row
        {"image": "ok.png", "bbox": [[300, 200, 100, 100]]},                  # 15 ok, clipped
    ]
    data = tmp_path / "rows.jsonl"
    with open(data, "w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, allow_nan=True)) + "\n")
        fh.write("\n")  # a blank line is not a row
    out = tmp_path / "run"
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}",
                   "limits.max_image_pixels=1000000", "max_error_rate=1.0"], output_dir=out)
    metrics = execute(cfg)
    records = list(read_jsonl(out / "captions.jsonl"))
    assert [r["index"] for r in records] == list(range(len(rows)))
    kinds = {r["index"]: (r["error"] or {}).get("kind") for r in records}
    assert kinds == {
        0: None, 1: "missing_file", 2: "not_an_image", 3: "corrupt_image", 4: "invalid_json", 5: "bad_bbox",
        6: "no_valid_boxes", 7: None, 8: None, 9: "image_too_large", 10: "empty_file", 11: "not_a_file",
        12: "missing_image_field", 13: "bad_image_value", 14: "invalid_row", 15: None,
    }
    by_index = {r["index"]: r for r in records}
    # Every error names its input (the file, or the line of the JSONL file).
    for i, rec in by_index.items():
        if rec["error"]:
            msg = rec["error"]["message"]
            assert rec["error"]["stage"] == "visualize"
            assert ("rows.jsonl line" in msg) or (str(rows[i]["image"]) in msg), msg
    assert by_index[4]["line"] == 5
    assert [d["reason"] for d in by_index[6]["dropped_boxes"]] == [
        "not_numeric", "wrong_arity", "non_positive_size", "outside_image"]
    # The row's message carries its first box's detail (it once said only the reasons).
    assert by_index[6]["error"]["message"].endswith("; " + by_index[6]["dropped_boxes"][0]["detail"])
    assert [d["reason"] for d in by_index[7]["dropped_boxes"]] == ["not_finite"]
    assert by_index[7]["status"] == "ok" and by_index[7]["valid_bboxes_num"] == 1
    assert by_index[8]["status"] == "no_regions" and by_index[8]["type"] == "without_bbox"
    assert by_index[15]["clipped_boxes"][0]["reason"] == "clipped"
    assert by_index[15]["regions"][0]["bbox"] == [300.0, 200.0, 320.0, 240.0]
    assert metrics["rows"] == len(rows) and metrics["error_rows"] == 12
    # A row that gave no image says so (it once read "<in-memory image>") and is no image in the count:
    # the distinct files named, missing and broken ones included.
    assert {i: by_index[i]["image"] for i in (4, 12, 13, 14)} == dict.fromkeys((4, 12, 13, 14), "<no image>")
    named = {str(tmp_path / r["image"]) for r in rows if isinstance(r, dict) and isinstance(r.get("image"), str)}
    assert metrics["images"] == len(named)


def test_error_rate_above_limit_fails_the_run_after_writing_everything(tmp_path):
    make_image(tmp_path / "ok.png")
    data = write_rows(tmp_path / "rows.jsonl", [
        {"image": "ok.png", "bbox": [[1, 1, 30, 30]]}, {"image": "nope.png", "bbox": [[1, 1, 30, 30]]}])
    out = tmp_path / "run"
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}", "max_error_rate=0.25"],
                  output_dir=out)
    with pytest.raises(RunError, match="error rate 50.0%"):
        execute(cfg)
    assert len(list(read_jsonl(out / "captions.jsonl"))) == 2


def test_empty_input_fails_clearly(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n\n")
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}"], output_dir=tmp_path / "r")
    with pytest.raises(RunError, match="no input rows"):
        execute(cfg)


def test_missing_region_is_reasked_once(tmp_path):
    _, metrics, records = run_fake(tmp_path, ["engine.skip_regions=[2]"])
    astro = records[0]
    reg2 = astro["regions"][1]
    assert reg2["caption"] and reg2["attempt"] == 2
    assert astro["requests"][0]["reask"]["numbers"] == [2]
    assert "labelled 2," in astro["requests"][0]["reask"]["prompt"]
    assert metrics["reasks"] == 5 and metrics["regions_missing"] == 0


def test_region_still_missing_after_reask_is_recorded_not_invented(tmp_path):
    _, metrics, records = run_fake(tmp_path, ["engine.skip_regions=[2]", "engine.answer_on_reask=false"])
    reg2 = records[0]["regions"][1]
    assert reg2["caption"] is None and reg2["missing"] and reg2["reason"] == "not_in_answer"
    assert records[0]["status"] == "partial"
    assert metrics["regions_missing"] == 5


def test_engine_failure_of_one_request_fails_only_that_row(tmp_path):
    _, metrics, records = run_fake(tmp_path, ["engine.fail_keys=[coffee/]", "max_error_rate=0.5"])
    status = {r["id"]: r["status"] for r in records}
    assert status == {"astronaut": "ok", "chelsea": "ok", "coffee": "error", "rocket": "ok", "grace_hopper": "ok"}
    coffee = records[2]
    # An engine failure may pass another time: retry_errors=true redoes the row.
    assert coffee["error"] == {"stage": "caption", "kind": "engine_error", "message": "fake failure for coffee/c0",
                               "retryable": True}
    assert all(r["reason"] == "engine_error" for r in coffee["regions"])


def test_relative_image_paths_resolve_against_the_data_file(tmp_path, monkeypatch):
    sub = tmp_path / "data"
    sub.mkdir()
    make_image(sub / "a.png")
    data = write_rows(sub / "rows.jsonl", [{"image": "a.png", "bbox": [[1, 1, 30, 30]]}])
    monkeypatch.chdir(tmp_path)  # not the data folder
    _, _, (rec,) = run_fake(tmp_path, data_file=data)
    assert rec["status"] == "ok" and rec["image"] == "a.png"
    assert rec["image_path"] == str(sub / "a.png")


def test_input_fields_that_clash_with_output_fields_are_kept(tmp_path):
    make_image(tmp_path / "a.png")
    data = write_rows(tmp_path / "rows.jsonl", [
        {"image": "a.png", "bbox": [[1, 1, 30, 30]], "answer": "old answer", "regions": 7, "note": "keep"}])
    _, _, (rec,) = run_fake(tmp_path, data_file=data)
    assert rec["input"] == {"answer": "old answer", "regions": 7}
    assert rec["note"] == "keep" and rec["answer"].startswith("1: fake caption")


@pytest.mark.parametrize("fmt,box", [
    ("xyxy", [10, 20, 110, 120]), ("cxcywh", [60, 70, 100, 100]), ("xywh_norm", [10 / 320, 20 / 240, 100 / 320, 100 / 240]),
    ("qwen1000", [31.25, 83.333333, 343.75, 500.0]),
])
def test_bbox_formats(tmp_path, fmt, box):
    make_image(tmp_path / "a.png")
    data = write_rows(tmp_path / "rows.jsonl", [{"image": "a.png", "bbox": [box]}])
    _, _, (rec,) = run_fake(tmp_path, [f"data.bbox_format={fmt}"], data_file=data)
    assert rec["regions"][0]["bbox"] == pytest.approx([10, 20, 110, 120], abs=0.01)


def test_crop_strategy_sends_one_crop_per_region(tmp_path):
    out, metrics, records = run_fake(tmp_path, ["prompt=crop"])
    astro = records[0]
    assert len(astro["requests"]) == len(astro["regions"]) == 5
    for spec in astro["requests"]:
        with Image.open(out / spec["image"]) as im:
            assert im.width % 28 == 0 and im.height % 28 == 0
    assert all(r["caption"].startswith("fake caption of region 1 in astronaut/r") for r in astro["regions"])
    assert metrics["regions_captioned"] == 18


def test_coords_strategy_puts_model_coordinates_in_the_prompt(tmp_path):
    out, _, records = run_fake(tmp_path, ["prompt=coords"])
    astro = records[0]
    assert len(astro["requests"]) == 1
    spec = astro["requests"][0]
    for reg in astro["regions"]:
        assert f'{reg["number"]}: {{"bbox_2d": {json.dumps(reg["input_bbox"])}}}' in spec["prompt"]
    # The image sent has no marks: it is the resized photo.
    with Image.open(out / spec["image"]) as im:
        assert list(im.size) == astro["input_size"]


def test_dataflow_prompt_with_dataflow_marks(tmp_path):
    _, _, records = run_fake(tmp_path, ["prompt=dataflow", "draw=dataflow"])
    assert records[0]["prompt"] == ("Describe the content of each marked region in the image. "
                                    "There are 5 regions: <region1> to <region5>.")
    assert all(r["caption"] for r in records[0]["regions"])


def test_json_answer_format(tmp_path):
    _, metrics, records = run_fake(tmp_path, ["prompt.answer_format=json"])
    assert metrics["regions_captioned"] == 18
    assert json.loads(records[0]["answer"])["regions"][0]["id"] == 1


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_stages_can_run_separately(tmp_path):
    out = tmp_path / "run"
    execute(compose(["engine=fake", "progress=false", "stages=[visualize]"], output_dir=out))
    assert (out / "visualize.jsonl").exists() and not (out / "captions.jsonl").exists()
    metrics = execute(compose(["engine=fake", "progress=false", "stages=[caption]"], output_dir=out))
    assert metrics["regions_captioned"] == 18


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_hf_datasets_source_saved_dataset_and_parquet(tmp_path):
    import datasets

    make_image(tmp_path / "a.png", colour=(10, 200, 10))
    ds = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "a.png"), str(tmp_path / "a.png")], "boxes": [[[1, 1, 50, 50]], [[5, 5, 20, 20], [60, 60, 40, 40]]],
         "uid": ["x1", "x2"], "caption_ref": ["a", "b"]},
        features=datasets.Features({"image": datasets.Image(), "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                                    "uid": datasets.Value("string"), "caption_ref": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "rows.csv").write_text('image,boxes,uid,caption_ref\na.png,"[[1, 1, 50, 50]]",x1,a\n'
                                       'a.png,"[[5, 5, 20, 20], [60, 60, 40, 40]]",x2,b\n')
    for i, extra in enumerate([[f"data.path={tmp_path / 'saved'}"],
                               [f"data.path={tmp_path / 'rows.parquet'}", "data.hf_builder=parquet"],
                               [f"data.path={tmp_path / 'rows.parquet'}"],  # the builder from the extension
                               [f"data.path={tmp_path / 'rows.csv'}"]]):
        out = tmp_path / f"run{i}"
        cfg = compose(["engine=fake", "progress=false", "data=hf", "data.bbox_key=boxes", "data.id_key=uid", *extra],
                      output_dir=out)
        metrics = execute(cfg)
        records = list(read_jsonl(out / "captions.jsonl"))
        assert [r["id"] for r in records] == ["x1", "x2"]
        assert metrics["regions_captioned"] == 3 and records[1]["caption_ref"] == "b"
    (tmp_path / "rows.txt").write_text("a.png\n")
    with pytest.raises(RunError, match=r"rows.txt is a file datasets cannot tell the format of; set data.hf_builder"):
        execute(compose(["engine=fake", "progress=false", "data=hf", f"data.path={tmp_path / 'rows.txt'}"],
                        output_dir=tmp_path / "run_txt"))


def test_caption_stage_in_an_isolated_child_process(tmp_path):
    import os

    out = tmp_path / "run"
    metrics = execute(compose(["engine=fake", "progress=false", "engine.isolate=true"], output_dir=out))
    assert metrics["regions_captioned"] == 18
    assert metrics["stages"]["caption"]["pid"] not in (None, os.getpid())
    assert metrics["stages"]["visualize"]["pid"] == os.getpid()


@pytest.mark.slow  # several seconds: the slow tier runs it (the unit tier stays under 2 min)
def test_isolated_engine_failure_is_a_clear_run_error(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # passes path resolution, fails to load in the child
    out = tmp_path / "run"
    cfg = compose(["engine=transformers", "progress=false", "engine.isolate=true",
                   f"model.path={broken}", "model.builder=null"], output_dir=out)
    with pytest.raises(RunError, match="could not start.*stages=\\[caption\\]"):
        execute(cfg)
    assert len(list(read_jsonl(out / "visualize.jsonl"))) == 5


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_objective_is_what_the_job_returns_to_a_sweeper(tmp_path):
    from regioncap.job import run_job

    cfg = compose(["engine=fake", "progress=false", "objective=regions_captioned"], output_dir=tmp_path / "run")
    assert run_job(cfg) == 18
    cfg = compose(["engine=fake", "progress=false", "objective=stages.caption.regions_per_s"],
                  output_dir=tmp_path / "run1")
    assert run_job(cfg) == json.loads((tmp_path / "run1" / "metrics.json").read_text())["stages"]["caption"][
        "regions_per_s"]
    # A name metrics.json cannot hold fails before any work (no run dir), with the closest names.
    with pytest.raises(RunError, match="not a metric.*did you mean references.exact_match"):
        from regioncap.job import check_objective

        check_objective(compose(["engine=fake", "objective=references.exact_matc"]))
    with pytest.raises(SystemExit):
        run_job(compose(["engine=fake", "progress=false", "objective=nope"], output_dir=tmp_path / "run2"))
    assert not (tmp_path / "run2").exists()


def test_a_job_without_its_objectives_value_is_failed_in_its_manifest_too(tmp_path):
    """An empty shard (it succeeds) with objective=references.exact_match raised after its manifest said
    ok: the sweep exited 1 while its report listed the job as ok and counted 0 failed."""
    from regioncap.job import execute
    from regioncap.report import _job_status, load_run

    out = tmp_path / "run"
    cfg = compose(["engine=fake", "progress=false", "data.limit=2", "data.num_shards=3", "data.shard_index=2",
                   "objective=references.exact_match"], output_dir=out)
    with pytest.raises(RunError, match="objective 'references.exact_match' has no value in this run"):
        execute(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "has no value" in manifest["error"]
    assert _job_status(load_run(out)) == "failed"
