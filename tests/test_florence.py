"""Florence-2's conventions: a fixed square, 577 visual tokens, ``<loc_N>`` boxes, the ``<OD>`` parser, the region task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from regioncap import boxes as bx
from regioncap.draw import DrawStyle
from regioncap.families.florence import BINS, REGION_TASK, Florence2, from_bin, to_bin
from regioncap.strategies import RegionStrategy

ARCHS = Path(__file__).resolve().parent.parent / "regioncap" / "archs"


def family(**kw) -> Florence2:
    return Florence2(Florence2.config(name="florence2_base", path="florence-community/Florence-2-base", **kw))


def test_every_image_becomes_the_square_with_577_visual_tokens():
    fam = family()
    for w, h in [(768, 768), (1920, 1080), (31, 4000), (1, 1)]:
        assert fam.input_size(w, h) == (768, 768)
        assert fam.visual_tokens(*fam.input_size(w, h)) == 577  # (768 / 32)^2 + the pooled token
    assert fam.is_fixed_size(768, 768) and not fam.is_fixed_size(1024, 768)
    assert family(image_size=64).visual_tokens(64, 64) == 5


@pytest.mark.parametrize("folder", ["florence2_base", "florence2_large"])
def test_the_published_processor_agrees_with_the_family(folder):
    pre = json.loads((ARCHS / folder / "preprocessor_config.json").read_text())
    side = pre["size"]["height"]
    assert pre["size"] == {"height": side, "width": side}
    assert family(image_size=side).visual_tokens(side, side) == pre["image_seq_length"] == 577


def test_location_tokens_are_the_processors_bins():
    # quantize: floor(x / (W / 1000)) clamped to 0..999; dequantize: the bin's centre.
    assert [to_bin(x, 800) for x in (0, 0.79, 0.8, 400, 799.9, 800, 1e9, -5)] == [0, 0, 1, 500, 999, 999, 999, 0]
    assert from_bin(0, 1000) == 0.5 and from_bin(999, 800) == pytest.approx(799.6)
    fam = family()
    # The request text, snapshotted: a change to it is a deliberate diff.
    assert fam.region_prompt((0, 0, 640, 480), (640, 480)) == REGION_TASK + "<loc_0><loc_0><loc_999><loc_999>"
    assert fam.box_text((64, 48, 320, 240), (640, 480)) == "<loc_100><loc_100><loc_500><loc_500>"
    # x on the width, y on the height of a non-square image.
    assert fam.box_coords((10, 10, 20, 20), (100, 1000)) == [100, 10, 200, 20]


def _round_trip(fam: Florence2, box, size):
    w, h = size
    props = fam.parse_grounding("thing" + fam.box_text(box, size), w, h, min_size=0.0)
    assert len(props) == 1 and props[0].label == "thing"
    # Every corner comes back within half a bin (the bin's centre), x on the width and y on the height.
    for got, want, side in zip(props[0].bbox, box, (w, h, w, h)):
        assert abs(got - want) <= side / BINS / 2 + 1e-9


@pytest.mark.parametrize("size", [(768, 768), (1920, 1080), (333, 4000), (7, 5)])
def test_round_trip_at_corners_and_edges(size):
    w, h = size
    fam = family()
    for box in [(0, 0, w, h), (0, 0, w / 10, h / 10), (w * 0.9, h * 0.9, w, h), (0, h / 3, w, h / 2),
                (w / 2, 0, w * 0.51 + 1, h)]:
        _round_trip(fam, box, size)


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 5000), h=st.integers(1, 5000), a=st.floats(0, 1), b=st.floats(0, 1),
       c=st.floats(0, 1), d=st.floats(0, 1))
def test_round_trip_property(w, h, a, b, c, d):
    x1, x2 = sorted((a * w, c * w))
    y1, y2 = sorted((b * h, d * h))
    _round_trip(family(), (x1, y1, x2, y2), (w, h))


def test_od_answers_parse_to_pixel_boxes():
    fam = family()
    # An <OD> answer as the model writes it (decoded with its special tokens), at 1000 x 500 pixels.
    text = "</s><s>car<loc_53><loc_334><loc_933><loc_775>door handle<loc_425><loc_504><loc_474><loc_516></s><pad>"
    props = fam.parse_grounding(text, 1000, 500)
    assert [p.label for p in props] == ["car", "door handle"]
    assert props[0].bbox == pytest.approx((53.5, 167.25, 933.5, 387.75))
    assert all(p.source == "vlm" for p in props)
    # A label's boxes repeat after it; corners in the wrong order are swapped; a bin past 999 drops its box.
    two = fam.parse_grounding("person<loc_0><loc_0><loc_10><loc_10><loc_20><loc_20><loc_10><loc_10>"
                              "x<loc_1000><loc_0><loc_5><loc_5>", 1000, 1000)
    assert [(p.label, p.bbox) for p in two] == [("person", (0.5, 0.5, 10.5, 10.5)), ("person", (10.5, 10.5, 20.5, 20.5))]
    # Boxes without labels, tiny boxes, and no boxes at all.
    assert fam.parse_grounding("<loc_1><loc_1><loc_9><loc_9>", 1000, 1000)[0].label is None
    assert fam.parse_grounding("a<loc_1><loc_1><loc_1><loc_1>", 1000, 1000) == []
    assert fam.parse_grounding("a car in a street", 1000, 1000) == []
    assert fam.parse_grounding(None, 10, 10) == []
    with pytest.raises(ValueError, match="width"):
        fam.parse_grounding("x", 0, 10)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab <>_/lo cs0123456789") + [
    "<loc_", "<loc_12>", "<loc_999>", "<loc_0>", "<loc_1000>", "</s>", "<s>", "<od>"]), max_size=60).map("".join))
def test_the_parser_never_raises_and_keeps_boxes_in_the_image(text):
    for p in family().parse_grounding(text, 640, 480):
        x1, y1, x2, y2 = p.bbox
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480 and all(math.isfinite(v) for v in p.bbox)


def test_the_grounding_request_is_the_od_task():
    assert family().grounding_prompt() == "<OD>"
    assert family().grounding_constraint("regex", 10) == {}  # location tokens are special: not constrainable as text


# ------------------------------------------------------------------ prompt=region


def _strategy(fam):
    from conftest import compose

    cfg = compose(["prompt=region"])
    return RegionStrategy(RegionStrategy.Config(name="region"), DrawStyle.from_config(cfg.draw), fam, 10)


def test_region_strategy_one_request_per_region_no_marks(tmp_path):
    fam = family()
    strategy = _strategy(fam)
    boxes = [bx.Box(0, 0, 384, 384), bx.Box(100, 200, 768, 768), bx.Box(5, 5, 50, 60)]
    from regioncap.record_types import Region

    regions = [Region(id=i + 1, input_bbox=b.round_int(), chunk=c, number=n)
               for i, ((c, n), b) in enumerate(zip(strategy.slots(len(boxes)), boxes))]
    assert [r.number for r in regions] == [1, 1, 1]
    image = Image.new("RGB", (768, 768), "white")
    rendered = strategy.render("0000001", image, image, (1536, 1536), strategy.plan(regions, boxes))
    # One clean image (no marks drawn), written once and shared by every request.
    assert [r.image is image for r in rendered] == [True, False, False]
    assert len({r.name for r in rendered}) == 1
    specs = [strategy.spec("row", r) for r in rendered]
    assert [s.prompt for s in specs] == [
        "<REGION_TO_DESCRIPTION><loc_0><loc_0><loc_500><loc_500>",
        "<REGION_TO_DESCRIPTION><loc_130><loc_260><loc_999><loc_999>",
        "<REGION_TO_DESCRIPTION><loc_6><loc_6><loc_65><loc_78>",
    ]
    assert [s.region_ids for s in specs] == [[1], [2], [3]]
    # The answer is the caption: free text, no constraint, nothing to re-ask.
    assert strategy.constraint([1]) == (None, None) and not strategy.reasks
    assert strategy.parse("a white wall", [1]).captions == {1: "a white wall"}


def test_region_strategy_refuses_a_family_without_a_region_task():
    from conftest import compose
    from regioncap.errors import RunError
    from regioncap.strategies import build_strategy

    with pytest.raises(RunError, match="prompt=region needs a model family with a region task"):
        build_strategy(compose(["prompt=region", "model=qwen25vl_3b"]))
    assert isinstance(build_strategy(compose(["prompt=region", "model=florence2_base"])), RegionStrategy)


def test_metrics_count_the_familys_visual_tokens():
    from regioncap.metrics import compute_metrics

    rec = {"id": "r", "status": "ok", "regions": [{"id": 1, "caption": "a cat", "number": 1}],
           "requests": [{"key": "r/r1", "image": "images/r.jpg", "image_size": [768, 768], "prompt": "x",
                         "numbers": [1], "region_ids": [1], "prompt_tokens": 600, "output_tokens": 3}]}
    fam = family()
    m = compute_metrics([rec], {"caption": {"rows": 1, "seconds": 1.0, "errors": 0}}, patch_size=32, merge_size=1,
                        references_key=None, bootstrap_resamples=0, visual=fam.visual_tokens)
    assert m["visual_tokens"] == 577  # 24 x 24 and the pooled token, as the engine counts them
