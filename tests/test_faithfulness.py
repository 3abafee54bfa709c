"""The reference-free faithfulness check (captions that describe the scene, not their
region) and the reference checks exact_match / attribute_accuracy: clear positive and
negative examples, per-region flags and scores in the records, and the rates in
metrics.json, the W&B metrics and table, and the HTML report."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import pytest

from regioncap.loggers import collect, flatten_metrics
from regioncap.record_types import Record
from regioncap.metrics import (annotate_record, attribute_accuracy, caption_flags, compute_metrics, exact_match,
                               format_summary, region_flags)
from regioncap.report import write_report

SCENE_LIKE = [
    ("a man, a dog and a red car", ["lists_objects"]),
    ("a woman with a bag and a child", ["lists_objects"]),
    ("three cars parked by the road", ["many_objects"]),
    ("12 apples on a table", ["many_objects"]),
    ("people walking on the sidewalk", ["many_objects"]),
    ("several birds", ["many_objects"]),
    ("a group of cows", ["many_objects"]),
    ("the image shows a busy street", ["describes_image"]),
    ("a crowd of people, a bus and a taxi", ["lists_objects", "many_objects"]),
]
REGION_LIKE = [
    "a red circle", "a red and white bus", "two cars", "a red circle with a black outline",
    "a three-legged stool", "number 7 on a jersey", "a glass of water", "the dog's head", "a bus",
    "a man holding an umbrella", "",
]


@pytest.mark.parametrize("caption,flags", SCENE_LIKE)
def test_scene_like_captions_are_flagged(caption, flags):
    assert caption_flags(caption) == flags


@pytest.mark.parametrize("caption", REGION_LIKE)
def test_region_like_captions_are_not_flagged(caption):
    assert caption_flags(caption) == []


def regions(*captions: Optional[str]) -> List[Dict[str, Any]]:
    return [{"id": i + 1, "source_index": i, "number": i + 1, "chunk": 0, "caption": c, "missing": c is None}
            for i, c in enumerate(captions)]


def test_same_caption_for_every_region_of_an_image():
    assert region_flags(regions("A red circle.", "a red circle", "a  red circle!")) == [["same_as_other_regions"]] * 3
    # One region, or captions that differ somewhere, or a missing caption beside one: not flagged.
    assert region_flags(regions("a red circle")) == [[]]
    assert region_flags(regions("a red circle", "a red circle", "a blue square")) == [[], [], []]
    assert region_flags(regions("a red circle", None)) == [[], []]
    assert region_flags(regions("the image shows cats", "the image shows cats")) == \
        [["same_as_other_regions", "describes_image"]] * 2


def test_exact_match_and_attribute_accuracy():
    assert exact_match("A red circle.", ["a red circle"]) == 1.0
    assert exact_match("a red circle", ["a blue circle", "A  RED circle"]) == 1.0
    assert exact_match("a red circle on grey", ["a red circle"]) == 0.0
    assert exact_match("", ["a red circle"]) == 0.0
    assert attribute_accuracy("a red square", ["a red circle"]) == 0.5  # colour right, shape wrong
    assert attribute_accuracy("red circle", ["a red circle"]) == 1.0  # articles do not count
    assert attribute_accuracy("a big red circle", ["a red circle"]) == 1.0
    assert attribute_accuracy("a blue square", ["a red circle"]) == 0.0
    assert attribute_accuracy("a blue square", ["a red circle", "a blue circle"]) == 0.5  # best reference
    assert attribute_accuracy("anything", ["the", "a"]) is None  # no content word to check


def shape_records() -> List[Dict[str, Any]]:
    """Three rows of the coloured-shapes kind: one right, one half right, one scene-like."""
    out = []
    rows = [(["a red circle", "a blue square"], [["a red circle"], ["a blue square"]]),
            (["a red square", "a green circle"], [["a red circle"], ["a blue triangle"]]),
            (["two shapes: a red circle, a blue square and a green triangle"] * 2,
             [["a red circle"], ["a blue square"]])]
    for i, (captions, refs) in enumerate(rows):
        rec = {"id": f"r{i}", "index": i, "image": f"{i}.png", "image_path": f"/d/{i}.png", "status": "ok",
               "regions": regions(*captions), "requests": [], "dropped_boxes": [], "clipped_boxes": [],
               "error": None, "tokens": {"prompt": 0, "output": 0}, "references": refs}
        out.append(annotate_record(Record.from_dict(rec)).to_dict())
    return out


def test_records_carry_flags_and_scores_and_metrics_count_them():
    recs = shape_records()
    assert [r["flags"] for r in recs[0]["regions"]] == [[], []]
    assert recs[0]["regions"][0]["scores"] == {"exact_match": 1.0, "attribute_accuracy": 1.0}
    assert recs[1]["regions"][0]["scores"] == {"exact_match": 0.0, "attribute_accuracy": 0.5}
    assert recs[2]["regions"][0]["flags"] == ["same_as_other_regions", "lists_objects"]
    m = compute_metrics(recs, {}, meteor=False)
    faith = m["faithfulness"]
    assert faith["regions_checked"] == 6 and faith["scene_captions"] == 2 and faith["scene_caption_rate"] == 0.3333
    assert faith["by_reason"] == {"same_as_other_regions": 2, "lists_objects": 2, "many_objects": 0,
                                  "describes_image": 0}
    refs = m["references"]
    # exact: 1, 1, 0, 0, 0, 0; attributes: 1, 1, .5, 0, 1 (all words found), 1.
    assert refs["exact_match"] == round(2 / 6, 4)
    assert refs["attribute_accuracy"] == round(4.5 / 6, 4)
    flat = flatten_metrics(m)  # what the W&B logger sends
    assert flat["faithfulness/scene_caption_rate"] == 0.3333
    assert flat["faithfulness/by_reason/same_as_other_regions"] == 2
    assert flat["references/exact_match"] == refs["exact_match"]
    assert flat["references/attribute_accuracy"] == refs["attribute_accuracy"]
    text = format_summary(m, max_error_rate=0.1, out_dir="x")
    assert "faithfulness: 2 of 6 captions read like scene captions (33.3%)" in text
    assert f"exact match {refs['exact_match']:.1%}" in text


def test_wandb_table_and_report_show_flags_and_scores(tmp_path):
    from PIL import Image

    recs = shape_records()
    for rec in recs:  # the report shows rows with a request image
        Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / f"{rec['id']}.png")
        rec["requests"] = [{"key": rec["id"], "image": f"{rec['id']}.png", "numbers": [1, 2], "region_ids": [1, 2]}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = compute_metrics(recs, {"caption": {"rows": 3, "seconds": 1.0, "errors": {}}}, meteor=False)
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    _, table = collect(tmp_path / "captions.jsonl", tmp_path, n_images=0, table_rows=10, references_key="references")
    cols = table["columns"]
    rows = [dict(zip(cols, r)) for r in table["rows"]]
    assert "flags" in cols and "score/exact_match" in cols and "score/attribute_accuracy" in cols
    assert rows[4]["flags"] == "same_as_other_regions, lists_objects" and rows[0]["flags"] is None
    assert rows[0]["score/exact_match"] == 1.0 and rows[2]["score/attribute_accuracy"] == 0.5
    html = write_report(tmp_path).read_text()
    assert "<h3>Faithfulness</h3>" in html and "scene caption rate" in html and "33.3%" in html
    assert '<span class="tag flag">same_as_other_regions</span>' in html
    assert "exact_match" in html and "attribute_accuracy" in html
