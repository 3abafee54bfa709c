"""Dataset adapters (data=coco, vg, refcoco, hf with nested columns) on small fixtures made
here: Pillow images in tmp dirs and annotation files in the real layouts. Each is read
with iter_rows (ids, boxes, references, error rows that name the input, sharding) and run
through the real CLI (engine=fake) so references reach metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
from PIL import Image

from conftest import compose, run_cli
from regioncap.data import DataError, iter_rows
from regioncap.records import read_jsonl


def _image(path: Path, size=(96, 64), colour=(200, 40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# ------------------------------------------------------------------ fixtures in the real formats
def make_coco(root: Path) -> Path:
    """instances.json with 3 listed images (one missing on disk), a crowd box, a malformed
    box, an annotation of an image id not in 'images', and a non-object annotation."""
    _image(root / "images" / "000001.jpg")
    _image(root / "images" / "000002.jpg", colour=(40, 40, 200))
    doc = {
        "info": {"description": "fixture"},
        "images": [{"id": 1, "file_name": "000001.jpg", "width": 96, "height": 64},
                   {"id": 2, "file_name": "000002.jpg", "width": 96, "height": 64},
                   {"id": 3, "file_name": "000003.jpg", "width": 96, "height": 64}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 4, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [40, 10, 40, 40], "area": 1600, "iscrowd": 1},
            {"id": 12, "image_id": 2, "category_id": 2, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 13, "image_id": 2, "category_id": 1, "bbox": ["x", 1, 2], "area": 0, "iscrowd": 0},
            {"id": 14, "image_id": 3, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 15, "image_id": 99, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0},
            "not an annotation",
        ],
        "categories": [{"id": 1, "name": "circle", "supercategory": "shape"},
                       {"id": 2, "name": "square", "supercategory": "shape"}],
    }
    path = root / "annotations" / "instances.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def make_vg(root: Path) -> Path:
    """region_descriptions.json: two images with regions, one whose image file is absent,
    one entry without regions."""
    _image(root / "VG_100K" / "7.jpg")
    _image(root / "VG_100K" / "8.jpg", colour=(20, 160, 20))
    doc = [
        {"id": 7, "regions": [
            {"region_id": 70, "image_id": 7, "x": 2, "y": 3, "width": 30, "height": 20, "phrase": "a red circle"},
            {"region_id": 71, "image_id": 7, "x": 50, "y": 10, "width": 30, "height": 30, "phrase": "a blue square"}]},
        {"id": 8, "regions": [
            {"region_id": 80, "image_id": 8, "x": 5, "y": 5, "width": 20, "height": 20, "phrase": "a green triangle"}]},
        {"id": 9, "regions": [
            {"region_id": 90, "image_id": 9, "x": 5, "y": 5, "width": 20, "height": 20, "phrase": "gone"}]},
        {"id": 10},
    ]
    path = root / "region_descriptions.json"
    path.write_text(json.dumps(doc))
    return path


def make_refcoco(root: Path, jsonl: bool = True) -> Path:
    """RefCOCO refs as JSON lines: two refs on image 5 (its file named with the ann id
    suffix, as RefCOCO does), one on image 6 in another split, a bad line."""
    _image(root / "train2014" / "COCO_train2014_000000000005.jpg")
    _image(root / "train2014" / "COCO_train2014_000000000006.jpg")
    refs = [
        {"ref_id": 1, "ann_id": 50, "image_id": 5, "split": "val", "file_name": "COCO_train2014_000000000005_50.jpg",
         "bbox": [3, 3, 30, 30], "sentences": [{"sent": "the red circle on the left", "raw": "The red circle"},
                                               {"sent": "left circle"}]},
        {"ref_id": 2, "ann_id": 51, "image_id": 6, "split": "train", "file_name": "COCO_train2014_000000000006.jpg",
         "bbox": [10, 10, 40, 40], "sentences": ["big square"]},
        {"ref_id": 3, "ann_id": 52, "image_id": 5, "split": "val", "file_name": "COCO_train2014_000000000005_52.jpg",
         "bbox": [50, 10, 40, 40], "sentences": ["blue square right"]},
    ]
    path = root / ("refs.jsonl" if jsonl else "refs.json")
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in refs) + "{not json\n")
    else:
        path.write_text(json.dumps({"refs": refs}))
    return path


def _rows(*overrides: str) -> List[Any]:
    return list(iter_rows(compose(list(overrides)).data))


# ------------------------------------------------------------------ COCO
def test_coco_rows_boxes_references_and_error_rows(tmp_path):
    path = make_coco(tmp_path)
    rows = _rows("data=coco", f"data.path={path}", "data.images_dir=../images")
    by_id = {r.row_id: r for r in rows}
    assert [r.row_id for r in rows] == ["1", "2", "3", "annotation-6", "unknown-image-99"]
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]
    one = by_id["1"]
    assert one.error is None and one.image_path == str(tmp_path / "annotations" / "../images" / "000001.jpg")
    assert one.bbox == [[4, 4, 30, 20], [40, 10, 40, 40]]
    assert one.extra["references"] == [["circle"], ["square"]]
    assert one.extra["annotation_ids"] == [10, 11] and one.extra["iscrowd"] == [0, 1]
    assert by_id["2"].bbox[1] == ["x", 1, 2]  # dropped by the box checks, listed in dropped_boxes
    assert by_id["3"].error["kind"] == "image_not_found"
    assert "instances.json image id 3" in by_id["3"].error["message"] and "000003.jpg" in by_id["3"].error["message"]
    assert by_id["annotation-6"].error["kind"] == "invalid_annotation"
    assert "instances.json annotations[6]" in by_id["annotation-6"].error["message"]
    unknown = by_id["unknown-image-99"]
    assert unknown.error["kind"] == "unknown_image_id" and "[15]" in unknown.error["message"]


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_coco_skip_crowd_and_shards(tmp_path):
    path = make_coco(tmp_path)
    base = ["data=coco", f"data.path={path}", "data.images_dir=../images"]
    (one, *_) = _rows(*base, "data.coco_iscrowd=skip")
    assert one.bbox == [[4, 4, 30, 20]] and one.extra["crowd_annotation_ids"] == [11]
    everything = [r.row_id for r in _rows(*base)]
    shards = [[r.row_id for r in _rows(*base, "data.num_shards=2", f"data.shard_index={k}")] for k in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(everything) and not set(shards[0]) & set(shards[1])


def test_coco_file_that_is_not_coco_is_a_data_error(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(DataError, match="not a COCO instances file"):
        _rows("data=coco", f"data.path={bad}")


# ------------------------------------------------------------------ Visual Genome
def test_vg_rows_and_error_rows(tmp_path):
    path = make_vg(tmp_path)
    rows = _rows("data=vg", f"data.path={path}", "data.images_dir=VG_100K")
    assert [r.row_id for r in rows] == ["7", "8", "9", "entry-3"]
    seven = rows[0]
    assert seven.bbox == [[2, 3, 30, 20], [50, 10, 30, 30]]
    assert seven.extra["references"] == [["a red circle"], ["a blue square"]] and seven.extra["region_ids"] == [70, 71]
    assert seven.image_path == str(tmp_path / "VG_100K" / "7.jpg")
    assert rows[2].error["kind"] == "image_not_found" and "region_descriptions.json entry 2" in rows[2].error["message"]
    assert rows[3].error["kind"] == "invalid_entry" and "entry 3" in rows[3].error["message"]


# ------------------------------------------------------------------ RefCOCO
@pytest.mark.parametrize("jsonl", [True, False])
def test_refcoco_groups_refs_by_image(tmp_path, jsonl):
    path = make_refcoco(tmp_path, jsonl=jsonl)
    rows = _rows("data=refcoco", f"data.path={path}", "data.images_dir=train2014")
    ids = [r.row_id for r in rows]
    assert ids == (["5", "6", "ref-entry-3"] if jsonl else ["5", "6"])
    five = rows[0]
    assert five.bbox == [[3, 3, 30, 30], [50, 10, 40, 40]] and five.extra["ref_ids"] == [1, 3]
    assert five.extra["references"] == [["the red circle on the left", "left circle"], ["blue square right"]]
    # The ann-id suffix of RefCOCO's file names is dropped to find the COCO image.
    assert five.image_path.endswith("COCO_train2014_000000000005.jpg")
    if jsonl:
        assert rows[2].error["kind"] == "invalid_ref" and "refs.jsonl line 4" in rows[2].error["message"]
    only_val = _rows("data=refcoco", f"data.path={path}", "data.images_dir=train2014", "data.ref_split=val")
    assert [r.row_id for r in only_val if not r.error] == ["5"]


# ------------------------------------------------------------------ Hugging Face, nested columns
def make_hf(root: Path) -> Path:
    """A detection-style dataset saved with save_to_disk: an Image column and
    ``objects`` = {bbox, category (ClassLabel)} per row."""
    import datasets

    pics = []
    for i, colour in enumerate([(220, 30, 30), (30, 30, 220), (30, 200, 30)]):
        _image(root / "src" / f"{i}.png", colour=colour)
        pics.append(str(root / "src" / f"{i}.png"))
    features = datasets.Features({
        "image_id": datasets.Value("int64"),
        "image": datasets.Image(),
        "objects": datasets.Sequence({"bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                                      "category": datasets.ClassLabel(names=["circle", "square"])}),
    })
    ds = datasets.Dataset.from_dict({
        "image_id": [100, 101, 102], "image": pics,
        "objects": [{"bbox": [[2, 2, 20, 20], [40, 10, 30, 30]], "category": [0, 1]},
                    {"bbox": [[5, 5, 10, 10]], "category": [1]},
                    {"bbox": [[500, 500, 10, 10]], "category": [0]}],
    }, features=features)
    out = root / "hf_ds"
    ds.save_to_disk(str(out))
    return out


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_hf_nested_columns_and_class_label_references(tmp_path):
    path = make_hf(tmp_path)
    rows = _rows("data=hf", f"data.path={path}", "data.bbox_key=objects.bbox", "data.id_key=image_id",
                 "data.hf_references_key=objects.category")
    assert [r.row_id for r in rows] == ["100", "101", "102"]
    assert rows[0].bbox == [[2, 2, 20, 20], [40, 10, 30, 30]]
    assert rows[0].extra["references"] == ["circle", "square"] and rows[1].extra["references"] == ["square"]
    with pytest.raises(DataError, match="no column 'boxes.bbox'"):
        _rows("data=hf", f"data.path={path}", "data.bbox_key=boxes.bbox")


@pytest.mark.slow  # datasets' CSV builder: over a second
def test_hf_csv_keeps_ids_images_and_references_as_written(tmp_path):
    # pandas guessed a type per CSV column: ids 007 and 7 were both 7, ids in a column with a blank
    # cell came out as 1.0 and 2.0, a reference "2" as the number 2.0 (a malformed reference).
    _image(tmp_path / "a.jpg")
    (tmp_path / "rows.csv").write_text('id,image,bbox,references,score\n007,a.jpg,"[[1,1,10,10]]",2,0.5\n'
                                       '7,a.jpg,"[[1,1,10,10]]",a cat,1\n,a.jpg,,,\n')
    rows = _rows("data=hf", f"data.path={tmp_path / 'rows.csv'}")
    assert [r.row_id for r in rows] == ["007", "7", "row-0000002"]
    assert [r.extra["references"] for r in rows] == ["2", "a cat", None]
    assert [r.image_path for r in rows] == [str(tmp_path / "a.jpg")] * 3 and rows[2].bbox is None
    assert [r.extra["score"] for r in rows[:2]] == [0.5, 1.0]  # other columns keep pandas' types


@pytest.mark.slow  # datasets' CSV and Parquet builders: over a second
def test_a_symlinked_data_file_reads_its_images_beside_its_target_whatever_the_source(tmp_path):
    # data=jsonl resolved relative images against the real file's folder, data=hf against the link's:
    # the same data set linked in from elsewhere lost every image through data=hf.
    import datasets

    real, link = tmp_path / "real", tmp_path / "link"
    _image(real / "a.jpg")
    link.mkdir()
    (real / "rows.jsonl").write_text('{"id": "x", "image": "a.jpg", "bbox": [[1, 1, 10, 10]]}\n')
    (real / "rows.csv").write_text('id,image,bbox\nx,a.jpg,"[[1, 1, 10, 10]]"\n')
    datasets.Dataset.from_dict({"id": ["x"], "image": ["a.jpg"], "bbox": [[[1, 1, 10, 10]]]}).to_parquet(
        str(real / "rows.parquet"))
    for name in ("rows.jsonl", "rows.csv", "rows.parquet"):
        (link / name).symlink_to(real / name)
    (link / "folder").symlink_to(real, target_is_directory=True)
    paths = {str(r.image_path) for source, name in [("jsonl", "rows.jsonl"), ("hf", "rows.csv"), ("hf", "rows.parquet"),
                                                      ("hf", "folder/rows.csv")]
             for r in _rows(f"data={source}", f"data.path={link / name}")}
    # a pattern read by a named builder: its images beside the files it matches (the pattern was taken for a folder)
    paths |= {str(r.image_path) for r in _rows("data=hf", f"data.path={real}/rows.j*", "data.hf_builder=json")}
    assert paths == {str(real / "a.jpg")}


@pytest.mark.slow  # datasets: over a second
def test_a_saved_dataset_without_the_split_names_its_splits(tmp_path):
    # It was "cannot load dataset ... (split 'train'): 'train'", a KeyError's text.
    import datasets

    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"image": ["a.jpg"], "bbox": [[[1, 1, 5, 5]]]})}
                         ).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"has no split 'train' \(data.split\); its splits: validation: "
                                        r"set data.split=validation"):
        _rows("data=hf", f"data.path={tmp_path / 'saved'}")
    assert len(_rows("data=hf", f"data.path={tmp_path / 'saved'}", "data.split=validation")) == 1


# ------------------------------------------------------------------ the real CLI on every fixture
def _cli(tmp_path: Path, name: str, overrides: List[str]) -> Dict[str, Any]:
    out = tmp_path / f"run-{name}"
    proc = run_cli(["engine=fake", "progress=false", "max_error_rate=1.0", f"hydra.run.dir={out}", *overrides],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"records": list(read_jsonl(out / "captions.jsonl")),
            "metrics": json.loads((out / "metrics.json").read_text())}


@pytest.mark.parametrize("name", ["coco", "vg", "refcoco", "hf"])
def test_cli_on_each_adapter(tmp_path, name):
    if name == "coco":
        overrides = ["data=coco", f"data.path={make_coco(tmp_path)}", "data.images_dir=../images"]
        ok, errors, refs_rows = {"1", "2"}, {"3", "annotation-6", "unknown-image-99"}, 2
    elif name == "vg":
        overrides = ["data=vg", f"data.path={make_vg(tmp_path)}", "data.images_dir=VG_100K"]
        ok, errors, refs_rows = {"7", "8"}, {"9", "entry-3"}, 2
    elif name == "refcoco":
        overrides = ["data=refcoco", f"data.path={make_refcoco(tmp_path)}", "data.images_dir=train2014"]
        ok, errors, refs_rows = {"5", "6"}, {"ref-entry-3"}, 2
    else:
        overrides = ["data=hf", f"data.path={make_hf(tmp_path)}", "data.bbox_key=objects.bbox",
                     "data.id_key=image_id", "data.hf_references_key=objects.category"]
        ok, errors, refs_rows = {"100", "101"}, {"102"}, 2  # row 102's only box is outside its image
    got = _cli(tmp_path, name, overrides)
    recs = {r["id"]: r for r in got["records"]}
    assert set(recs) == ok | errors  # nothing lost, stable ids
    assert {i for i, r in recs.items() if r["status"] == "error"} == errors
    for i in ok:
        assert recs[i]["status"] == "ok" and all(reg["caption"] for reg in recs[i]["regions"])
        assert all(reg["flags"] == [] for reg in recs[i]["regions"])  # fake captions differ per region
        assert all("exact_match" in reg["scores"] for reg in recs[i]["regions"])
    m = got["metrics"]
    assert m["rows"] == len(ok | errors) and m["error_rows"] == len(errors)
    refs = m["references"]
    assert refs["rows_with_references"] >= refs_rows and refs["regions_scored"] == m["regions_captioned"]
    assert refs["exact_match"] == 0.0 and refs["attribute_accuracy"] is not None
    assert m["faithfulness"]["regions_checked"] == m["regions_captioned"]
    if name == "coco":
        (dropped,) = recs["2"]["dropped_boxes"]
        assert dropped["index"] == 1 and recs["2"]["annotation_ids"][dropped["index"]] == 13


def test_adapter_settings_enter_the_run_key_only_when_set():
    from regioncap.run import run_key_values

    plain = run_key_values(compose(["data=jsonl", "data.path=x.jsonl"]))["data"]
    assert not {"images_dir", "coco_iscrowd", "ref_split"} & set(plain)  # older runs' keys unchanged
    coco = run_key_values(compose(["data=coco", "data.path=x.json", "data.images_dir=imgs",
                                   "data.coco_iscrowd=skip"]))["data"]
    assert coco["images_dir"] == "imgs" and coco["coco_iscrowd"] == "skip" and coco["source"] == "coco"


def test_vg_through_the_real_tiny_model(tmp_path, tiny_model_dir):
    """The transformers engine on the tiny Qwen2.5-VL: every row comes out, every region
    carries its flags, and the references are scored (wording of a random model not asserted)."""
    out = tmp_path / "run"
    proc = run_cli(["engine=transformers", "engine.device=cpu", f"model.path={tiny_model_dir}", "progress=false",
                    "max_error_rate=1.0", "data=vg", f"data.path={make_vg(tmp_path)}", "data.images_dir=VG_100K",
                    "sampling.max_tokens=24", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["id"]: r for r in read_jsonl(out / "captions.jsonl")}
    assert set(recs) == {"7", "8", "9", "entry-3"}
    assert recs["9"]["status"] == "error" and recs["entry-3"]["status"] == "error"
    for i in ("7", "8"):
        assert recs[i]["status"] in ("ok", "partial", "error") and recs[i]["requests"][0]["answer"] is not None
        assert all(isinstance(reg["flags"], list) for reg in recs[i]["regions"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["references"]["rows_with_references"] == 3 and "faithfulness" in m  # the error row 9 too


def test_field_at_reads_both_nested_layouts():
    from regioncap.data import _ABSENT, field_at

    struct_of_lists = {"objects": {"bbox": [[1, 2, 3, 4]], "category": [0]}}
    list_of_structs = {"objects": [{"bbox": [1, 2, 3, 4], "category": 0}, {"bbox": [5, 6, 7, 8], "category": 1}]}
    assert field_at(struct_of_lists, "objects.bbox") == [[1, 2, 3, 4]]
    assert field_at(list_of_structs, "objects.bbox") == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert field_at(list_of_structs, "objects.category") == [0, 1]
    assert field_at({"objects.bbox": 1, "objects": {"bbox": 2}}, "objects.bbox") == 1  # a literal column wins
    assert field_at(struct_of_lists, "objects.area") is _ABSENT and field_at({"a": 3}, "a.b") is _ABSENT


# ------------------------------------------------------------------ row digests
@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@pytest.mark.parametrize("source", ["coco", "vg", "refcoco", "hf"])
def test_every_source_gives_each_row_a_content_digest(tmp_path, source):
    """Every row (error rows too) carries a digest of its content: the same file read
    again gives the same digests, and a changed row gets a new one."""
    make = {"coco": make_coco, "vg": make_vg, "refcoco": make_refcoco, "hf": make_hf}[source]
    path = make(tmp_path)
    extra = {"coco": ["data.images_dir=../images"], "vg": ["data.images_dir=VG_100K"],
             "refcoco": ["data.images_dir=train2014"], "hf": ["data.bbox_key=objects.bbox"]}[source]
    overrides = [f"data={source}", f"data.path={path}", *extra]
    rows = _rows(*overrides)
    digests = [r.digest for r in rows]
    assert all(isinstance(d, str) and len(d) == 16 for d in digests), digests
    assert len(set(digests)) == len(digests)
    assert [r.digest for r in _rows(*overrides)] == digests
    if source == "hf":
        return  # a saved dataset is not edited in place; its digest is of the record's values
    text = path.read_text()
    changed = text.replace("30, 20", "31, 20").replace("a green triangle", "a green square").replace(
        "big square", "large square")
    assert changed != text
    path.write_text(changed)
    assert [r.digest for r in _rows(*overrides)] != digests


def test_coco_annotations_without_a_box_list_are_one_box_each(tmp_path):
    # Found with two annotations of one image whose bbox were null and "x": read as one bare box
    # [None, "x"], the row said "none of its 1 boxes is usable ... expected 4 values, got 2".
    from regioncap.boxes import parse_boxes

    _image(tmp_path / "a.jpg")
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": None}, {"id": 2, "image_id": 1, "bbox": "x"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    (row,) = _rows("data=coco", f"data.path={path}", "data.images_dir=.")
    parsed = parse_boxes(row.bbox, "xywh", 96, 64)
    assert parsed.boxes == [] and [d.index for d in parsed.dropped] == [0, 1]


@pytest.mark.slow  # two fake-engine runs and a merge: a few seconds
def test_a_sharded_coco_run_merges_to_every_row_once(tmp_path):
    # The manifest counted an annotation file's lines as its rows (1 for a one-line COCO JSON), so
    # the merge refused every sharded COCO run: "5 row index(es) are past the 1 expected".
    from regioncap.job import execute
    from regioncap.merge import merge

    path = make_coco(tmp_path)
    common = ["engine=fake", "progress=false", "max_error_rate=1", "data=coco", f"data.path={path}",
              "data.images_dir=../images", "data.num_shards=2"]
    whole = [r.row_id for r in _rows(*common[3:6])]
    shards = [tmp_path / f"s{k}" for k in range(2)]
    for k, shard in enumerate(shards):
        execute(compose([*common, f"data.shard_index={k}"], output_dir=shard))
    manifest = json.loads((shards[0] / "manifest.json").read_text())
    assert manifest["data"]["rows"] is None and manifest["data"]["rows_read"] == len(whole)
    summary = merge(tmp_path / "merged", shards, report=False)
    assert summary["expected"] == len(whole)
    assert [r["id"] for r in read_jsonl(tmp_path / "merged" / "captions.jsonl")] == whole
