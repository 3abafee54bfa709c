"""Tests for regioncap.boxes: format conversion, parsing and validation, output helpers."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regioncap.boxes import (
    BBOX_FORMATS,
    Box,
    BoxFormatError,
    BoxIssue,
    ParsedBoxes,
    chunk,
    from_xyxy,
    normalized_xyxy,
    pad_normalized,
    parse_boxes,
    to_xyxy,
)

# Fast enough to keep the whole file well under the ~5 s budget.
PROPERTY = settings(max_examples=200, deadline=None)


# --- conversion -----------------------------------------------------------

# One box, x 20..80 and y 10..50 in a 200x100 image, written in every format.
KNOWN = {
    "xywh": [20, 10, 60, 40],
    "xyxy": [20, 10, 80, 50],
    "cxcywh": [50, 30, 60, 40],
    "xywh_norm": [0.1, 0.1, 0.3, 0.4],
    "xyxy_norm": [0.1, 0.1, 0.4, 0.5],
    "cxcywh_norm": [0.25, 0.3, 0.3, 0.4],
    "qwen1000": [100, 100, 400, 500],
}


def test_known_cover_every_format() -> None:
    assert set(KNOWN) == set(BBOX_FORMATS)


@pytest.mark.parametrize("fmt", BBOX_FORMATS)
def test_known_box_in_every_format(fmt: str) -> None:
    assert to_xyxy(KNOWN[fmt], fmt, 200, 100) == pytest.approx((20, 10, 80, 50))
    assert from_xyxy(Box(20, 10, 80, 50), fmt, 200, 100) == pytest.approx(KNOWN[fmt])


@st.composite
def box_in_image(draw: st.DrawFn) -> tuple[Box, int, int]:
    """A box with positive size lying inside a random image."""
    width = draw(st.integers(1, 10_000))
    height = draw(st.integers(1, 10_000))
    fraction = st.floats(0.0, 1.0)
    xs = sorted([draw(fraction) * width, draw(fraction) * width])
    ys = sorted([draw(fraction) * height, draw(fraction) * height])
    # Boxes under a thousandth of a pixel are not boxes; keep away from zero size.
    xs[1] = min(float(width), xs[1] + 1e-3)
    xs[0] = min(xs[0], xs[1] - 1e-3)
    ys[1] = min(float(height), ys[1] + 1e-3)
    ys[0] = min(ys[0], ys[1] - 1e-3)
    return Box(xs[0], ys[0], xs[1], ys[1]), width, height


def _close(a: list[float], b: list[float], scale: float) -> bool:
    # Relative 1e-6, with an absolute floor relative to the image so that a
    # coordinate of 1e-300 px is not held to 1e-306 px.
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6 * scale) for x, y in zip(a, b))


@PROPERTY
@given(case=box_in_image(), fmt=st.sampled_from(BBOX_FORMATS))
def test_round_trip_box_to_format_and_back(case: tuple[Box, int, int], fmt: str) -> None:
    box, w, h = case
    values = from_xyxy(box, fmt, w, h)
    back = to_xyxy(values, fmt, w, h)
    assert _close(list(back), box.as_list(), max(w, h))
    # And the other direction, starting from the values in fmt.
    unit = 1.0 if fmt.endswith("_norm") else 1000.0 if fmt == "qwen1000" else max(w, h)
    assert _close(from_xyxy(Box(*back), fmt, w, h), values, unit)


@PROPERTY
@given(case=box_in_image(), fmt=st.sampled_from(BBOX_FORMATS))
def test_parse_keeps_every_valid_box_unchanged(case: tuple[Box, int, int], fmt: str) -> None:
    box, w, h = case
    parsed = parse_boxes([from_xyxy(box, fmt, w, h)], fmt, w, h, min_size=0.0)
    assert parsed.dropped == []
    [(index, kept)] = parsed.boxes
    assert index == 0
    assert _close(kept.as_list(), box.as_list(), max(w, h))
    # Float noise at the border is not reported as clipping.
    assert parsed.clipped == []


def test_to_xyxy_rejects_wrong_count_and_format() -> None:
    with pytest.raises(ValueError, match="4 values"):
        to_xyxy([1, 2, 3], "xyxy", 10, 10)
    with pytest.raises(BoxFormatError, match="xywh, xyxy, cxcywh"):
        to_xyxy([1, 2, 3, 4], "yxyx", 10, 10)
    with pytest.raises(BoxFormatError):
        from_xyxy(Box(1, 2, 3, 4), "pixels", 10, 10)


# --- parse_boxes: accepted shapes -----------------------------------------


def _kept(parsed: ParsedBoxes) -> list[list[float]]:
    return [box.as_list() for _, box in parsed.boxes]


@pytest.mark.parametrize("raw", [None, [], "[]", "null", ()])
def test_no_boxes(raw: object) -> None:
    parsed = parse_boxes(raw, "xywh", 100, 100)
    assert parsed.boxes == [] and parsed.dropped == [] and parsed.clipped == []
    assert parsed.num_input == 0


@pytest.mark.parametrize(
    "raw",
    [
        [[10, 20, 30, 40]],
        ((10, 20, 30, 40),),
        [10, 20, 30, 40],  # a bare box without the outer list
        "[[10, 20, 30, 40]]",  # DataFlow JSONL with the list stored as text
        "[10, 20, 30, 40]",
        [["10", " 20", "30.0", "4e1"]],  # quoted numbers
        {"bbox": [10, 20, 30, 40], "category_id": 3},  # one COCO annotation
        [{"bbox": [10, 20, 30, 40]}],
        [{"x": 10, "y": 20, "w": 30, "h": 40}],
        [{"x1": 10, "y1": 20, "x2": 40, "y2": 60}],
        [{"xmin": 10, "ymin": 20, "xmax": 40, "ymax": 60, "label": "cat"}],
    ],
)
def test_accepted_shapes(raw: object) -> None:
    parsed = parse_boxes(raw, "xywh", 100, 100)
    assert _kept(parsed) == [[10.0, 20.0, 40.0, 60.0]]
    assert parsed.boxes[0][0] == 0
    assert parsed.dropped == [] and parsed.num_input == 1


def test_keyed_dicts_ignore_fmt_but_coco_bbox_uses_it() -> None:
    raw = [{"bbox": [0.1, 0.2, 0.3, 0.4]}, {"x1": 10, "y1": 20, "x2": 40, "y2": 60}]
    parsed = parse_boxes(raw, "xywh_norm", 100, 100)
    for kept in _kept(parsed):
        assert kept == pytest.approx([10, 20, 40, 60])
    assert len(parsed.boxes) == 2


def test_kept_boxes_keep_source_index_and_order() -> None:
    raw = [[0, 0, 10, 10], [1, 2, "x", 4], [5, 5, 10, 10], [500, 500, 10, 10]]
    parsed = parse_boxes(raw, "xywh", 100, 100)
    assert [i for i, _ in parsed.boxes] == [0, 2]
    assert [(d.index, d.reason) for d in parsed.dropped] == [(1, "not_numeric"), (3, "outside_image")]
    assert parsed.num_input == 4


# --- parse_boxes: every drop reason and its message -------------------------


@pytest.mark.parametrize(
    "box, reason, detail",
    [
        ([10, "a", 5, 5], "not_numeric", "box 0 [10, 'a', 5, 5]: value 'a' is not a number"),
        ([10, True, 5, 5], "not_numeric", "box 0 [10, True, 5, 5]: value True is not a number"),
        ([10, None, 5, 5], "not_numeric", "value None is not a number"),
        ([10, [1], 5, 5], "not_numeric", "value [1] is not a number"),
        ([10, float("nan"), 5, 5], "not_finite", "value nan is not finite"),
        ([10, 10, float("inf"), 5], "not_finite", "value inf is not finite"),
        ([10, "-inf", 5, 5], "not_finite", "value '-inf' is not finite"),
        ([10, 10, 10**400, 5], "not_finite", "is not finite"),
        ([1e308, 10, 1e308, 5], "not_finite", "coordinates overflow when read as xywh"),
        ([10, 10, 5], "wrong_arity", "box 0 [10, 10, 5]: expected 4 values, got 3"),
        ([[1, 2, 3, 4, 5]], "wrong_arity", "expected 4 values, got 5"),
        ([10, 10, 0, 5], "non_positive_size", "width 0 and height 5 px when read as xywh"),
        ([10, 10, 5, -5], "non_positive_size", "both must be > 0"),
        ([100, 10, 5, 5], "outside_image", "[100, 10, 105, 15] px (xyxy, read as xywh) does not overlap the 100x50 image"),
        ([-20, 10, 20, 5], "outside_image", "does not overlap"),  # touches the left edge only
        ([10, 10, 0.5, 5], "too_small", "0.5x5 px is below min_size=1 px"),
        ([-9.5, 10, 10, 5], "too_small", "0.5x5 px after clipping is below min_size=1 px"),
    ],
)
def test_drop_reasons(box: list, reason: str, detail: str) -> None:
    raw = [box] if not (box and isinstance(box[0], list)) else box
    parsed = parse_boxes(raw, "xywh", 100, 50)
    assert parsed.boxes == [] and parsed.clipped == []
    [issue] = parsed.dropped
    assert issue.index == 0
    assert issue.reason == reason
    assert detail in issue.detail
    assert issue.detail.startswith("box 0 ")


def test_not_numeric_names_the_box_index() -> None:
    raw = [[0, 0, 5, 5]] * 3 + [[10, "a", 5, 5]]
    [issue] = parse_boxes(raw, "xywh", 100, 100).dropped
    assert issue.detail == "box 3 [10, 'a', 5, 5]: value 'a' is not a number"
    assert issue.raw == [10, "a", 5, 5]


@pytest.mark.parametrize(
    "item, detail",
    [
        (5, "expected a list of 4 numbers or a dict, got int"),
        ("10,20,30,40", "expected a list of 4 numbers or a dict, got str"),
        ({"x": 1, "y": 2, "w": 3}, "dict has x, y, w but lacks h"),
        ({"label": "cat"}, "dict has no 'bbox' key"),
        ({"bbox": "1 2 3 4"}, "'bbox' is str, not a list of 4 numbers"),
    ],
)
def test_wrong_arity_of_non_boxes(item: object, detail: str) -> None:
    parsed = parse_boxes([[0, 0, 5, 5], item], "xywh", 100, 100)
    assert len(parsed.boxes) == 1
    [issue] = parsed.dropped
    assert (issue.index, issue.reason) == (1, "wrong_arity")
    assert detail in issue.detail


def test_min_size_is_configurable() -> None:
    raw = [[0, 0, 3, 3]]
    assert len(parse_boxes(raw, "xywh", 10, 10, min_size=4).dropped) == 1
    assert len(parse_boxes(raw, "xywh", 10, 10, min_size=3).boxes) == 1
    assert len(parse_boxes([[0, 0, 0.01, 0.01]], "xywh", 10, 10, min_size=0).boxes) == 1


def test_format_hints_in_messages() -> None:
    # Normalised numbers declared as pixels come out as sub-pixel boxes.
    [issue] = parse_boxes([[0.1, 0.2, 0.3, 0.4]], "xywh", 640, 480).dropped
    assert issue.reason == "too_small" and "is the format xywh_norm?" in issue.detail
    # Pixel numbers declared as normalised land far outside the image.
    [issue] = parse_boxes([[196, 104, 310, 495]], "xywh_norm", 640, 480).dropped
    assert issue.reason == "outside_image" and "is the format really xywh_norm?" in issue.detail


def test_raw_is_json_serialisable() -> None:
    raw = [(1, "a", 3, 4), (1, 2), {"bbox": (1, 2, float("nan"), 4)}]
    parsed = parse_boxes(raw, "xywh", 100, 100)
    assert [d.raw for d in parsed.dropped][:2] == [[1, "a", 3, 4], [1, 2]]
    json.dumps([dataclasses.asdict(d) for d in parsed.dropped])


# --- parse_boxes: clipping ----------------------------------------------------


def test_partly_outside_box_is_clipped_kept_and_reported() -> None:
    raw = [[-10, 20, 50, 100], [10, 10, 20, 20]]
    parsed = parse_boxes(raw, "xywh", 100, 80)
    assert _kept(parsed) == [[0.0, 20.0, 40.0, 80.0], [10.0, 10.0, 30.0, 30.0]]
    [issue] = parsed.clipped
    assert (issue.index, issue.reason) == (0, "clipped")
    assert issue.raw == [-10, 20, 50, 100]
    assert "clipped from [-10, 20, 40, 120] to [0, 20, 40, 80] px" in issue.detail
    assert "100x80 image" in issue.detail
    assert parsed.dropped == []


def test_box_filling_the_image_is_not_clipped() -> None:
    parsed = parse_boxes([[0, 0, 1, 1]], "xywh_norm", 1536, 832)
    assert _kept(parsed) == [[0.0, 0.0, 1536.0, 832.0]]
    assert parsed.clipped == []


# --- parse_boxes: whole-field errors --------------------------------------


@pytest.mark.parametrize(
    "raw, match",
    [
        ("[[1, 2, 3", "not valid JSON"),
        ("", "not valid JSON"),
        ("5", "got int"),
        (5, "bbox must be a list of boxes, got int"),
        (3.5, "got float"),
        (True, "got bool"),
        ({1, 2}, "got set"),
    ],
)
def test_unusable_field_raises(raw: object, match: str) -> None:
    with pytest.raises(BoxFormatError, match=match):
        parse_boxes(raw, "xywh", 100, 100)


def test_bad_json_message_is_truncated() -> None:
    with pytest.raises(BoxFormatError) as info:
        parse_boxes("[" + "1, " * 1000, "xywh", 100, 100)
    assert "[1, 1, 1" in str(info.value)
    assert len(str(info.value)) < 300


def test_unknown_format_lists_the_formats() -> None:
    with pytest.raises(BoxFormatError) as info:
        parse_boxes(None, "XYWH", 100, 100)
    for fmt in BBOX_FORMATS:
        assert fmt in str(info.value)


@pytest.mark.parametrize("width, height", [(0, 10), (10, 0), (-1, 10), (10, float("nan"))])
def test_bad_image_size_raises_value_error(width: float, height: float) -> None:
    with pytest.raises(ValueError, match="image size") as info:
        parse_boxes([[1, 1, 2, 2]], "xywh", width, height)  # type: ignore[arg-type]
    assert not isinstance(info.value, BoxFormatError)


def test_negative_min_size_raises() -> None:
    with pytest.raises(ValueError, match="min_size"):
        parse_boxes([], "xywh", 10, 10, min_size=-1)


# --- parse_boxes: never crashes, never loses a box --------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["12.5", "nan", "inf", "-3", "1e400", "[1,2,3,4]", "{}"]),
)
# Four plausible numbers, so that junk also holds boxes that get kept or clipped.
near_boxes = st.lists(
    st.one_of(st.integers(-100, 6000), st.floats(-100.0, 6000.0), st.just("12.5")),
    min_size=4,
    max_size=4,
)
junk = st.recursive(
    st.one_of(scalars, near_boxes),
    lambda children: st.one_of(
        st.lists(st.one_of(children, near_boxes), max_size=6),
        st.tuples(children, children, children, children),
        st.dictionaries(
            st.sampled_from(["bbox", "x", "y", "w", "h", "x1", "y1", "x2", "y2", "xmin", "label"]),
            children,
            max_size=5,
        ),
    ),
    max_leaves=20,
)


def _expected_count(raw: object) -> int:
    """How many boxes the raw field holds, by the documented rules."""
    if isinstance(raw, str):
        raw = json.loads(raw)
    if raw is None:
        return 0
    if isinstance(raw, dict):
        return 1
    if raw and not any(isinstance(v, (list, tuple, dict)) for v in raw):
        return 1
    return len(raw)


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@PROPERTY
@given(
    raw=st.one_of(junk, junk.map(lambda v: json.dumps(v) if not isinstance(v, str) else v)),
    fmt=st.sampled_from(BBOX_FORMATS),
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    min_size=st.sampled_from([0.0, 1.0, 7.5]),
)
def test_parse_never_crashes_or_loses_boxes(
    raw: object, fmt: str, width: int, height: int, min_size: float
) -> None:
    try:
        parsed = parse_boxes(raw, fmt, width, height, min_size=min_size)
    except BoxFormatError:
        return
    count = _expected_count(raw)
    assert parsed.num_input == count == len(parsed.boxes) + len(parsed.dropped)
    seen = sorted([i for i, _ in parsed.boxes] + [d.index for d in parsed.dropped])
    assert seen == list(range(count))
    kept = {i for i, _ in parsed.boxes}
    assert {c.index for c in parsed.clipped} <= kept
    for _, box in parsed.boxes:
        assert 0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height
        assert box.width >= min_size and box.height >= min_size
    for issue in parsed.dropped + parsed.clipped:
        assert issue.detail.startswith(f"box {issue.index} ")
        json.dumps(issue.raw)


# --- Box ----------------------------------------------------------------------


def test_box_basics() -> None:
    box = Box(10, 20, 40, 60)
    assert (box.width, box.height, box.area) == (30.0, 40.0, 1200.0)
    assert box.as_list() == [10.0, 20.0, 40.0, 60.0]
    assert all(isinstance(v, float) for v in box.as_list())
    assert Box(1.23456, 0, 2, 3).as_list(2) == [1.23, 0.0, 2.0, 3.0]
    assert Box(1.4, 1.6, 2.5, 3.5).round_int() == [1, 2, 2, 4]  # half to even
    assert box.scale(0.5, 2) == Box(5, 40, 20, 120)
    with pytest.raises(dataclasses.FrozenInstanceError):
        box.x1 = 0  # type: ignore[misc]


# --- output helpers -------------------------------------------------------


def test_dataflow_mm_normalized_bbox_examples() -> None:
    # DataFlow-MM's region-caption docs: bbox [[196, 104, 310, 495]] (xywh) gives
    # normalized_bbox [[0.128, 0.125, 0.329, 0.72]]; those values pin the image
    # to 1536x832. Its second example is a 427x640 COCO image.
    [(_, box)] = parse_boxes([[196, 104, 310, 495]], "xywh", 1536, 832).boxes
    assert normalized_xyxy(box, 1536, 832, ndigits=3) == [0.128, 0.125, 0.329, 0.72]
    assert normalized_xyxy(box, 1536, 832) == [0.1276, 0.125, 0.3294, 0.72]
    raw = [[19.1299991607666, 359.2300109863281, 148.08999633789062, 271.32000732421875]]
    [(_, box)] = parse_boxes(raw, "xywh", 427, 640).boxes
    assert normalized_xyxy(box, 427, 640, ndigits=3) == [0.045, 0.561, 0.392, 0.985]


def test_pad_normalized_pads_and_never_truncates() -> None:
    one = [[0.1, 0.2, 0.3, 0.4]]
    assert pad_normalized(one, 3) == one + [[0.0, 0.0, 0.0, 0.0]] * 2
    many = [[0.1, 0.2, 0.3, 0.4]] * 12
    assert pad_normalized(many, 10) == many
    assert pad_normalized([], 0) == []
    assert pad_normalized([], 2) == [[0.0, 0.0, 0.0, 0.0]] * 2
    padded = pad_normalized(one, 2)
    padded[0][0] = 9.0
    padded[1][0] = 9.0
    assert one == [[0.1, 0.2, 0.3, 0.4]]  # the input is not aliased
    assert padded[1] is not pad_normalized(one, 2)[1]


def test_chunk() -> None:
    assert [len(c) for c in chunk(range(23), 10)] == [10, 10, 3]
    assert chunk(range(23), 10)[2] == [20, 21, 22]
    assert chunk([], 10) == []
    assert chunk("abc", 1) == [["a"], ["b"], ["c"]]
    assert chunk(range(20), 10) == [list(range(10)), list(range(10, 20))]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk size"):
            chunk([1], bad)  # type: ignore[arg-type]


def test_issue_and_parsed_are_plain_dataclasses() -> None:
    issue = BoxIssue(index=2, reason="clipped", detail="d", raw=[1, 2, 3, 4])
    parsed = ParsedBoxes(boxes=[(0, Box(0, 0, 1, 1))], dropped=[issue])
    assert parsed.num_input == 2
    assert ParsedBoxes().num_input == 0


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.integers(-300, 600), st.floats(-300, 600), st.integers(10**308, 10**400),
                  st.floats(allow_nan=True, allow_infinity=True)),
        min_size=4, max_size=4,
    ),
    fmt=st.sampled_from(BBOX_FORMATS),
)
def test_a_kept_box_is_what_to_xyxy_reads_clipped(values: list, fmt: str) -> None:
    """parse_boxes reads coordinates as to_xyxy does (ints, floats, ints too big for a float),
    then clips them to the image: its own unchecked path agrees with the checked public one."""
    parsed = parse_boxes([values], fmt, 224, 160, min_size=0.0)
    if not parsed.boxes:
        assert len(parsed.dropped) == 1
        return
    x1, y1, x2, y2 = to_xyxy(values, fmt, 224, 160)  # kept, so every value fits a float
    assert parsed.boxes[0][1].as_list() == [max(x1, 0.0), max(y1, 0.0), min(x2, 224.0), min(y2, 160.0)]
