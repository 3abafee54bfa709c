"""The record model (regioncap/record_types.py): real records go through it unchanged, byte for byte,
the reserved input names come from it, and docs/formats.md's record tables name what it declares."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO, compose
from regioncap.job import execute
from regioncap.record_types import ABSENT, RECORD_KEYS, Record, RecordError, Region, RequestSpec
from regioncap.records import dumps


def round_trip(line: str) -> str:
    """A records line through the model and back, as the writers write it."""
    return dumps(Record.from_dict(json.loads(line)).to_dict())


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> List[Path]:
    """Two runs with the fake engine: the bundled demo rows in marked mode with a re-ask left
    unanswered and a failed request; rows with error rows, clashing input fields and rows without
    boxes given proposals, in coords mode."""
    root = tmp_path_factory.mktemp("records")
    Image.new("RGB", (320, 240), (40, 120, 200)).save(root / "a.png")
    rows = [{"image": "a.png", "bbox": [[10, 10, 120, 90], [300, 200, 100, 100]], "answer": "old", "regions": 7,
             "note": "kept"},
            {"image": "missing.png", "bbox": [[1, 1, 5, 5]]},
            {"image": "a.png", "bbox": [["a", 1, 2, 3]]},
            {"image": "a.png"},
            "[1, 2]"]
    data = root / "rows.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    runs = []
    for name, overrides in [
        ("marked", ["data=demo", "engine.skip_regions=[2]", "engine.answer_on_reask=false",
                    "engine.fail_keys=[coffee/]"]),
        ("coords", ["data=jsonl", f"data.path={data}", "prompt=coords", "propose=contours"]),
    ]:
        out = root / name
        execute(compose(["engine=fake", "progress=false", "workers=0", "max_error_rate=1.0", *overrides],
                        output_dir=out))
        runs.append(out)
    return runs


@pytest.mark.slow
def test_real_records_go_through_the_model_unchanged(real_runs):
    seen: Set[str] = set()
    for out in real_runs:
        for name in ("visualize.jsonl", "captions.jsonl"):
            for line in (out / name).read_text(encoding="utf-8").splitlines():
                assert round_trip(line) == line
                rec = Record.from_dict(json.loads(line))
                seen.add(rec.status)
                seen.update(k for k in rec.keys() if rec.has(k))
                # Readers see fields as attributes; what is left out reads None.
                assert rec.id == json.loads(line)["id"]
                for reg in rec.iter_regions():
                    assert isinstance(reg, Region)
    # The runs above hold every kind of row and the fields the readers use.
    assert {"ok", "partial", "error", "no_regions", "pending"} <= seen
    assert {"input", "proposals", "error", "answer", "tokens", "dropped_boxes", "clipped_boxes"} <= seen


def test_a_record_knows_left_out_from_null_and_keeps_key_order():
    rec = Record(id="a", index=0, status="pending")
    assert rec.keys() == ("id", "index", "status") and rec.answer is None and not rec.has("answer")
    rec.answer = None  # set to null: written
    rec.error = RecordError(stage="caption", kind="engine_error", message="m")
    rec.status = "error"  # already there: keeps its place
    assert rec.to_dict() == {"id": "a", "index": 0, "status": "error", "answer": None,
                             "error": {"stage": "caption", "kind": "engine_error", "message": "m"}}
    assert list(rec.to_dict()) == ["id", "index", "status", "answer", "error"]
    rec.drop("answer")
    assert "answer" not in rec.to_dict() and rec.answer is None
    assert repr(ABSENT) == "ABSENT" and not ABSENT
    assert not RecordError.from_dict({}) and RecordError.from_dict({"kind": None})  # truth as a dict's


def test_parts_nest_and_carried_keys_stay_in_place():
    line = {"note": 1, "input": {"answer": "old"}, "id": "x", "regions": [{"id": 1, "caption": None, "odd": 2}],
            "requests": [{"key": "x/c0", "reask": {"key": "x/c0/reask", "numbers": [1]}}],
            "error": None, "later": [1]}
    rec = Record.from_dict(line)
    assert rec.to_dict() == line and list(rec.to_dict()) == list(line)
    assert isinstance(rec.regions[0], Region) and rec.regions[0].has("caption") and rec.regions[0].caption is None
    assert isinstance(rec.requests[0].reask, RequestSpec) and rec.requests[0].reask.numbers == [1]
    assert rec.extras() == {"note": 1, "later": [1]} and rec.regions[0].extras() == {"odd": 2}
    assert rec.inputs() == {"note": 1, "later": [1], "answer": "old"}


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                     max_leaves=8)
_KEYS = st.sampled_from(sorted(RECORD_KEYS) + ["note", "objects", "source"])


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_KEYS, _JSON, max_size=8))
def test_any_object_goes_through_the_model_unchanged(data: Dict[str, Any]):
    # Whatever a field holds (a reader may meet a record of an older run, or a hand-edited one).
    assert json.dumps(Record.from_dict(data).to_dict()) == json.dumps(data)


def test_the_reserved_input_names_are_the_models_fields():
    from regioncap.stages.visualize import RowRequests  # noqa: F401  (the stage that keeps inputs apart)

    assert RECORD_KEYS == {f for f in Record.names()}
    assert {"input", "proposals", "grounding", "model_weights", "answer", "regions"} <= RECORD_KEYS


# ---------------------------------------------------------------- docs/formats.md
def _table(section: str) -> List[str]:
    """First-column cells of the fields table under ``## <section>`` of docs/formats.md."""
    text = (REPO / "docs" / "formats.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [line.split("|")[1].strip() for line in body.splitlines()
            if line.startswith("| `")]


def _names(cells: List[str]) -> List[str]:
    return [n for cell in cells for n in re.findall(r"`([^`]+)`", cell)]


def _row(section: str, field: str) -> str:
    text = (REPO / "docs" / "formats.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return next(line for line in body.splitlines() if line.startswith(f"| `{field}`"))


def test_formats_md_names_every_record_field_and_no_other():
    names = _names(_table("visualize.jsonl")) + _names(_table("captions.jsonl"))
    top = {n for n in names if "[]" not in n and "." not in n}
    # The first column names fields; nested ones as regions[].x (captions) or in the regions row (visualize).
    assert top - {"regions[]"} <= RECORD_KEYS | {"reason", "attempt"}
    documented = top | {"input", "grounding"}  # input: under "Input rows"; grounding: in the status row
    assert RECORD_KEYS - documented == set()


def test_formats_md_names_every_region_and_request_field():
    caption_cells = _names(_table("captions.jsonl"))
    region_docs = set(re.findall(r"`([a-z_]+)`", _row("visualize.jsonl", "regions")))
    region_docs |= {n.split("[].", 1)[1] for n in caption_cells if n.startswith("regions[].")}
    region_docs |= {"reason", "attempt"}  # the regions[].missing row names them bare
    assert Region.names() - region_docs == set()
    request_docs = set(re.findall(r"`([a-z_]+)`", _row("visualize.jsonl", "requests")))
    request_docs |= set(re.findall(r"`([a-z_]+)`", _row("captions.jsonl", "requests[]")))
    assert RequestSpec.names() - request_docs == set()
    row = _row("captions.jsonl", "error")
    error_docs = set(re.findall(r"\{([a-z_, ]+)\}", row)[0].replace(" ", "").split(","))
    error_docs |= set(re.findall(r"`([a-z_]+)(?::[^`]*)?`", row))
    assert RecordError.names() - error_docs == set()


# ------------------------------------------------------------------ record keys are written once

#: Names a record, or a part of one, goes by in the package: a variable, or the key it was read from.
RECORD_NAMES = frozenset({"rec", "record", "raw", "reg", "region", "spec", "rspec", "reask", "err", "error",
                          "first_error", "item", "planned"})

#: Modules whose literal keys are not a record's, though named like its fields; each with why.
NOT_RECORDS = {
    "regioncap/data.py": "input rows (DataFlow-MM fields as a data set names them) and their digest",
    "regioncap/boxes.py": "a box of an input row given as an object ({'bbox': [...]}), an input format",
    "regioncap/shapes.py": "the synthetic data set's input rows (write_dataset)",
    "regioncap/engines/base.py": "a Response's own fields: engines stay free of the record model",
    "regioncap/engines/openai_engine.py": "the engine's error of a failed request, before it is a Response",
    "regioncap/prompts.py": "the model's JSON answer ({'id', 'caption'}), a wire format the prompt asks for",
    "regioncap/families/grounding.py": "the model's grounding answer ({'bbox_2d', 'label'}), a wire format",
    "regioncap/propose/base.py": "a proposal's JSON (python -m regioncap.propose --json)",
    "regioncap/export.py": "export rows, its own format (docs/formats.md, Export), built from records read "
                          "through the model",
    "regioncap/report.py": "the templates' context, named like the fields it shows",
    "regioncap/loggers.py": "the W&B table's columns, named like the fields they show",
}


def record_key_literals(path: Path) -> List[str]:
    """``file:line key`` of every record field name written as a string literal where a record is
    read or built: ``rec["status"]``, ``reg.get("caption")``, ``"error" in rec`` on something named
    like a record or a part (:data:`RECORD_NAMES`, or read by such a key: ``rec.get("error").get("kind")``),
    and a dict literal with three or more keys of one part (a record built by hand)."""
    from dataclasses import fields

    parts = [frozenset(f.name for f in fields(p)) for p in (Record, Region, RequestSpec, RecordError)]
    names = frozenset().union(*parts)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    label = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
    found: List[str] = []

    def holder(node: ast.AST) -> Any:
        # What an expression holds, by name: a variable's, an attribute's, or the key it was read by.
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return node.attr
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            return node.slice.value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop") \
                and node.args and isinstance(node.args[0], ast.Constant):
            return node.args[0].value
        if isinstance(node, ast.BoolOp):
            return holder(node.values[0])
        return None

    def key(const: ast.AST, receiver: ast.AST) -> None:
        if isinstance(const, ast.Constant) and const.value in names and holder(receiver) in RECORD_NAMES:
            found.append(f"{label}:{const.lineno} {holder(receiver)}[{const.value!r}]")

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            key(node.slice, node.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("get", "pop", "setdefault") and node.args:
            key(node.args[0], node.func.value)
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            key(node.left, node.comparators[0])
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if any(len(keys & part) >= 3 for part in parts):
                found.append(f"{label}:{node.lineno} {{{', '.join(sorted(keys & names))}}}")
    return found


def test_record_keys_are_written_once_in_the_model():
    """The writers build records through the model and the readers read them through it (or by
    the model's ``KeyNames`` on per-row paths): no record field's name as a string literal elsewhere."""
    package = REPO / "regioncap"
    assert all((REPO / m).is_file() for m in NOT_RECORDS), "an allowed module is gone: take it off NOT_RECORDS"
    hits = [hit for path in sorted(package.rglob("*.py"))
            if path.name != "record_types.py" and path.relative_to(REPO).as_posix() not in NOT_RECORDS
            for hit in record_key_literals(path)]
    assert hits == [], ("build and read records through regioncap.record_types (Record, Region, RequestSpec, "
                        "RecordError; RECORD.<field> where a decoded record is read by key):\n" + "\n".join(hits))


def test_the_record_key_check_sees_each_kind_of_use(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(rec, reg, c, row):\n'
                   '    a = rec["status"], reg.get("caption"), "error" in rec, (rec.get("error") or {}).get("kind")\n'
                   '    b = {"stage": 1, "kind": 2, "message": 3}\n'
                   '    ok = c["regions"], row.get("image"), {"prompt": 1, "output": 2}, rec.get("note")\n')
    assert sorted(record_key_literals(bad)) == [
        "bad.py:2 error['kind']", "bad.py:2 rec['error']", "bad.py:2 rec['error']", "bad.py:2 rec['status']",
        "bad.py:2 reg['caption']", "bad.py:3 {kind, message, stage}"]


def test_key_names_are_the_parts_fields_and_nothing_else():
    from dataclasses import fields

    from regioncap.record_types import ERROR, RECORD, REGION, REQUEST

    for names, part in ((RECORD, Record), (REGION, Region), (REQUEST, RequestSpec), (ERROR, RecordError)):
        assert all(getattr(names, f.name) == f.name for f in fields(part))
    with pytest.raises(AttributeError, match="'captions' is not a key of Region"):
        REGION.captions  # noqa: B018 - a misspelt name fails where it is read
    with pytest.raises(AttributeError, match="read-only"):
        RECORD.status = "state"


def test_a_part_built_in_code_writes_its_keys_in_the_order_set():
    """What the writers rely on: constructor fields in declaration order, carried input fields
    first, a field set later after them, ``update`` as a dict's."""
    rec = Record(id="r", index=0, status="pending", error=None).carrying({"note": 1})
    rec.timing = {"visualize_s": 0.1}
    rec.status = "error"
    rec.error = RecordError(stage="caption").update({"kind": "engine_error", "message": "m", "code": 7})
    rec.error.retryable = True
    assert json.dumps(rec.to_dict()) == json.dumps({
        "note": 1, "id": "r", "index": 0, "status": "error",
        "error": {"stage": "caption", "kind": "engine_error", "message": "m", "code": 7, "retryable": True},
        "timing": {"visualize_s": 0.1}})
    with pytest.raises(ValueError, match="declares"):
        Record().carrying({"status": "x"})


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_part_built_from_any_fields_holds_them_in_declared_order(data):
    """The generated ``__init__`` (keywords or positions, as a dataclass's): the fields given, in
    declared order, the others read None and are not written."""
    from dataclasses import fields

    part = data.draw(st.sampled_from([RecordError, Region, RequestSpec, Record]))
    names = [f.name for f in fields(part)]
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True))
    values = {n: data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=5)), label=n) for n in chosen}
    obj = part(**values)
    order = [n for n in names if n in values]
    assert list(obj.keys()) == order and json.dumps(obj.to_dict()) == json.dumps({n: values[n] for n in order})
    assert all(getattr(obj, n) is None for n in names if n not in values)
    assert part.from_dict(obj.to_dict()) == obj
    k = len(order) and names.index(order[-1]) + 1  # the same fields by position (left-out ones ABSENT)
    assert part(*[values.get(n, ABSENT) for n in names[:k]]).to_dict() == obj.to_dict()
    with pytest.raises(TypeError):
        part(not_a_field=1)
