"""The one answer validator (regioncap.engines.base.validate_answer / Response):
whatever an engine or a server hands back, the pipeline reads typed values."""

from __future__ import annotations

import json
import math

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from regioncap.engines.base import MAX_COUNT, Response, as_count, error_response, make_response, validate_answer

# Anything a JSON body or a model wrapper could put in a field: odd types, lone
# surrogates, huge and negative ints, non-finite floats, bytes, nested junk.
_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**18, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(), st.binary(max_size=20),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
    st.from_regex(r"\s*[0-9]{1,30}\s*", fullmatch=True), st.just("9" * 5000),
)
_junk = st.recursive(_scalar, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.text(max_size=5), kids, max_size=4)),
                     max_leaves=12)


def _typed(r: Response) -> None:
    assert r.text is None or isinstance(r.text, str)
    if r.text is not None:
        r.text.encode("utf-8")  # no lone surrogate left
    for n in (r.prompt_tokens, r.output_tokens):
        assert n is None or (type(n) is int and 0 <= n <= MAX_COUNT)
    assert r.finish_reason is None or isinstance(r.finish_reason, str)
    r.finish_reason is None or r.finish_reason.encode("utf-8")
    assert r.latency_s is None or (type(r.latency_s) is float and math.isfinite(r.latency_s) and r.latency_s >= 0)
    assert r.error is None or (set(r.error) == {"kind", "message"} and all(isinstance(v, str) for v in r.error.values()))
    assert r.ok == (r.error is None and r.text is not None)
    json.dumps(r.__dict__, allow_nan=False, ensure_ascii=False).encode("utf-8")  # writable as strict JSON


@pytest.mark.slow  # several seconds: the slow tier runs it (the unit tier stays under 2 min)
@settings(max_examples=400, deadline=None)
@given(text=_junk, error=st.one_of(st.none(), _junk), pt=_junk, ot=_junk, lat=_junk, fr=_junk)
def test_arbitrary_answers_give_typed_responses(text, error, pt, ot, lat, fr):
    r = make_response("k", text=text, error=error, prompt_tokens=pt, output_tokens=ot, latency_s=lat,
                      finish_reason=fr)
    _typed(r)
    # Response itself validates too: an engine that builds one directly gets the same.
    _typed(Response(key="k", text=text, error=error, prompt_tokens=pt, output_tokens=ot, latency_s=lat,
                    finish_reason=fr))
    if isinstance(text, str) and error is None:
        assert r.ok and len(r.text) == len(text)  # surrogates are replaced one for one


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text())
def test_error_responses_are_clean(kind, message):
    _typed(error_response("k", kind, message))


def test_the_findings_that_stopped_runs():
    r = make_response("k", text="a \udc80 b", prompt_tokens="12", output_tokens=" 7 ", latency_s=float("nan"),
                      finish_reason="stop")
    assert (r.text, r.prompt_tokens, r.output_tokens, r.latency_s, r.finish_reason) == ("a \ufffd b", 12, 7, None, "stop")
    assert as_count("9" * 5000) is None and as_count(10**30) is None and as_count(-1) is None
    assert as_count(True) is None and as_count(3.0) == 3 and as_count(3.5) is None and as_count("x") is None
    bad = make_response("k", text={"nested": [1, 2]})
    assert not bad.ok and bad.error["kind"] == "bad_response" and bad.text is None
    assert validate_answer(text=b"caf\xc3\xa9 \xff")["text"] == "café \ufffd"
    deep: list = []
    for _ in range(100_000):  # nested past any recursion limit: the validator never walks into it
        deep = [deep]
    junk = make_response("k", text=deep, error=None, prompt_tokens=deep, finish_reason=deep, latency_s=deep)
    _typed(junk)
    assert junk.error["kind"] == "bad_response"
