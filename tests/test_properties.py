"""Property-based tests (hypothesis) of the pure modules: whatever the input or the
engine answer, they return a value or raise the one documented error, in bounded work.

Each ``@settings`` keeps this file fast (a few seconds in all); a finding of these
tests is kept as a fixed case next to the property that found it.
"""

from __future__ import annotations

import json
import math
import pickle
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from regioncap.boxes import BoxFormatError
from regioncap.data import DataError
from regioncap.images import ImageLoadError

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- errors cross processes


@pytest.mark.parametrize("error", [
    ImageLoadError("corrupt_image", "a.png: image data is truncated or corrupt (broken data stream)"),
    BoxFormatError("bbox is not a list"),
    DataError("rows.jsonl line 3: bad row"),
], ids=lambda e: type(e).__name__)
def test_row_errors_survive_pickling(error):
    """A worker process sends its error back pickled: a failed unpickle looks like a dead worker."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    if isinstance(error, ImageLoadError):
        assert (back.kind, back.message) == (error.kind, error.message)


# --------------------------------------------------------------------------- answer parsing

from regioncap import prompts  # noqa: E402
from regioncap.prompts import parse_answer  # noqa: E402

#: The answer-line expression parse_answer used before the hand-written reader
#: (it backtracked over runs of spaces: N spaces and a letter cost ~N^4). Kept as
#: the reference the reader must agree with, on lines short enough for it.
OLD_LINE = __import__("re").compile(
    r"""^\s*(?:[-*\u2022]\s*)?(?:\*\*)?\s*
        (?:<\s*region\s*(?P<tag>\d+)\s*>|(?:region|box|mark)?\s*\#?\s*(?P<num>\d+))
        \s*(?:\*\*)?\s*[:.)\-\u2013\u2014]\s*(?:\*\*)?\s*(?P<text>.*\S)\s*$""",
    __import__("re").IGNORECASE | __import__("re").VERBOSE,
)


def old_line(line: str):
    """What OLD_LINE read, less the one deliberate change: a number of more than
    MAX_NUMBER_DIGITS digits is not a region number (int() refused 5000 digits)."""
    m = OLD_LINE.match(line)
    if m is None or len(m.group("tag") or m.group("num")) > prompts.MAX_NUMBER_DIGITS:
        return None
    return int(m.group("tag") or m.group("num")), m.group("text")


#: Pieces an answer line is made of, so that random lines often almost match.
LINE_PIECES = st.sampled_from([
    " ", "  ", "\t", "\u3000", "\x1c", "\r", "-", "*", "**", "\u2022", "<", ">", "region", "Region", "REGION",
    "box", "BOX", "mark", "#", "1", "2", "12", "\u0663", "\u00b2", "\u2460", ":", ".", ")", "\u2013",
    "\u2014", "a", "cat", "x", "\u0130", "\u212a", "\ud800",
])

#: Lines shaped like an answer line (each part present or not, some parts garbled).
shaped_lines = st.tuples(
    st.sampled_from(["", " ", "\t "]), st.sampled_from(["", "-", "*", "\u2022", "- ", "* "]),
    st.sampled_from(["", "**", "** ", "*"]),
    st.sampled_from(["{}", "<region{}>", "< Region {} >", "<region{}", "region {}", "Box#{}", "mark # {}", "#{}",
                     "region{}", "<box{}>", "{}x"]),
    st.sampled_from(["1", "12", "\u0663", "", "\u00b2", "1" * 19]),
    st.sampled_from(["", " ", "**", " ** "]), st.sampled_from([":", ".", ")", "-", "\u2013", "\u2014", "", ";"]),
    st.sampled_from(["", " ", "**", "** ", " **"]), st.sampled_from(["", "a cat", "*", " x ", "**", "\u3000"]),
).map(lambda p: p[0] + p[1] + p[2] + p[3].format(p[4]) + "".join(p[5:]))
answer_lines = st.one_of(shaped_lines, shaped_lines, st.lists(LINE_PIECES, max_size=10).map("".join),
                         st.text(max_size=16))


@settings(max_examples=600, deadline=None)
@given(answer_lines)
def test_line_reader_reads_what_the_old_expression_matched(line):
    assert prompts._match_line(line) == old_line(line)


@pytest.mark.parametrize("line,expected", [
    ("1: a cat", (1, "a cat")), ("- **Region 2:** a red car ", (2, "a red car")), ("<region3> - x", (3, "x")),
    ("* **1**: **", (1, "**")), ("***1: y", (1, "y")), ("box #4) z", (4, "z")), ("mark 5 \u2014 w", (5, "w")),
    ("1:   ", None), ("region: x", None), ("<region 1: x", None), ("\u0661\u0662. arabic", (12, "arabic")),
    ("1" * 19 + ": too long", None), ("1" * 5000 + ": way too long", None),
])
def test_line_reader_cases(line, expected):
    assert prompts._match_line(line) == expected


#: Answers built to hurt: what once cost ~N^4 regex steps, numbers over Python's
#: int digit limit, JSON deeper than the recursion limit, lone surrogates.
ADVERSARIAL = [
    " " * 100_000 + "x",
    "1" + " " * 100_000 + "x",
    "region" + " " * 100_000 + "#",
    "- ** " + " \t" * 50_000 + "region",
    "box " * 25_000 + "1",
    "1" * 5000 + ": a cat",
    "<region" + "9" * 5000 + "> a cat",
    '[{"id": ' + "7" * 5000 + ', "caption": "a cat"}]',
    '[{"id": "' + "7" * 5000 + '", "caption": "a cat"}]',
    "[" * 100_000 + "]" * 100_000,
    '{"regions": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '[{"id": ' + "[" * 5000 + "]" * 5000 + ', "caption": "x"}]',
    "1: \ud800 a lone surrogate\n2: \udfff",
    "In region 1" + " " * 100_000 + "and box" + " " * 100_000 + "2 " + "3" * 5000,
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
@pytest.mark.parametrize("answer_format", ["lines", "json", "free"])
def test_adversarial_answers_parse(text, answer_format):
    """Each is 10k-200k characters: with the old expression the first took hours."""
    parsed = parse_answer(text, [1, 2], answer_format)
    assert set(parsed.captions) <= {1, 2}
    assert all(isinstance(c, str) and c for c in parsed.captions.values())


#: Text with lone surrogates mixed in (st.text() leaves category Cs out by default).
surrogate_text = st.text(alphabet=st.one_of(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                                             st.sampled_from("1: region<>[]{}\"id"), st.characters()))
answer_text = st.one_of(
    st.text(), surrogate_text,
    st.lists(st.one_of(LINE_PIECES, st.text(max_size=5), st.just("\n")), max_size=40).map("".join),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                 lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(
                     st.sampled_from(["id", "region", "caption", "description", "regions", "x"]), c, max_size=3)),
                 max_leaves=12).map(lambda v: json.dumps(v)),
    st.integers(1, 3000).map(lambda n: "1" * n + ": x"),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
)


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@settings(max_examples=300, deadline=None)
@given(answer_text, st.lists(st.integers(1, 12), min_size=1, max_size=4, unique=True),
       st.sampled_from(["lines", "json", "free"]))
def test_parse_answer_never_raises(text, numbers, answer_format):
    parsed = parse_answer(text, numbers, answer_format)
    assert set(parsed.captions) <= set(numbers)
    assert all(isinstance(c, str) and c.strip() for c in parsed.captions.values())
    assert isinstance(parsed.format_ok, bool)


# --------------------------------------------------------------------------- caption checks

from regioncap.metrics import annotate_record, caption_flags  # noqa: E402
from regioncap.record_types import Record  # noqa: E402


@pytest.mark.parametrize("caption,flags", [
    ("\u2460 cars parked", []), ("3\u00b2 apples", []), ("\u00b2\u00b3 dogs", []),
    ("\u0663 red cars", ["many_objects"]), ("12 apples", ["many_objects"]), ("7" * 5000 + " apples", []),
    ("0" * 4999 + "5 apples", []),
])
def test_caption_flags_on_odd_numerals(caption, flags):
    assert caption_flags(caption) == flags


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c, max_size=3)),
    max_leaves=10,
)
captions = st.one_of(
    st.none(), st.text(), surrogate_text, st.text(alphabet="0123456789\u00b2\u00b3\u2460\u0663\u0661 ,&aes", max_size=30),
    st.lists(st.sampled_from(["three", "3", "\u2460", "3\u00b2", "cars", "a dog", ",", "and", "with", "the image",
                              "people", "\ud800", "9" * 20]), max_size=12).map(" ".join),
)


@settings(max_examples=400, deadline=None)
@given(captions)
def test_caption_flags_never_raise(caption):
    assert set(caption_flags(caption)) <= {"lists_objects", "many_objects", "describes_image"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.fixed_dictionaries({"caption": captions, "source_index": st.one_of(st.integers(-2, 4), json_values)}),
                max_size=4),
       st.one_of(json_values, st.text(alphabet="[]\"a ,1", max_size=20), st.just("[" * 5000 + "]" * 5000),
                 st.just("[" + "1" * 5000 + "]")))
def test_annotate_record_never_raises(regions, references):
    record = annotate_record(Record.from_dict({"regions": regions, "references": references})).to_dict()
    assert all(isinstance(r["flags"], list) for r in record["regions"])


# --------------------------------------------------------------------------- the JSON writer

from regioncap.records import dumps  # noqa: E402


def strict_loads(text: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity, as strict readers do."""
    def refuse(name: str) -> Any:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


odd_text = st.one_of(st.text(), st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
                     st.sampled_from(["\ud800", "a\udfffb", "\ud83d\ude00", "\ud83d"]))
odd_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), odd_text,
                       st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308 * 10]),
                       st.integers(4400, 6000).map(lambda n: 10**n))
odd_values = st.recursive(
    odd_scalar,
    lambda c: st.one_of(st.lists(c, max_size=4), st.tuples(c, c),
                        st.dictionaries(st.one_of(odd_text, st.integers(), st.floats(), st.none()), c, max_size=4)),
    max_leaves=20,
)


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@settings(max_examples=400, deadline=None)
@given(odd_values, st.sampled_from([None, 2]))
def test_dumps_always_writes_strict_utf8_json(value, indent):
    text = dumps(value, indent=indent)
    text.encode("utf-8")
    back = strict_loads(text)
    if isinstance(value, float) and not math.isfinite(value):
        assert back is None


def test_dumps_cleans_what_json_refuses():
    import numpy as np

    loop: dict = {}
    loop["self"] = loop
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    record = {"nan": float("nan"), "inf": [float("inf"), 1e400], "np": np.float32("nan"), "arr": np.array([1.0, np.inf]),
              "text": "a\ud800b", "pair": "\ud83d\ude00", "big": 10**5000, "loop": loop, "deep": deep, (1, 2): "t"}
    back = strict_loads(dumps(record))
    assert back["nan"] is None and back["inf"] == [None, None] and back["np"] is None and back["arr"] == [1.0, None]
    assert back["text"] == "a\ufffdb" and back["pair"] == "\U0001f600" and back["big"] is None
    assert back["loop"] == {"self": "<circular reference>"} and back["[1, 2]"] == "t"
    ordinary = {"a": [1, 2.5, "x", None, True], "b": {"c": "\u00e9"}}
    assert dumps(ordinary) == json.dumps(ordinary, ensure_ascii=False)


# --------------------------------------------------------------------------- boxes

from regioncap.boxes import BBOX_FORMATS, parse_boxes  # noqa: E402

box_number = st.one_of(
    st.floats(), st.integers(-10**6, 10**6), st.integers().map(lambda n: n * 10**400),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-1e400", "NaN", "12.5", "", "x", None, True]),
    st.floats(-2.0, 2.0), st.floats(0, 300),
)
one_box = st.one_of(
    st.lists(box_number, min_size=4, max_size=4), st.lists(box_number, max_size=6),
    st.fixed_dictionaries({"x": box_number, "y": box_number, "w": box_number, "h": box_number}),
    st.fixed_dictionaries({"bbox": st.lists(box_number, min_size=4, max_size=4)}),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(one_box, max_size=6), st.sampled_from(BBOX_FORMATS), st.integers(1, 5000), st.integers(1, 5000),
       st.sampled_from([False, True]))
@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_parse_boxes_drops_non_finite_and_writes_strict_json(boxes, fmt, width, height, as_text):
    raw: Any = boxes
    if as_text:  # a JSON string of the list, as DataFlow-MM writes it (NaN/Infinity spelled as Python does)
        raw = json.dumps(boxes, default=str)
    parsed = parse_boxes(raw, fmt, width, height)
    assert parsed.num_input == len(boxes)
    for _, box in parsed.boxes:
        assert all(math.isfinite(v) for v in box.as_list())
        assert 0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height
    for issue in parsed.dropped + parsed.clipped:
        strict_loads(json.dumps([issue.raw, issue.detail], allow_nan=False))


@pytest.mark.parametrize("box,raw", [
    ([float("nan"), 1, 5, 5], ["NaN", 1, 5, 5]), ([1, 1, float("inf"), 5], [1, 1, "Infinity", 5]),
    ([1e400, 1, 5, 5], ["Infinity", 1, 5, 5]), ([1, 1, -float("inf"), 5], [1, 1, "-Infinity", 5]),
    (["nan", 1, 5, 5], ["nan", 1, 5, 5]), ([10**5000, 1, 5, 5], ["<int that cannot be shown>", 1, 5, 5]),
], ids=["nan", "inf", "1e400", "-inf", "nan_text", "huge_int"])
def test_non_finite_boxes_are_dropped_with_a_reason(box, raw):
    parsed = parse_boxes([box, [1, 1, 5, 5]], "xywh", 64, 48)
    assert len(parsed.boxes) == 1 and [d.reason for d in parsed.dropped] == ["not_finite"]
    assert strict_loads(json.dumps(parsed.dropped[0].raw, allow_nan=False)) == raw


# --------------------------------------------------------------------------- data fingerprint

from regioncap.manifest import _hash_and_count_lines, data_fingerprint  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300).map(lambda b: b.replace(b"\x00", b"\n")) | st.lists(
    st.sampled_from([b"\n", b" ", b"\t", b"\r\n", b"x", b"{}", b"  \n"]), max_size=40).map(b"".join),
    st.integers(1, 17))
def test_fingerprint_hash_and_rows_match_a_whole_file_read(tmp_path_factory, data, chunk):
    path = tmp_path_factory.getbasetemp() / "fp.jsonl"
    path.write_bytes(data)
    expected = (__import__("hashlib").sha256(data).hexdigest(), sum(1 for ln in data.split(b"\n") if ln.strip()))
    assert _hash_and_count_lines(path, chunk=chunk) == expected


def test_a_single_50_mb_line_fingerprints(tmp_path):
    """Linear in the line length: a 50 MB row once cost O(n^2) bytes copied (200 MB: 2.5 min);
    and a 256 KB line read one byte at a time (before: 32 GB copied) still finishes."""
    path = tmp_path / "rows.jsonl"
    line = b'{"image": "a.png", "pad": "' + b"x" * (50 << 20) + b'"}'
    path.write_bytes(b"\n" + line + b"\n   \n" + b'{"image": "b.png"}')
    fp = data_fingerprint({"_target_": "regioncap.data.JsonlSource", "path": str(path)})
    assert fp["rows"] == 2 and fp["method"] == "file_sha256"
    assert fp["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    small = tmp_path / "one.jsonl"
    small.write_bytes(b"y" * (1 << 18))
    assert _hash_and_count_lines(small, chunk=1)[1] == 1


# --------------------------------------------------------------------------- crops

from regioncap.families.qwen import smart_resize  # noqa: E402
from regioncap.images import MAX_ASPECT_RATIO, crop_aspect_limit, crop_with_margin  # noqa: E402


@st.composite
def image_and_box(draw):
    """An image size the model accepts (<= 200:1) and a box overlapping it, as parse_boxes keeps."""
    long_side = draw(st.integers(1, 9000))
    # At most 4 M pixels: a real image is made per example.
    short_side = draw(st.integers(max(1, -(-long_side // MAX_ASPECT_RATIO)), min(long_side, 4_000_000 // long_side)))
    W, H = (long_side, short_side) if draw(st.booleans()) else (short_side, long_side)
    x1 = draw(st.floats(0, W, exclude_max=True))
    y1 = draw(st.floats(0, H, exclude_max=True))
    share = st.one_of(st.floats(1e-6, 1), st.sampled_from([1e-6, 0.001, 1.0]))  # thin boxes too
    x2 = min(W, x1 + max(draw(share) * (W - x1), 1e-6))
    y2 = min(H, y1 + max(draw(share) * (H - y1), 1e-6))
    return (W, H), (x1, y1, x2, y2)


#: (min_pixels, max_pixels): the shipped model configs and random ones with max >= 2 * min.
crop_budgets = st.one_of(
    st.sampled_from([(3136, 1003520), (3136, 50176), (3136, 3136 * 2)]),
    st.tuples(st.integers(1, 512), st.integers(2, 64)).map(lambda t: (t[0] * 784, t[0] * 784 * t[1])),
)


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@settings(max_examples=400, deadline=None)
@given(image_and_box(), st.floats(0, 2), st.booleans(), crop_budgets, st.booleans())
def test_crop_and_target_size_fit_the_model(size_box, margin, square, budget, own_limit):
    """A crop of any box of any image the model accepts is usable: smart_resize takes it
    (nothing raised at all), its resized size is within 200:1, and with the budget's
    crop_aspect_limit within max_pixels; the box stays inside the crop."""
    (W, H), box = size_box
    mn, mx = budget
    image = Image.new("L", (W, H), 255)
    kwargs = {"max_aspect": crop_aspect_limit(mx)} if own_limit else {}
    crop, (left, top, right, bottom) = crop_with_margin(image, box, margin, square=square, **kwargs)
    tw, th = smart_resize(crop.width, crop.height, min_pixels=mn, max_pixels=mx)
    assert crop.size == (right - left, bottom - top)
    assert left <= max(box[0], 0) and top <= max(box[1], 0)
    assert right >= min(box[2], W) and bottom >= min(box[3], H)
    assert max(crop.size) <= kwargs.get("max_aspect", 100) * min(crop.size)
    assert max(tw, th) <= MAX_ASPECT_RATIO * min(tw, th)
    if own_limit and crop.width * crop.height >= mn:
        # (A crop smaller than min_pixels is enlarged by Qwen's own rule, which rounds each side up
        # to 28 px: with min and max this close, e.g. 19x19 at (3136, 6272) -> 84x84, the result can
        # pass max_pixels, exactly as the model's processor computes it; test_target_size_matches_upstream.)
        assert tw * th <= mx, (crop.size, (tw, th), budget)
    if 0 <= left and 0 <= top and right <= W and bottom <= H:
        assert crop.getextrema() == (255, 255)  # no padding unless the rectangle leaves the image


def test_a_thin_box_on_a_6000x60_image_crops_to_a_usable_shape():
    image = Image.new("RGB", (6000, 60))
    crop, rect = crop_with_margin(image, (0, 10, 6000, 12), 0.1)
    assert rect == (0, 0, 6000, 60)
    tw, th = smart_resize(*crop.size, min_pixels=3136, max_pixels=1003520)
    assert max(tw, th) <= MAX_ASPECT_RATIO * min(tw, th)
    # On a budget of 64 tokens a crop may be 32:1: the image is padded above and below.
    crop, rect = crop_with_margin(image, (0, 10, 6000, 12), 0.1, max_aspect=crop_aspect_limit(50176))
    assert rect == (0, -64, 6000, 124) and crop.size == (6000, 188)
    assert smart_resize(*crop.size, min_pixels=3136, max_pixels=50176) == (1260, 28)  # 35280 px: within budget


def test_target_size_refuses_what_the_processor_would_refuse_after_rounding():
    with pytest.raises(ImageLoadError, match="resizes to 6160x28") as info:
        smart_resize(6150, 41, min_pixels=3136, max_pixels=1003520, source="strip.png")
    assert info.value.kind == "bad_aspect_ratio" and "strip.png" in info.value.message


def test_every_records_writer_writes_strict_json(tmp_path):
    """An engine answer holding a lone surrogate once failed the write (and the resume, the
    same way); an input's 1e400 was written as Infinity. Each writer now goes through dumps."""
    from regioncap.records import CommitWriter, JsonlWriter, rewrite_atomically

    record = {"index": 0, "answer": "1: a cat \ud800", "regions": [{"caption": "a \udfff dog", "bbox": [1e400, 0]}],
              "usage": {"prompt_tokens": float("nan")}}
    with CommitWriter(tmp_path / "a.jsonl", stage="caption") as w:
        w.commit([record])
    with JsonlWriter(tmp_path / "b.jsonl") as w:
        w.write(record)
    rewrite_atomically(tmp_path / "c.jsonl", [record])
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        (back,) = [strict_loads(line) for line in (tmp_path / name).read_text(encoding="utf-8").splitlines()]
        assert back["answer"] == "1: a cat \ufffd" and back["regions"][0] == {"caption": "a \ufffd dog",
                                                                              "bbox": [None, 0]}
        assert back["usage"] == {"prompt_tokens": None}
