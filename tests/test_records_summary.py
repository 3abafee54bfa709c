"""The end-of-run caption summary (regioncap.records.caption_samples): it stays short whatever
the records hold."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from regioncap.records import SAMPLE_CHARS, caption_samples, cut_text


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_a_runaway_caption_is_cut_in_the_summary(tmp_path):
    # Found by a model answer of 120,000 characters: the summary put all of it in the log.
    caption = "a cat " * 20000
    path = _write(tmp_path / "captions.jsonl", [
        {"id": "x" * 5000, "regions": [{"id": 1, "caption": caption},
                                       {"id": 2, "caption": None, "missing": True, "reason": "not_in_answer"}]},
        {"id": "e", "error": {"kind": "k", "message": "m" * 5000}},
    ])
    text = caption_samples(path, reference=lambda rec, reg: ["r" * 5000])
    lines = text.splitlines()
    assert len(lines) == 4 and max(len(line) for line in lines) < 4 * SAMPLE_CHARS
    assert "<missing: not_in_answer>" in lines[2]
    assert json.loads(lines[1].split("] ", 1)[1].split("  (reference")[0]) == cut_text(caption, SAMPLE_CHARS)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=400), st.integers(1, 300))
def test_cut_text_keeps_short_text_and_bounds_long(text, n):
    out = cut_text(text, n)
    assert len(out) <= n
    assert out == text if len(text) <= n else (out[:-1] == text[: n - 1] and out.endswith("\u2026"))
