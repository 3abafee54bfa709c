"""Start-up apart, steady-state rates: the caption stage's rates leave out the engine's start-up."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import compose
from regioncap.job import execute
from regioncap.metrics import compute_metrics, format_summary
from regioncap.records import read_jsonl
from regioncap.stages import StageStats, merge_startup

LOAD_S, FIRST_S = 0.4, 0.3


@pytest.fixture
def slow_start(monkeypatch):
    """The fake engine with an artificial start-up: ``LOAD_S`` to build, ``FIRST_S`` more on its first call."""
    from regioncap.engines.fake import FakeEngine

    init, generate = FakeEngine.__init__, FakeEngine.generate

    def slow_init(self, **kw):
        time.sleep(LOAD_S)
        init(self, **kw)

    def slow_generate(self, requests):
        if not self.calls:
            time.sleep(FIRST_S)
        return generate(self, requests)

    monkeypatch.setattr(FakeEngine, "__init__", slow_init)
    monkeypatch.setattr(FakeEngine, "generate", slow_generate)


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_startup_is_reported_apart_and_left_out_of_the_rates(tmp_path, slow_start):
    out = tmp_path / "run"
    m = execute(compose(["engine=fake", "engine.batch_size=2", "workers=0", "progress=false"], output_dir=out))
    cap = m["stages"]["caption"]
    up, steady = cap["startup"], cap["steady"]
    assert steady["basis"] == "after_first_batch"
    assert up["engines"] == 1 and up["engine_load_s"] >= LOAD_S and up["first_batch_s"] >= FIRST_S
    assert up["time_to_first_caption_s"] >= LOAD_S + FIRST_S
    # The stage's seconds stay its wall time; the steady window starts after the start-up.
    assert cap["seconds"] >= steady["seconds"] + LOAD_S + FIRST_S
    records = list(read_jsonl(out / "captions.jsonl"))
    first = [r for r in records if r.get("timing", {}).get("first_batch")]
    assert first and steady["rows"] == len(records) - len(first) == steady["images"]
    assert steady["regions"] == m["regions_captioned"] - sum(
        1 for r in first for g in r["regions"] if g.get("caption"))
    # The rates are the steady counts over the steady seconds (which metrics.json rounds to 1 ms).
    s = steady["seconds"]
    assert steady["regions"] / (s + 5e-4) <= cap["regions_per_s"] <= steady["regions"] / max(s - 5e-4, 1e-9)
    assert steady["output_tokens"] / (s + 5e-4) <= cap["output_tokens_per_s"] + 0.1
    assert m["regions_per_s"] == cap["regions_per_s"] and m["images_per_s"] == cap["images_per_s"]
    # Latency quantiles leave out the first call's requests (its time is first_batch_s).
    later = [s for r in records if r not in first for s in r["requests"]]
    assert m["latency_s"]["n"] == len(later) and m["latency_s"]["max"] < FIRST_S
    line = next(x for x in format_summary(m, max_error_rate=0.1, out_dir=str(out)).splitlines()
                if x.startswith("caption:"))
    assert "start-up: first caption at" in line and "engine load" in line and "steady over" in line
    assert "regions/s" in line


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_one_engine_batch_gives_its_own_rates_and_says_so(tmp_path, slow_start):
    # Every row in one engine call (one vLLM call of a whole run, say): nothing after it to time, so
    # the rates are that batch's rows over its own seconds (warm-up in, engine load out).
    m = execute(compose(["engine=fake", "workers=0", "progress=false"], output_dir=tmp_path / "run"))
    cap = m["stages"]["caption"]
    steady, up = cap["steady"], cap["startup"]
    assert steady["basis"] == "first_batch" and steady["seconds"] == pytest.approx(up["first_batch_s"], abs=1e-3)
    assert steady["regions"] == m["regions_captioned"] and steady["seconds"] >= FIRST_S
    assert cap["regions_per_s"] == m["regions_per_s"] == pytest.approx(steady["regions"] / steady["seconds"],
                                                                       rel=0.01)  # over >= FIRST_S: rounding is small
    assert cap["seconds"] >= LOAD_S + steady["seconds"]
    assert m["latency_s"] is None  # every request was in the first call
    assert "nothing after the engine's first batch" in format_summary(m, max_error_rate=0.1, out_dir="x")


class _Writer:
    def commit(self, records):
        pass


def _answered(regions: int) -> dict:
    return {"status": "ok", "tokens": {"prompt": 10, "output": 3},
            "regions": [{"caption": "a red circle"}] * regions}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.one_of(st.integers(0, 4).map(_answered), st.just({"status": "error"})), max_size=4),
                max_size=6))
def test_the_steady_window_counts_what_follows_the_first_answered_commit(batches):
    stats = StageStats("caption")
    for batch in batches:
        stats.commit(_Writer(), batch)
    opened = next((i for i, b in enumerate(batches) if any("tokens" in r for r in b)), None)
    after = [r for b in batches[opened + 1:] for r in b] if opened is not None else []
    assert stats.rows == sum(map(len, batches))
    assert (stats.steady_seconds is None) == (opened is None)
    assert stats.steady["rows"] == len(after)
    assert stats.steady["images"] == sum("tokens" in r for r in after)
    assert stats.steady["regions"] == sum(len(r.get("regions") or ()) for r in after)
    assert stats.steady["output_tokens"] == 3 * stats.steady["images"]
    assert set(stats.timing()) == ({"steady", "first_batch"} if opened is not None else set())
    if opened is not None:
        assert stats.first["rows"] == len(batches[opened]) and stats.first["images"] >= 1


def test_visualize_stage_keeps_its_rates_over_its_seconds():
    stats = StageStats("visualize")
    stats.commit(_Writer(), [{"status": "pending", "regions": [{}]}])
    assert stats.timing() == {}
    m = compute_metrics([], {"visualize": {"rows": 4, "seconds": 2.0, "errors": {}, **stats.timing()}})
    assert m["stages"]["visualize"]["rows_per_s"] == 2.0 and "steady" not in m["stages"]["visualize"]


def test_replicas_start_up_in_parallel_the_slowest_counts():
    into: dict = {"time_to_first_caption_s": 9.0}
    merge_startup(into, {"engine_load_s": 2.0, "first_batch_s": 1.0, "engines": 1})
    merge_startup(into, {"engine_load_s": 3.0, "first_batch_s": 0.5, "engines": 1})
    merge_startup(into, {})
    assert into == {"time_to_first_caption_s": 9.0, "engines": 2, "engine_load_s": 3.0, "first_batch_s": 1.0}


def test_stats_travel_from_a_child_process_with_their_timing():
    child = StageStats("caption", startup={"engine_load_s": 1.5, "engines": 1})
    child.commit(_Writer(), [_answered(2)])
    child.commit(_Writer(), [_answered(3)])
    parent = StageStats("caption")
    parent.update(child.as_dict())
    assert parent.timing() == child.timing()
    assert parent.steady == Counter(rows=1, images=1, regions=3, prompt_tokens=10, output_tokens=3)


@pytest.mark.cli
@pytest.mark.slow
def test_isolated_child_reports_its_start_up(tmp_path):
    m = execute(compose(["engine=fake", "engine.batch_size=2", "progress=false", "executor=isolated"],
                        output_dir=tmp_path / "run"))
    cap = m["stages"]["caption"]
    up = cap["startup"]
    assert up["engines"] == 1 and up["engine_load_s"] >= 0 and up["first_batch_s"] >= 0
    # The child's process start (spawn, imports) is start-up too, and comes before the first caption.
    assert 0 < up["process_start_s"] <= up["time_to_first_caption_s"] <= cap["seconds"]
    assert cap["steady"]["rows"] > 0 and cap["regions_per_s"] > 0
