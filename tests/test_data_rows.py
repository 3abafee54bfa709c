"""Input rows that once stopped a run before any row was written, row windows that
cannot be meant, and the content digest that identifies a row apart from its position."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import compose
from regioncap.data import (CocoSource, DataError, InputRow, JsonlSource, RefcocoSource, VgSource, check_data_config,
                            digest_bytes, iter_rows)
from regioncap.errors import RunError
from regioncap.job import execute

HUGE_INT = b"7" * 5000  # over Python's 4300-digit limit for int(): json.loads raises ValueError


def _rows(*overrides: str):
    return list(iter_rows(compose(list(overrides)).data))


def test_a_jsonl_line_with_an_int_over_4300_digits_is_an_error_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"image": "a.png", "bbox": []}\n'
                     b'{"image": "b.png", "bbox": [], "n": ' + HUGE_INT + b'}\n'
                     b'{"image": "c.png", "bbox": [[1, 2, 3, 4]]}\n')
    rows = _rows("data=jsonl", f"data.path={path}")
    assert [r.error is None for r in rows] == [True, False, True]
    assert rows[1].error["kind"] == "invalid_json" and "rows.jsonl line 2" in rows[1].error["message"]
    assert [r.image for r in rows if r.error is None] == ["a.png", "c.png"]


def test_a_refcoco_json_line_with_an_int_over_4300_digits_is_an_error_row(tmp_path):
    path = tmp_path / "refs.jsonl"
    good = {"ref_id": 1, "ann_id": 5, "image_id": 5, "file_name": "x.jpg", "bbox": [1, 1, 5, 5], "sentences": ["a"]}
    path.write_bytes(json.dumps(good).encode() + b'\n{"ref_id": ' + HUGE_INT + b', "image_id": 6}\n')
    rows = _rows("data=refcoco", f"data.path={path}")
    assert len(rows) == 2
    bad = [r for r in rows if r.error and r.error["kind"] == "invalid_ref"]
    assert len(bad) == 1 and "refs.jsonl line 2" in bad[0].error["message"]


def test_a_json_annotation_file_with_a_huge_int_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "instances.json"
    path.write_bytes(b'{"images": [{"id": ' + HUGE_INT + b'}], "annotations": []}')
    with pytest.raises(DataError, match="instances.json"):
        _rows("data=coco", f"data.path={path}")


def test_a_huge_int_row_through_the_pipeline(tmp_path):
    """The run goes on: one error row for the bad line, the others captioned."""
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "a.png")
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"image": "a.png", "bbox": [[2, 2, 20, 20]]}\n{"image": "a.png", "n": ' + HUGE_INT
                     + b'}\n{"image": "a.png", "bbox": [[4, 4, 20, 20]]}\n')
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={path}", "max_error_rate=1.0"],
                  output_dir=tmp_path / "run")
    metrics = execute(cfg)
    from regioncap.records import read_jsonl

    recs = list(read_jsonl(tmp_path / "run" / "captions.jsonl"))
    assert metrics["rows"] == 3 and [r["status"] for r in recs] == ["ok", "error", "ok"]
    assert recs[1]["error"]["kind"] == "invalid_json" and "rows.jsonl line 2" in recs[1]["error"]["message"]


@pytest.mark.parametrize("override,message", [
    ("data.skip=-2", "data.skip must be a whole number >= 0"),
    ("data.limit=-1", "data.limit must be null"),
    ("data.num_shards=0", "data.num_shards must be a whole number >= 1"),
    ("data.shard_index=3", "data.shard_index must be in 0..0"),
])
def test_a_row_window_that_cannot_be_meant_is_refused_up_front(tmp_path, override, message):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"image": "a.png", "bbox": []}\n')
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={path}", override],
                  output_dir=tmp_path / "run")
    with pytest.raises(DataError, match=message):
        check_data_config(cfg.data)
    with pytest.raises(DataError, match=message):
        next(iter_rows(cfg.data))
    with pytest.raises(RunError, match=message):
        execute(cfg)
    assert not (tmp_path / "run" / "captions.jsonl").exists()


def test_a_zero_limit_and_default_window_are_accepted(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"image": "a.png", "bbox": []}\n')
    assert _rows("data=jsonl", f"data.path={path}", "data.limit=0") == []
    assert check_data_config(compose(["data=jsonl", f"data.path={path}"]).data) == (1, 0)


def test_jsonl_digest_is_the_line_content_not_its_position(tmp_path):
    lines = [b'{"image": "a.png", "bbox": [[1, 2, 3, 4]]}', b'{"image": "b.png"}', b"{broken", b"\xff\xfe"]
    first, second = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    first.write_bytes(b"\n".join(lines) + b"\n")
    second.write_bytes(b'{"image": "new.png"}\r\n\n' + b"\r\n".join(lines) + b"\r\n")  # a row inserted on top
    one = _rows("data=jsonl", f"data.path={first}")
    two = _rows("data=jsonl", f"data.path={second}")
    assert [r.digest for r in one] == [hashlib.sha256(b).hexdigest()[:16] for b in lines]
    assert [r.digest for r in one] == [digest_bytes(b) for b in lines]
    assert [r.digest for r in two[1:]] == [r.digest for r in one]
    assert [r.index for r in two[1:]] == [1, 2, 3, 4]  # same rows, other positions: the digest tells
    assert two[0].digest not in {r.digest for r in one}
    assert len({r.digest for r in two}) == len(two)


def test_input_row_digest_defaults_to_none():
    assert InputRow(index=0, row_id="x").digest is None


# --------------------------------------------------------------------------- JSON array files

ARRAY_ROWS = [{"id": "a", "image": "a.png", "bbox": [[1, 2, 3, 4]]},
              {"id": "b", "image": "b.png", "bbox": []},
              {"id": "c", "image": "c.png", "bbox": [[5, 6, 7, 8]], "note": "x"}]


def _starts(indent: int) -> list:
    """The line each element of ARRAY_ROWS starts on, dumped with ``indent`` ("[" on line 1)."""
    sizes = [len(json.dumps(d, indent=indent).splitlines()) for d in ARRAY_ROWS]
    return [2 + sum(sizes[:k]) for k in range(len(sizes))]


@pytest.mark.parametrize("name,content,lines", [
    ("pretty.json", json.dumps(ARRAY_ROWS, indent=2).encode(), _starts(2)),
    ("compact.json", json.dumps(ARRAY_ROWS).encode(), [1, 1, 1]),
    ("bom.json", b"\xef\xbb\xbf" + json.dumps(ARRAY_ROWS, indent=4).encode() + b"\n", _starts(4)),
    ("pretty_named.jsonl", b"\n[\n" + b",\n".join(json.dumps(r).encode() for r in ARRAY_ROWS) + b"\n]\n", [3, 4, 5]),
])
def test_a_json_array_file_is_read_as_its_elements(tmp_path, name, content, lines):
    """A .json dump (or any file that opens with a lone ``[`` line) is one row per element,
    with the same ids, fields and digests however the file is indented."""
    from regioncap.data import count_rows, digest_value

    path = tmp_path / name
    path.write_bytes(content)
    cfg = compose(["data=jsonl", f"data.path={path}"]).data
    rows = list(iter_rows(cfg))
    assert [(r.row_id, r.image, r.bbox, r.extra.get("note"), r.error) for r in rows] == \
        [(d["id"], d["image"], d["bbox"], d.get("note"), None) for d in ARRAY_ROWS]
    assert [r.digest for r in rows] == [digest_value(d) for d in ARRAY_ROWS]
    assert [r.image_path for r in rows] == [str(tmp_path / d["image"]) for d in ARRAY_ROWS]
    assert [r.line for r in rows] == lines  # where each element starts
    assert count_rows(cfg) == 3


def test_json_array_elements_that_are_not_rows_are_error_rows_naming_the_item(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"image": "a.png", "bbox": []},\n  [1, 2],\n  "x.png",\n  {"bbox": [[1, 2, 3, 4]]},\n'
                    '  {"image": "b.png", "bbox": [], "s": "\\ud800"}\n]\n')
    rows = _rows("data=jsonl", f"data.path={path}")
    assert [(r.error or {}).get("kind") for r in rows] == [None, "invalid_row", "invalid_row", "missing_image_field",
                                                           "invalid_utf8"]
    assert "rows.json item 1 (line 3): expected a JSON object, got list" in rows[1].error["message"]
    assert [r.line for r in rows] == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("content,match", [
    (b'[\n  {"image": "a.png", "bbox": []},\n  {"image": "b.png", "bbox": [}\n]\n', "line 3 column"),
    (b'[\n  {"image": "a.png", "bbox": []}\n', "line 3 column 1"),
    (b'[\n  {"image": "a.png"}\n]\n]\n', "extra data after the array"),
    (b'[\n  {"image": "a.png", "n": ' + b"[" * 100000 + b"]" * 100000 + b'}\n]\n', "nested too deeply"),
    (b'[\n  {"image": "a.png", "s": "\xff"}\n]\n', "not UTF-8"),
])
def test_a_broken_json_array_is_refused_naming_the_file_and_where(tmp_path, content, match):
    path = tmp_path / "rows.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as err:
        _rows("data=jsonl", f"data.path={path}")
    assert str(path) in str(err.value) and "JSON Lines" in str(err.value) or "not UTF-8" in str(err.value)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json"])
def test_json_lines_that_start_with_a_list_stay_json_lines(tmp_path, name):
    """A one-line array in a .jsonl file is one bad row, as is any line; a .json file that holds
    JSON Lines (a common misnomer) is read as JSON Lines."""
    path = tmp_path / name
    path.write_bytes(b'[1, 2, 3]\n{"image": "a.png", "bbox": []}\n{"image": "b.png", "bbox": []}\n')
    rows = _rows("data=jsonl", f"data.path={path}")
    assert [(r.error or {}).get("kind") for r in rows] == ["invalid_row", None, None]
    assert [r.line for r in rows] == [1, 2, 3]
    only = tmp_path / "one.jsonl"
    only.write_bytes(b"[1, 2, 3]\n")
    assert [(r.error or {}).get("kind") for r in _rows("data=jsonl", f"data.path={only}")] == ["invalid_row"]


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_a_json_array_file_runs_resumes_and_shards_like_json_lines(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "a.png")
    rows = [{"id": f"r{i}", "image": "a.png", "bbox": [[2 + i, 2, 20, 20]]} for i in range(5)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=2))
    base = ["engine=fake", "progress=false", "data=jsonl", f"data.path={path}"]
    metrics = execute(compose(base, output_dir=tmp_path / "run"))
    assert metrics["rows"] == 5 and metrics["error_rows"] == 0
    caps = [json.loads(line) for line in (tmp_path / "run" / "captions.jsonl").read_text().splitlines()]
    assert [c["id"] for c in caps] == [r["id"] for r in rows]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"]["rows"] == 5, manifest["data"]  # the elements, not the 30-odd lines
    # Re-indented, the same rows are the same rows: a resume finds them all done.
    path.write_text(json.dumps(rows))
    before = (tmp_path / "run" / "captions.jsonl").read_bytes()
    metrics = execute(compose([*base, "resume=true"], output_dir=tmp_path / "run"))
    assert metrics["rows"] == 5
    assert (tmp_path / "run" / "captions.jsonl").read_bytes() == before
    # An element edited in place is another row: refused, as a changed JSONL line is.
    rows[1]["bbox"] = [[1, 1, 30, 30]]
    path.write_text(json.dumps(rows, indent=2))
    with pytest.raises(RunError, match=r"input row 1 \(id 'r1'\) has other content"):
        execute(compose([*base, "resume=true"], output_dir=tmp_path / "run"))
    shard = [r.row_id for r in iter_rows(compose([*base, "data.num_shards=2", "data.shard_index=1"]).data)]
    assert shard == ["r1", "r3"]



_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=8),
                         st.floats(allow_nan=False, allow_infinity=False))
_json_value = st.recursive(_json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)
_element = st.one_of(
    st.fixed_dictionaries({"image": st.text(min_size=1, max_size=12).filter(lambda t: t.strip() and "\x00" not in t),
                           "bbox": st.lists(st.lists(st.integers(0, 50), min_size=4, max_size=4), max_size=3)},
                          optional={"id": st.text(min_size=1, max_size=6), "x": _json_value}),
    _json_value)


_ARRAY_CFG: dict = {}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(elements=st.lists(_element, max_size=8), indent=st.sampled_from([None, 0, 1, 2, 4, "\t"]),
       bom=st.booleans(), tail=st.sampled_from(["", "\n", "\n\n  \n"]), name=st.sampled_from(["r.json", "r.jsonl"]))
def test_any_json_array_file_is_one_row_per_element_wherever_it_breaks_lines(tmp_path, elements, indent, bom, tail,
                                                                           name):
    from regioncap.data import digest_value

    text = json.dumps(elements, indent=indent, ensure_ascii=False)
    if name.endswith(".jsonl") and (not elements or indent is None):
        return  # a .jsonl file is read as an array only when it opens with a lone "[" line
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + (text + tail).encode("utf-8"))
    if "cfg" not in _ARRAY_CFG:  # composing costs more than reading: once
        _ARRAY_CFG["cfg"] = compose(["data=jsonl", "data.path=unset.json"]).data
    cfg = _ARRAY_CFG["cfg"]
    cfg.path = str(path)
    rows = list(iter_rows(cfg))
    assert len(rows) == len(elements)
    assert [r.index for r in rows] == list(range(len(elements)))
    assert [r.digest for r in rows] == [digest_value(e) for e in elements]
    lines = text.split("\n")  # lines of a file; str.splitlines() also breaks at U+0085, U+2028...
    for row, element in zip(rows, elements):
        if indent is None:
            assert row.line == 1
        else:  # the line the element's own text starts on
            assert lines[row.line - 1].strip().startswith(json.dumps(element, indent=indent, ensure_ascii=False)[0])
        if isinstance(element, dict) and "image" in element:
            assert row.error is None and row.image == element["image"] and row.bbox == element["bbox"]
        else:
            assert row.error["kind"] in ("invalid_row", "missing_image_field", "bad_image_value")
            assert f"{name} item {row.index} (line {row.line})" in row.error["message"]
    assert [r.line for r in rows] == sorted(r.line for r in rows)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(elements=st.lists(_element, min_size=1, max_size=6), indent=st.sampled_from([None, 2]), data=st.data())
def test_a_cut_or_spliced_json_array_file_is_a_clear_data_error_or_rows(tmp_path, elements, indent, data):
    """Whatever breaks a dump (cut short, a byte spliced in), reading it ends in rows or in a
    DataError naming the file: never another exception, never a row lost silently."""
    text = json.dumps(elements, indent=indent, ensure_ascii=False).encode("utf-8")
    cut = data.draw(st.integers(1, len(text) - 1), label="at")
    broken = data.draw(st.sampled_from([text[:cut], text[:cut] + b"\xff" + text[cut:], text[:cut] + b"," + text[cut:],
                                        text[:cut] + b"]" + text[cut:]]), label="broken")
    path = tmp_path / "r.json"
    path.write_bytes(broken)
    if "cfg" not in _ARRAY_CFG:
        _ARRAY_CFG["cfg"] = compose(["data=jsonl", "data.path=unset.json"]).data
    cfg = _ARRAY_CFG["cfg"]
    cfg.path = str(path)
    try:
        rows = list(iter_rows(cfg))
    except DataError as exc:
        assert str(path) in str(exc)
        return
    # Read after all: a dump still whole (a "," or "]" that JSON allows there), or JSON Lines
    # whose first line is a value of its own (then every non-blank line is a row).
    lines = [ln for ln in broken.split(b"\n") if ln.strip()]
    assert len(rows) in (len(lines), len(json.loads(broken)) if _loads(broken) else -1)


def _loads(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), list)
    except ValueError:
        return False


@pytest.mark.parametrize("name,hint", [("rows.parquet", "data=hf data.path="), ("rows.CSV", "data=hf data.path="),
                                       ("rows.pkl", "convert it to JSON Lines")])
def test_a_tabular_or_binary_file_given_to_data_jsonl_is_refused_with_the_way_to_read_it(tmp_path, name, hint):
    path = tmp_path / name
    path.write_bytes(b"PAR1\x00\x01binary")
    with pytest.raises(DataError, match="not JSON Lines") as err:
        _rows("data=jsonl", f"data.path={path}")
    assert str(path) in str(err.value) and hint in str(err.value)


@pytest.mark.parametrize("name,indent", [("instances.json", 2), ("instances.json", None), ("instances.jsonl", None)])
def test_a_coco_file_given_to_data_jsonl_says_to_use_data_coco(tmp_path, name, indent):
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 5, "image_id": 1, "bbox": [1, 1, 9, 9]}],
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / name
    path.write_text(json.dumps(coco, indent=indent))
    with pytest.raises(DataError, match=r"is a COCO annotation file, not rows: read it with data=coco data.path="):
        _rows("data=jsonl", f"data.path={path}")


def test_one_pretty_printed_object_is_refused_naming_its_keys_and_a_one_line_object_is_a_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": [{"image": "a.png"}], "meta": {"v": 1}}, indent=2))
    with pytest.raises(DataError, match=r"is one JSON object \(keys: meta, rows\), not rows.*under 'rows' may be"):
        _rows("data=jsonl", f"data.path={path}")
    path.write_text(json.dumps({"image": "a.png", "bbox": [[1, 2, 3, 4]]}) + "\n")
    assert [(r.image, r.error) for r in _rows("data=jsonl", f"data.path={path}")] == [("a.png", None)]
    # A JSONL file whose first line is a lone "{" (not one object): still read line by line, as error rows.
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{\n{"image": "a.png", "bbox": []}\n')
    assert [(r.error or {}).get("kind") for r in _rows("data=jsonl", f"data.path={path}")] == ["invalid_json", None]


@pytest.mark.parametrize("rows,says", [
    ([{"file": "a.png", "bbox": [[1, 1, 9, 9]]}, {"file": "b.jpg", "bbox": []}], "Set data.image_key=file"),
    ([{"image_id": 1, "ref_id": 3, "sentences": ["a"], "bbox": [1, 1, 9, 9]}], "read them with data=refcoco"),
    ([{"id": 1, "regions": [{"x": 1, "y": 1, "width": 5, "height": 5, "phrase": "a"}]}], "read them with data=vg"),
])
def test_rows_without_the_image_field_are_said_at_the_start_and_still_written(tmp_path, caplog, rows, says):
    """A wrong data.image_key (or another format's rows) is named before the run, with the fix; every
    row still comes out once, as a missing_image_field error row."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="regioncap"):
        metrics = execute(compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={path}",
                                   "max_error_rate=1"], output_dir=tmp_path / "run"))
    warned = [r.getMessage() for r in caplog.records if "has the image field 'image'" in r.getMessage()]
    assert len(warned) == 1 and says in warned[0], warned
    assert metrics["rows"] == metrics["error_rows"] == len(rows)
    caps = [json.loads(line) for line in (tmp_path / "run" / "captions.jsonl").read_text().splitlines()]
    assert [c["error"]["kind"] for c in caps] == ["missing_image_field"] * len(rows)


def test_no_image_field_warning_when_some_row_has_it(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"file": "a.png"}\n{"image": "missing.png", "bbox": []}\nnot json\n')
    with caplog.at_level("WARNING", logger="regioncap"):
        execute(compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={path}", "max_error_rate=1"],
                        output_dir=tmp_path / "run"))
    assert not [r for r in caplog.records if "has the image field" in r.getMessage()]


@pytest.mark.parametrize("name,pack", [
    ("rows.jsonl.gz", gzip.compress), ("rows.jsonl.bz2", bz2.compress), ("rows.jsonl.xz", lzma.compress),
    ("rows.jsonl", gzip.compress),  # by its bytes, not its name
])
def test_a_compressed_file_given_to_data_jsonl_is_refused_with_the_way_to_read_it(tmp_path, name, pack):
    # Found by giving a .jsonl.gz: read as JSON Lines, every run of bytes between newline bytes
    # was an invalid_utf8 error row, and the run went on over them.
    path = tmp_path / name
    path.write_bytes(pack(b'{"image": "a.png", "bbox": [[1, 1, 5, 5]]}\n' * 50))
    with pytest.raises(DataError, match="compressed, not JSON Lines: decompress it first") as err:
        _rows("data=jsonl", f"data.path={path}")
    assert str(path) in str(err.value)


_JSON_TEXT = st.text(alphabet=st.sampled_from(["a", "[", "{", "é", "\ud800", "\udfff", "\U0001f600"]), max_size=4)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_JSON_TEXT, inner, max_size=4),
    max_leaves=30,
)


def _nested(depth: int, leaf=0):
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@settings(max_examples=300, deadline=None)
@given(obj=_JSON_VALUES)
def test_the_quick_unwritable_check_answers_as_the_walk_does(obj) -> None:
    """The whole-row check in C gives the value-by-value walk's answer (surrogates in keys
    and values, brackets inside strings, non-finite floats)."""
    from regioncap.data import _unwritable, _unwritable_walk

    expected = _unwritable_walk(obj)
    assert _unwritable(obj) == expected
    # Given the text the row was read from: escaped (surrogates as \\udXXX), and raw where UTF-8 can hold it.
    assert _unwritable(obj, json.dumps(obj)) == expected
    raw = json.dumps(obj, ensure_ascii=False)
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in raw):
        assert _unwritable(obj, raw) == expected


@pytest.mark.parametrize("obj", [
    _nested(99), _nested(100), _nested(101), _nested(100, "\ud800"), _nested(99, "\ud800"),
    [[]] * 150, [[1, 2, 3, 4]] * 99, [[1, 2, 3, 4]] * 100, {"a": ("\ud800",)}, {(1, 2): "x"},
    {"a": {"b": ["\udc00", {"\ud900": 1}]}}, ["[" * 200], {"a": object()}, {"a": "\ud800", "b": object()},
])
def test_the_quick_unwritable_check_at_its_edges(obj) -> None:
    """Nesting around MAX_NESTING, more lists than MAX_NESTING side by side, values JSON cannot encode."""
    from regioncap.data import _unwritable, _unwritable_walk

    expected = _unwritable_walk(obj)
    assert _unwritable(obj) == expected
    try:
        text = json.dumps(obj)
    except TypeError:
        return  # a row read from JSON text holds nothing the encoder refuses
    assert _unwritable(obj, text) == expected


def _read(source: type, path) -> list:
    """The rows of ``source`` at ``path`` with its default settings (no Hydra compose: fast)."""
    return list(source(source.Config(path=str(path))).read())


@pytest.mark.parametrize("source", [JsonlSource, CocoSource, VgSource, RefcocoSource])
def test_a_folder_given_as_data_path_is_named_as_a_folder_with_its_data_files(tmp_path, source):
    # data=coco said "does not exist" of a folder that is there; data=jsonl "is not a regular file".
    for name in ("b.jsonl", "a.json", "notes.txt"):
        (tmp_path / name).write_text("{}\n")
    with pytest.raises(DataError, match="is a folder, not a file") as err:
        _read(source, tmp_path)
    assert str(tmp_path) in str(err.value) and "(it holds a.json, b.jsonl)" in str(err.value)


def test_a_pattern_given_as_data_path_is_named_as_a_pattern_with_the_way_to_read_several_files(tmp_path):
    for name in ("p1.jsonl", "p2.jsonl"):
        (tmp_path / name).write_text('{"image": "a.png", "bbox": []}\n')
    with pytest.raises(DataError, match=r"names one file, not a pattern \(2 file\(s\) match it\)") as err:
        _read(JsonlSource, f"{tmp_path}/p*.jsonl")
    assert "data=hf" in str(err.value) and "data.hf_builder=json" in str(err.value)


def test_a_missing_refcoco_jsonl_file_is_a_data_error_naming_it(tmp_path):
    # It was read with open(): a FileNotFoundError with no word of data.path.
    with pytest.raises(DataError, match=r"refs.jsonl does not exist \(data.path\)"):
        _read(RefcocoSource, tmp_path / "refs.jsonl")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 12), shards=st.integers(1, 4), skip=st.integers(0, 14),
       limit=st.one_of(st.none(), st.integers(0, 14)), data=st.data())
def test_every_shard_counts_the_rows_of_all_shards_as_it_reads_them(tmp_path, n, shards, skip, limit, data):
    # What a merge expects: the rows an unsharded run reads, whatever the source (a COCO file's lines
    # are not its rows: its shards could never be merged).
    from regioncap.data import RowCount

    path = tmp_path / "rows.jsonl"
    path.write_text("".join('{"image": "a.png"}\n' for _ in range(n)))
    cfg = JsonlSource.Config(_target_="regioncap.data.JsonlSource", path=str(path), skip=skip, limit=limit,
                             num_shards=shards, shard_index=data.draw(st.integers(0, shards - 1)))
    count = RowCount()
    rows = iter_rows(cfg, count)
    if next(rows, None) is not None:
        assert count.rows is None  # not known before the data is read through (a killed run records none)
    list(rows)
    assert count.rows == len(range(n)[skip:][:limit])


def test_dataflow_mm_rows_naming_images_relative_to_where_its_pipeline_ran(tmp_path, monkeypatch):
    # DataFlow-MM's demo rows say "../example_data/irc/20.jpg", relative to the folder its pipeline ran
    # from (gpu_pipelines/), not to the rows file: read from there every row was a missing_file error
    # row with no word why. data.images_dir points the relative paths there; the run says so first.
    from regioncap.run import check_images_dir

    rows_dir, ran_from = tmp_path / "example_data" / "irc", tmp_path / "gpu_pipelines"
    rows_dir.mkdir(parents=True)
    ran_from.mkdir()
    (rows_dir / "20.jpg").write_bytes(b"not decoded here")
    (rows_dir / "demo.jsonl").write_text('{"image": "../example_data/irc/20.jpg", "bbox": [[1, 1, 5, 5]]}\n'
                                         '{"image": "/abs/elsewhere.jpg", "bbox": []}\n')
    monkeypatch.chdir(ran_from)
    cfg = JsonlSource.Config(_target_="regioncap.data.JsonlSource", path=str(rows_dir / "demo.jsonl"))
    rows = list(iter_rows(cfg))
    assert rows[0].image_path == str(rows_dir / "../example_data/irc/20.jpg")
    warning = check_images_dir(rows, cfg)
    assert warning is not None and f"set data.images_dir={ran_from}" in warning
    for given in (str(ran_from), "../../gpu_pipelines"):  # absolute, or relative to the rows file's folder
        cfg.images_dir = given
        rows = list(iter_rows(cfg))
        assert Path(rows[0].image_path).resolve() == (rows_dir / "20.jpg").resolve()
        assert rows[1].image_path == "/abs/elsewhere.jpg" and check_images_dir(rows, cfg) is None
