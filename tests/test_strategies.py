"""Prompt strategies own a row's plan: numbers decided once, a pure render, the answer constraint and parsing."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from conftest import compose
from regioncap import boxes as bx
from regioncap.strategies import CropStrategy, build_strategy


def regions_of(strategy, boxes):
    """Regions as the visualize stage writes them: the strategy's slots on each box."""
    from regioncap.record_types import Region

    return [Region(id=i + 1, input_bbox=b.round_int(), chunk=c, number=n)
            for i, ((c, n), b) in enumerate(zip(strategy.slots(len(boxes)), boxes))]


BOXES = [bx.Box(10 + 20 * i, 10, 28 + 20 * i, 40) for i in range(5)]


@pytest.mark.parametrize("option", ["marked", "crop", "coords", "dataflow"])
def test_render_is_pure_and_specs_follow_the_plan(option, tmp_path):
    strategy = build_strategy(compose([f"prompt={option}", "max_boxes=2"]))
    regions = regions_of(strategy, BOXES)
    image = Image.new("RGB", (224, 224), "white")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rendered = strategy.render("0000007", image, image, (224, 224), strategy.plan(regions, BOXES))
    finally:
        os.chdir(cwd)
    assert list(tmp_path.iterdir()) == []  # nothing written: the stage writes what render returns
    specs = [strategy.spec("row", r) for r in rendered]
    # Every region is asked about exactly once, by the number its slot gave it.
    assert sorted(rid for s in specs for rid in s.region_ids) == [r.id for r in regions]
    by_id = {r.id: r for r in regions}
    assert all([by_id[i].number for i in s.region_ids] == s.numbers for s in specs)
    if isinstance(strategy, CropStrategy):
        assert [s.numbers for s in specs] == [[1]] * 5
    else:
        assert [s.numbers for s in specs] == [[1, 2], [1, 2], [1]]
    assert all(r.image is None or r.image.size == tuple(r.size) for r in rendered)


def test_the_answer_constraint_and_parser_are_the_strategys():
    marked = build_strategy(compose(["prompt=marked"]))
    regex, schema = marked.constraint([1, 2])
    assert regex is not None and schema is None  # lines: one "<n>: ..." line per region
    assert marked.parse("1: a red circle\n2: a blue star", [1, 2]).captions == {1: "a red circle", 2: "a blue star"}
    crop = build_strategy(compose(["prompt=crop"]))
    assert crop.constraint([1]) == (None, None)  # free text
    assert crop.prompt.reask_missing is False and crop.answer_format == "free"  # its Config's defaults


def test_request_images_are_named_by_the_encoding_they_are_written_in():
    """draw.image_format=PNG wrote PNG bytes into .jpg files (the extension compared case-sensitively
    while the encoder did not)."""
    from regioncap.images import save_format

    cfg = compose([])
    for fmt, ext in (("png", "png"), ("PNG", "png"), ("jpeg", "jpg"), ("JPG", "jpg")):
        cfg.draw.image_format = fmt
        assert build_strategy(cfg).ext == ext
        assert save_format(fmt, 92)[0] == {"png": "PNG", "jpg": "JPEG"}[ext]
