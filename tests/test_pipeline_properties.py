"""Property-based tests of the whole pipeline (hypothesis, ``regioncap.job.execute``, fake engine).

Random JSON rows (odd ids, boxes in every format and none, missing and extra
fields, unicode, huge numbers, nested junk, NaN tokens) and random engine
answers (junk text, token counts, latencies, finish reasons, errors) go
through the real stages. Whatever they are:

- every input row is in ``captions.jsonl`` exactly once (a result or an error row);
- every file the run writes is strict JSON (no NaN/Infinity tokens);
- the run raises nothing but :class:`RunError`, and that only for the run as a whole.

The unit-tier variants keep to a few seconds; the ``slow`` one tries many more
cases. Findings are kept as plain tests at the end of the file.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import compose
from regioncap.boxes import BBOX_FORMATS
from regioncap.engines import fake as fake_engine
from regioncap.engines.base import Response
from regioncap.errors import RunError
from regioncap.job import execute
from regioncap.record_types import RECORD_KEYS

SMALL = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
# 150 cases, each a run and then its resume (about 0.45 s a case in CI): six times the 25 of each narrower
# property above, on random rows and random answers at once (300 took 2.3 min of CI's half hour).
BIG = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])

_CFG: Dict[tuple, Any] = {}


def strict_loads(line: str) -> Any:
    def refuse(token: str) -> Any:
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (64, 48), (10, 120, 200)).save(folder / "a.png")
    Image.new("L", (20, 90), 128).save(folder / "b.jpg")
    Image.new("RGBA", (33, 33), (0, 0, 0, 0)).save(folder / "c.png")
    return folder


# ------------------------------------------------------------------ strategies

huge = st.one_of(st.integers(min_value=-(10 ** 40), max_value=10 ** 40),
                 st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([2 ** 63, -(2 ** 63) - 1, 1e308]))
scalar = st.one_of(st.none(), st.booleans(), huge, st.text(max_size=12),
                   st.sampled_from(["\u0000", "\ud800", "\u202e", "👍🏽", "x" * 300, "1,2,3,4", "NaN"]))
junk = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=12)
number = st.one_of(st.integers(min_value=-50, max_value=200), st.floats(min_value=-10, max_value=200), huge)
box = st.one_of(
    st.lists(number, min_size=4, max_size=4),
    st.lists(number, min_size=0, max_size=6),
    st.fixed_dictionaries({"x": number, "y": number, "w": number, "h": number}),
    st.text(max_size=20),
    junk,
)
bbox = st.one_of(st.just([]), st.lists(box, max_size=5), box, st.none())
row_id = st.one_of(st.text(max_size=20), st.integers(), huge, junk, st.sampled_from(["", "a/b", "../x", "\ud800"]))


@st.composite
def input_row(draw, images: Path) -> str:
    """One JSONL line (allow_nan: NaN and Infinity tokens go in as a sloppy writer would put them)."""
    row: Dict[str, Any] = {}
    if draw(st.booleans()):
        row["id"] = draw(row_id)
    choice = draw(st.sampled_from(["a.png", "b.jpg", "c.png", "missing.png", "junk", "none"]))
    if choice == "junk":
        row["image"] = draw(junk)
    elif choice != "none":
        row["image"] = str(images / choice) if draw(st.booleans()) else choice
    if draw(st.integers(0, 4)):
        row["bbox"] = draw(bbox)
    for key in draw(st.lists(st.one_of(st.text(max_size=8), st.sampled_from(sorted(RECORD_KEYS))), max_size=3)):
        row[key] = draw(junk)
    if draw(st.integers(0, 9)) == 0:  # not an object at all, or not JSON
        return draw(st.sampled_from(["[1, 2]", "42", '"a string"', "{broken", "null", '{"a": NaN}']))
    return json.dumps(row, allow_nan=True)


answer_text = st.one_of(
    st.none(), st.text(max_size=200),
    st.lists(st.tuples(st.integers(-3, 12), st.text(max_size=30)), max_size=6).map(
        lambda items: "\n".join(f"{n}: {t}" for n, t in items)),
    st.lists(st.tuples(st.integers(-3, 12), st.text(max_size=30)), max_size=6).map(
        lambda items: json.dumps({"regions": [{"id": n, "caption": t} for n, t in items]})),
    junk.map(lambda v: json.dumps(v, allow_nan=True)),
    st.sampled_from(["\x00" * 50, "1:" * 500, "```json\n{\"regions\": [", "<region1> \ud800", " " * 5000 + "x"]),
)
usage = st.one_of(st.none(), huge, st.text(max_size=5), st.just(-1))
answer = st.fixed_dictionaries({
    "text": answer_text, "prompt_tokens": usage, "output_tokens": usage,
    "latency_s": st.one_of(st.none(), huge), "finish_reason": st.one_of(st.none(), scalar),
    "error": st.one_of(st.none(), st.none(), junk,
                       st.fixed_dictionaries({"kind": scalar, "message": scalar})),
})


# ------------------------------------------------------------------ running


def run(lines: List[str], answers: List[Dict[str, Any]], monkeypatch, overrides=(), resume: bool = False) -> None:
    """Run ``lines`` with the fake engine answering ``answers`` in turn; check the properties.

    ``resume``: then resume the finished run, which must change no records file.
    """
    key = tuple(overrides)
    if key not in _CFG:
        _CFG[key] = compose(["engine=fake", "progress=false", "data=jsonl", "data.path=unset.jsonl",
                             "max_error_rate=1", "workers=0", "engine.batch_size=3", "commit_every=4", *overrides])
    calls = iter(range(10 ** 9))

    def one(self, req):
        if not answers:
            return real_one(self, req)
        a = answers[next(calls) % len(answers)]
        return Response(key=req.key, **a)

    real_one = fake_engine.FakeEngine._one
    monkeypatch.setattr(fake_engine.FakeEngine, "_one", one)
    folder = Path(tempfile.mkdtemp(prefix="regioncap-prop-"))
    try:
        data = folder / "rows.jsonl"
        data.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        cfg = copy.deepcopy(_CFG[key])
        cfg.data.path, cfg.output_dir = str(data), str(folder / "run")
        try:
            execute(cfg)
        except RunError as exc:
            # Only a whole-run problem may stop it; with rows to read there is none here.
            raise AssertionError(f"the run stopped: {exc}") from None
        check(folder / "run", len(lines))
        if resume:
            files = {p: p.read_bytes() for p in (folder / "run").glob("*.jsonl")}
            again = copy.deepcopy(cfg)
            again.resume = True
            execute(again)
            assert {p: p.read_bytes() for p in files} == files
            check(folder / "run", len(lines))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check(out: Path, n: int) -> None:
    for name in ("visualize.jsonl", "captions.jsonl"):
        text = (out / name).read_text(encoding="utf-8")
        # One record per line for every splitter: U+0085, U+2028 and U+2029 in a caption are written escaped.
        assert text.endswith("\n") or not text, name
        records = [strict_loads(line) for line in text.split("\n")[:-1]]
        assert text.splitlines() == text.split("\n")[:-1], name
        assert sorted(r["index"] for r in records) == list(range(n)), name
        for r in records:
            assert r["status"] in ({"pending", "error", "no_regions", "grounding"} if name == "visualize.jsonl"
                                   else {"ok", "partial", "error", "no_regions"}), r["status"]
            if r["status"] == "error":
                assert r["error"]["kind"] and isinstance(r["error"]["message"], str)
    for name in ("metrics.json", "manifest.json", "run_key.json"):
        strict_loads((out / name).read_text(encoding="utf-8"))
    metrics = strict_loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["rows"] == n
    for value in _numbers(metrics):
        assert math.isfinite(value)


def _numbers(value: Any):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, float):
        yield value


# ------------------------------------------------------------------ properties


@pytest.mark.slow  # several seconds: the slow tier runs it (the unit tier stays under 2 min)
@SMALL
@given(data=st.data())
def test_random_rows_each_come_out_once_as_strict_json(images, monkeypatch, data):
    lines = data.draw(st.lists(input_row(images), min_size=1, max_size=8))
    fmt = data.draw(st.sampled_from(BBOX_FORMATS))
    run(lines, [], monkeypatch, [f"data.bbox_format={fmt}"])


@pytest.mark.slow  # several seconds: the slow tier runs it (the unit tier stays under 2 min)
@SMALL
@given(data=st.data())
def test_random_engine_answers_never_lose_or_break_a_row(images, monkeypatch, data):
    good = [json.dumps({"id": f"r{i}", "image": str(images / "a.png"), "bbox": [[1, 2, 20, 20], [30, 5, 20, 30]]})
            for i in range(data.draw(st.integers(1, 5)))]
    answers = data.draw(st.lists(answer, min_size=1, max_size=6))
    prompt = data.draw(st.sampled_from(["marked", "coords", "crop"]))
    run(good, answers, monkeypatch, [f"prompt={prompt}"])


@pytest.mark.slow
@BIG
@given(data=st.data())
def test_many_random_rows_and_answers(images, monkeypatch, data):
    lines = data.draw(st.lists(input_row(images), min_size=1, max_size=12))
    answers = data.draw(st.lists(answer, max_size=6))
    fmt = data.draw(st.sampled_from(BBOX_FORMATS))
    prompt = data.draw(st.sampled_from(["marked", "coords", "crop", "dataflow"]))
    run(lines, answers, monkeypatch, [f"data.bbox_format={fmt}", f"prompt={prompt}"], resume=True)


# ------------------------------------------------------------------ findings, kept as plain cases


@pytest.mark.parametrize("text", ["\x85", "a\u2028b\u2029c", "1: caption\x1cwith a file separator"])
def test_an_answer_with_unicode_line_breaks_stays_one_record_per_line(images, monkeypatch, text):
    """Found by the answers property: U+0085, U+2028 and the like are legal raw in JSON strings; the
    writer escapes them, so the records file has one record per line whatever splits it."""
    from regioncap.records import read_jsonl

    rows = [json.dumps({"id": "r0", "image": str(images / "a.png"), "bbox": [[1, 2, 20, 20]]})]
    folder = Path(tempfile.mkdtemp(prefix="regioncap-prop-"))
    try:
        (folder / "rows.jsonl").write_text(rows[0] + "\n", encoding="utf-8")
        cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={folder / 'rows.jsonl'}",
                       "max_error_rate=1", "workers=0"], output_dir=folder / "run")
        monkeypatch.setattr(fake_engine.FakeEngine, "_one", lambda self, req: Response(key=req.key, text=text))
        execute(cfg)
        records = list(read_jsonl(folder / "run" / "captions.jsonl"))
        assert len(records) == 1 and records[0]["answer"] == text
        check(folder / "run", 1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow  # several seconds: the slow tier runs it (the unit tier stays under 2 min)
@SMALL
@given(data=st.data())
def test_random_grounding_answers_never_lose_or_break_a_row(images, monkeypatch, data):
    """propose=vlm: the engine's grounding answer (random here) decides the regions of rows without boxes."""
    rows = [json.dumps({"id": f"g{i}", "image": str(images / name)})
            for i, name in enumerate(data.draw(st.lists(st.sampled_from(["a.png", "b.jpg", "c.png"]),
                                                        min_size=1, max_size=4)))]
    grounding = st.one_of(answer, st.fixed_dictionaries({"text": st.lists(
        st.fixed_dictionaries({"bbox_2d": st.one_of(st.lists(number, min_size=4, max_size=4), junk),
                               "label": st.one_of(st.text(max_size=10), junk)}), max_size=4).map(
        lambda v: json.dumps(v, allow_nan=True))}))
    answers = data.draw(st.lists(grounding, min_size=1, max_size=6))
    run(rows, answers, monkeypatch, ["propose=vlm"])
