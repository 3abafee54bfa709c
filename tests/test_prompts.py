"""Prompt text snapshots (a change to a prompt is a visible diff) and answer parsing."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import compose
from regioncap import prompts
from regioncap.families.qwen import Qwen2VL, Qwen25VL
from regioncap.strategies import build_strategy


def render(option: str, numbers, labels=None, regions_text=""):
    cfg = compose([f"prompt={option}"])
    labels = labels or [str(n) for n in numbers]
    noun = build_strategy(cfg).noun
    return prompts.build_prompt(cfg.prompt.template, numbers=numbers, labels=labels,
                                answer_format=cfg.prompt.answer_format, regions_text=regions_text, noun=noun)


def test_marked_prompt_snapshot():
    assert render("marked", [1, 2, 3]) == (
        "The image has 3 numbered boxes drawn on it, labelled 1, 2 and 3. For each box, describe the object "
        "or area inside it in one short sentence. Answer with exactly 3 lines, one per box, each in the form "
        "`<number>: <description>`, numbered 1 to 3, and nothing else."
    )


def test_marked_prompt_single_region_snapshot():
    assert render("marked", [1]) == (
        "The image has 1 numbered box drawn on it, labelled 1. For each box, describe the object or area "
        "inside it in one short sentence. Answer with exactly 1 line, one per box, each in the form "
        "`<number>: <description>`, numbered 1, and nothing else."
    )


def test_crop_prompt_snapshot():
    assert render("crop", [1]) == "Describe the main object or area in this image in one short sentence."


def test_coords_prompt_snapshot_qwen25():
    family = Qwen25VL()
    text = prompts.regions_text([1, 2], [family.box_text(b, (448, 448)) for b in ([10, 20, 110, 220], [0, 0, 28, 56])])
    assert render("coords", [1, 2], regions_text=text) == (
        "Here are 2 regions of the image, given as bounding boxes:\n"
        '1: {"bbox_2d": [10, 20, 110, 220]}\n'
        '2: {"bbox_2d": [0, 0, 28, 56]}\n'
        "For each region, describe the object or area inside it in one short sentence. Answer with exactly 2 "
        "lines, one per region, each in the form `<number>: <description>`, numbered 1 and 2, and nothing else."
    )


def test_coords_regions_qwen2_uses_box_tokens():
    # Qwen2-VL's grid is relative: a 1000x1000 image keeps the numbers.
    assert prompts.regions_text([1], [Qwen2VL().box_text((100, 200, 300, 400), (1000, 1000))]) == \
        "1: <|box_start|>(100,200),(300,400)<|box_end|>"


def test_dataflow_prompt_is_verbatim():
    text = render("dataflow", [1, 2, 3, 4], labels=[f"<region{n}>" for n in range(1, 5)])
    assert text == ("Describe the content of each marked region in the image. "
                    "There are 4 regions: <region1> to <region4>.")


def test_unknown_placeholder_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown placeholder"):
        prompts.build_prompt("Describe {thing}", numbers=[1], labels=["1"], answer_format="lines")


@pytest.mark.parametrize("text", [
    "1: a red car\n2: a tree\n3: the sky",
    "1. a red car\n2. a tree\n3. the sky",
    "**1:** a red car\n**2:** a tree\n**3:** the sky",
    "- Box 1: a red car\n- Box 2: a tree\n- Box 3: the sky",
    "<region1>: a red car\n<region2>: a tree\n<region3>: the sky",
    "Region 1 - a red car\nRegion 2 - a tree\nRegion 3 - the sky",
    '{"regions": [{"id": 1, "caption": "a red car"}, {"id": 2, "caption": "a tree"}, {"id": 3, "caption": "the sky"}]}',
    '```json\n[{"id": 1, "caption": "a red car"}, {"id": 2, "caption": "a tree"}, {"id": 3, "caption": "the sky"}]\n```',
    '{"1": "a red car", "2": "a tree", "3": "the sky"}',
])
def test_parse_answer_layouts(text):
    parsed = prompts.parse_answer(text, [1, 2, 3], "lines")
    assert parsed.captions == {1: "a red car", 2: "a tree", 3: "the sky"}


def test_parse_missing_and_unexpected_regions_are_not_invented():
    parsed = prompts.parse_answer("1: a cat\n4: a dog\n1: again", [1, 2, 3], "lines")
    assert parsed.captions == {1: "a cat"}
    assert parsed.unexpected == [4]


def test_parse_format_ok_flags():
    assert prompts.parse_answer("1: a\n2: b", [1, 2], "lines").format_ok
    assert not prompts.parse_answer("1: a\nand some chatter", [1, 2], "lines").format_ok
    assert prompts.parse_answer('{"regions": [{"id": 1, "caption": "a"}]}', [1], "json").format_ok
    assert not prompts.parse_answer("", [1], "lines").format_ok


def test_parse_dataflow_free_text():
    text = ("In <region1>, the focus is on a person wearing shoes. <region2> shows a broom "
            "leaning on a wall.")
    parsed = prompts.parse_answer(text, [1, 2], "free")
    assert parsed.captions[1].startswith("the focus is on a person")
    assert parsed.captions[2].startswith("shows a broom")


def test_parse_free_single_region_takes_whole_answer():
    assert prompts.parse_answer("  A cat sleeping.  ", [1], "free").captions == {1: "A cat sleeping."}


def test_answer_regex_matches_only_complete_answers():
    rx = re.compile(prompts.answer_regex([1, 2], "lines"))
    assert rx.fullmatch("1: a cat\n2: a dog")
    assert not rx.fullmatch("1: a cat")
    assert not rx.fullmatch("2: a dog\n1: a cat")
    assert prompts.answer_regex([1], "free") is None


def test_json_schema_lists_every_id():
    schema = prompts.answer_json_schema([1, 2, 3], "json")
    items = schema["properties"]["regions"]
    assert items["minItems"] == items["maxItems"] == 3
    assert items["items"]["properties"]["id"]["enum"] == [1, 2, 3]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.lists(st.integers(1, 30), min_size=1, max_size=10, unique=True),
       st.sampled_from(prompts.ANSWER_FORMATS))
def test_parse_never_raises_and_only_returns_asked_numbers(text, numbers, fmt):
    parsed = prompts.parse_answer(text, numbers, fmt)
    assert set(parsed.captions) <= set(numbers)
    assert all(isinstance(c, str) and c for c in parsed.captions.values())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1,
                        max_size=40).filter(lambda s: s.strip() and s.strip() == s and not s.startswith(("*", '"', "'", "`"))
                                            and any(c.isalnum() for c in s) and "\ufeff" not in s),
                min_size=1, max_size=8))
def test_lines_round_trip(captions):
    numbers = list(range(1, len(captions) + 1))
    text = "\n".join(f"{n}: {c}" for n, c in zip(numbers, captions))
    parsed = prompts.parse_answer(text, numbers, "lines")
    assert [parsed.captions.get(n) for n in numbers] == [c.strip("*").strip() for c in captions]


def test_only_newline_ends_a_line():
    # A constrained answer may hold any character but "\n" inside a line.
    parsed = prompts.parse_answer("1: a\x1cb\u2028c\n2: d", [1, 2], "lines")
    assert parsed.format_ok and parsed.captions == {1: "a\x1cb\u2028c", 2: "d"}


@pytest.mark.parametrize("answer, fmt", [
    ("3: a cat\n4: a dog", "lines"),                       # only other numbers: no caption at all
    ("1: **\n2: **", "lines"),                             # blank captions
    ("1: a cat\n1: a dog\n2: a bird", "lines"),            # a number twice
    ("1: a cat\n2: a dog\n3: a bird", "lines"),            # a number not asked
    ("1: a cat", "lines"),                                 # a number left out
    ('{"regions": [{"id": 7, "caption": "a cat"}, {"id": 8, "caption": "a dog"}]}', "json"),
    ('{"regions": [{"id": 1, "caption": "a cat"}, {"id": 2, "caption": " "}]}', "json"),
])
def test_an_answer_off_the_numbering_is_not_in_the_format(answer, fmt):
    # Found by feeding such answers through a run: each counted as a parse success
    # (format_ok, no debris) while the first two gave no caption at all.
    parsed = prompts.parse_answer(answer, [1, 2], fmt)
    assert not parsed.format_ok and not parsed.clean


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.lists(st.integers(1, 12), min_size=1, max_size=6, unique=True),
       st.sampled_from(["lines", "json"]))
def test_a_clean_parse_captions_every_asked_number(text, numbers, fmt):
    parsed = prompts.parse_answer(text, numbers, fmt)
    if parsed.format_ok:
        assert set(parsed.captions) == set(numbers) and not parsed.unexpected


@pytest.mark.parametrize("ident", ["1.0", '"1.0"', '"1."', '"1.00"', "1", '"1"', '"region1"', '"<region1>"', "1e0"])
def test_json_ids_of_integral_numbers_are_region_numbers(ident):
    # Models write ids as floats ({"id": 1.0}); that one was read as no region at all.
    text = f'{{"regions": [{{"id": {ident}, "caption": "a cat"}}, {{"id": 2.0, "caption": "a dog"}}]}}'
    parsed = prompts.parse_answer(text, [1, 2], "json")
    assert parsed.captions == {1: "a cat", 2: "a dog"} and parsed.format_ok and parsed.clean


@pytest.mark.parametrize("ident", ["1.5", '"1.5"', "true", "null", "[1]", '{"n": 1}', '"1e0"', '"1_0"', "1e300",
                                   '"one"', '"1.0.0"'])
def test_json_ids_that_are_no_whole_number_are_not_region_numbers(ident):
    text = f'{{"regions": [{{"id": {ident}, "caption": "a cat"}}, {{"id": 2, "caption": "a dog"}}]}}'
    parsed = prompts.parse_answer(text, [1, 2], "json")
    assert 1 not in parsed.captions and parsed.captions.get(2) == "a dog" and not parsed.format_ok


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(alphabet="0123456789.+-e ", max_size=12)))
def test_a_json_id_is_read_exactly_when_it_is_a_whole_number(ident):
    n = prompts._json_region_number(ident)
    if isinstance(ident, float):
        whole = ident == ident and abs(ident) != float("inf") and ident.is_integer() and \
            len(str(abs(int(ident)))) <= prompts.MAX_NUMBER_DIGITS
        assert (n is not None) == whole and (n is None or n == int(ident))
    elif isinstance(ident, int):
        assert n == ident
    else:
        assert (n is not None) == bool(re.fullmatch(r"\s*[+-]?\d+(\.0*)?\s*", ident))
        if n is not None:
            assert n == int(ident.strip().split(".")[0])
    # The parse goes through the same reading: an id that is a whole number gets its caption.
    text = json.dumps({"regions": [{"id": ident, "caption": "a cat"}]})
    parsed = prompts.parse_answer(text, [n if n is not None and n > 0 else 1], "json")
    assert (parsed.captions != {}) == (n is not None and n > 0)


# ------------------------------------------------------------------ the template check

_TEMPLATE_PIECES = st.lists(st.sampled_from(
    ["{", "}", "{{", "}}", "{n}", "{labels}", "{n:>3}", "{labels:d}", "{nope}", "{}", "{0}", "{n.real}",
     "{n[0]}", "{n!r}", "{format_instruction}", "{regions}", "Describe ", "box ", ":", "!"]), max_size=6).map("".join)


@settings(max_examples=300, deadline=None)
@given(template=_TEMPLATE_PIECES, count=st.integers(1, 12))
def test_a_template_the_config_check_passes_fills_every_request(template, count):
    """What the config check (prompt.template's rule) accepts, build_prompt fills for any request; what
    it refuses is refused before the run (it would fail, or read what no request holds)."""
    from regioncap.components import formats

    ok, _ = formats(prompts.TEMPLATE_EXAMPLE)
    numbers = list(range(1, count + 1))
    if ok(template):
        prompts.build_prompt(template, numbers=numbers, labels=[f"<{n}>" for n in numbers], answer_format="json")
    else:
        try:
            filled = template.format(**prompts.TEMPLATE_EXAMPLE)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return
        # It formats, but through an index or attribute (a value's inside), never a plain placeholder.
        assert any(c in template for c in ".[") and filled is not None


@pytest.mark.parametrize("template", ["{n}", "{n}{{n}}", "no placeholder", "", "{n:>3}"])
def test_label_format_check_accepts_what_labels_can_draw(template):
    from regioncap.components import formats

    assert formats({"n": 1})[0](template)


@pytest.mark.parametrize("template", ["{n:>10000000000}", "{n:.99999}", "{n:099999}"])
def test_a_format_spec_of_gigabytes_is_refused_without_formatting_it(template):
    """'{n:>10000000000}' took 5 s and 10 GB to format once, and would again for every label."""
    from regioncap.components import formats

    assert not formats({"n": 1})[0](template)


@pytest.mark.parametrize("caption", ["\u200b\u200b", "\x00", "...", "- -", "\ufeff"])
def test_a_caption_without_a_letter_or_digit_is_no_caption(caption):
    """Zero-width spaces, a NUL byte or dots were kept as captions and counted as parse successes."""
    for text, fmt in ((f"1: {caption}\n2: a red car", "lines"),
                      (json.dumps({"regions": [{"id": 1, "caption": caption}, {"id": 2, "caption": "a red car"}]}),
                       "json")):
        parsed = prompts.parse_answer(text, [1, 2], fmt)
        assert parsed.captions == {2: "a red car"} and not parsed.format_ok
    assert prompts.parse_answer(caption, [1], "free").captions == {}


def test_free_text_mentions_without_a_description_give_no_caption():
    """'<region2> **' was read as region 2's caption "": a blank caption among the captions."""
    parsed = prompts.parse_answer("<region1> a red car <region2> ** <region3> \u2026", [1, 2, 3], "free")
    assert parsed.captions == {1: "a red car"}  # it was {1: 'a red car', 2: '', 3: ''}


def test_a_byte_order_mark_before_the_answer_hides_no_region():
    """'\\ufeff1: ...' read no number on the first line: every region of the answer went missing."""
    parsed = prompts.parse_answer("\ufeff1: a red car\n2: a blue star", [1, 2], "lines")
    assert parsed.captions == {1: "a red car", 2: "a blue star"} and parsed.format_ok
    assert prompts.parse_answer('\ufeff{"regions": [{"id": 1, "caption": "a cat"}]}', [1], "json").format_ok


_ANSWER_PIECES = st.lists(st.sampled_from(
    ["<region1>", "<region2>", "1:", "2.", "**", "\u2026", "...", "\u200b", "\x00", "\ufeff", " ", "\n", "a cat",
     '{"regions": [{"id": 1, "caption": "', '"}]}', "-", "region 2"]), max_size=8).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), _ANSWER_PIECES))
def test_every_caption_read_has_a_letter_or_digit(text):
    for fmt in ("lines", "json", "free"):
        for caption in prompts.parse_answer(text, [1, 2], fmt).captions.values():
            assert any(c.isalnum() for c in caption)
