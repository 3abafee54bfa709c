"""regioncap.metrics on hand-made records (no model): every metric of
metrics.json, reference scores through pycocoevalcap, one streaming pass, and
the end-of-run summary."""

from __future__ import annotations

import json
import shutil
import weakref
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regioncap import metrics as mx
from regioncap.metrics import compute_metrics, format_summary, quantile, score_regions

PROMPT = ("The image has 2 numbered boxes drawn on it. Describe what is inside each box in one short "
          "sentence. Answer with exactly 2 lines, one per box, each in the form `<number>: <description>`.")


def region(rid: int, caption: Optional[str], *, src: Optional[int] = None, chunk: int = 0, attempt: int = 1,
           missing: Optional[bool] = None, reason: Optional[str] = None) -> Dict[str, Any]:
    reg = {"id": rid, "source_index": rid - 1 if src is None else src, "chunk": chunk, "number": rid,
           "caption": caption, "missing": caption is None if missing is None else missing, "attempt": attempt}
    if reg["missing"]:
        reg["reason"] = reason or "not_in_answer"
    return reg


def request(rids: List[int], *, prompt: str = PROMPT, size=(644, 336), latency: Optional[float] = 0.5,
            format_ok: bool = True, answer: Optional[str] = "1: x", error: Optional[dict] = None,
            reask: Optional[dict] = None) -> Dict[str, Any]:
    return {"key": "k", "image": "images/x.jpg", "image_size": list(size), "prompt": prompt, "numbers": rids,
            "region_ids": rids, "answer": None if error else answer, "error": error, "latency_s": latency,
            "format_ok": False if error else format_ok, "prompt_tokens": 10, "output_tokens": 5, "reask": reask}


def record(i: int, regions: List[dict], requests: List[dict], *, status: str = "ok", image: Optional[str] = None,
           error: Optional[dict] = None, tokens=(0, 0), **extra: Any) -> Dict[str, Any]:
    rec = {"id": f"row-{i}", "index": i, "image": image or f"img{i}.jpg", "image_path": f"/d/{image or f'img{i}.jpg'}",
           "regions": regions, "requests": requests, "status": status, "error": error,
           "dropped_boxes": [], "clipped_boxes": [], "tokens": {"prompt": tokens[0], "output": tokens[1]}}
    rec.update(extra)
    return rec


CAPTION_STAGES = {"visualize": {"rows": 5, "seconds": 2.0, "errors": {"image_unreadable": 1}},
                  "caption": {"rows": 5, "seconds": 4.0, "errors": {}}}


def sample_records() -> List[Dict[str, Any]]:
    """Five rows: ok (2 chunks), partial (reask + missing), a visualize error, no regions, a caption error."""
    return [
        record(0, [region(1, "a red car parked on the street"), region(2, "a tall tree", chunk=1)],
               [request([1]), request([2])], tokens=(100, 20),
               dropped_boxes=[{"index": 2, "reason": "outside_image"}, {"index": 3, "reason": "too_small"}],
               clipped_boxes=[{"index": 0, "reason": "clipped"}]),
        record(1, [region(1, "a dog", attempt=2), region(2, None)],
               [request([1, 2], format_ok=False, latency=1.5,
                        reask={"key": "k/reask", "prompt": "Describe only the boxes labelled 1 and 2.",
                               "latency_s": 0.25})],
               status="partial", image="img0.jpg", tokens=(50, 10),
               dropped_boxes=[{"index": 5, "reason": "outside_image"}]),
        record(2, [], [], status="error", error={"stage": "visualize", "kind": "image_unreadable", "message": "m"}),
        record(3, [], [], status="no_regions"),
        record(4, [region(1, None, reason="engine_error")],
               [request([1], error={"kind": "engine_error", "message": "boom"}, latency=None)],
               status="error", error={"stage": "caption", "kind": "engine_error", "message": "boom"}),
    ]


def test_counts_statuses_and_errors():
    m = compute_metrics(sample_records(), CAPTION_STAGES, meteor=False)
    assert (m["rows"], m["rows_ok"], m["rows_partial"], m["rows_no_regions"], m["error_rows"]) == (5, 1, 1, 1, 2)
    assert m["error_rate"] == 0.4
    assert m["errors"] == {"visualize/image_unreadable": 1, "caption/engine_error": 1}
    assert m["error_rows_by_stage"] == {"visualize": 1, "caption": 1}
    assert m["images"] == 4  # rows 0 and 1 share img0.jpg
    assert (m["regions"], m["regions_captioned"], m["regions_missing"]) == (5, 3, 2)
    assert m["regions_missing_by_reason"] == {"not_in_answer": 1, "engine_error": 1}
    assert m["regions_from_reask"] == 1
    assert (m["requests"], m["reasks"], m["chunks"]) == (4, 1, 4)
    assert (m["boxes_dropped"], m["boxes_clipped"]) == (3, 1)
    assert m["boxes_dropped_by_reason"] == {"outside_image": 2, "too_small": 1}
    assert "references" not in m  # no row carries references


def test_in_memory_images_count_once_per_row():
    recs = [record(i, [], [], status="no_regions", image="<in-memory image>", image_path=None) for i in range(3)]
    for r in recs:
        r["image_path"] = None
    assert compute_metrics(recs, {})["images"] == 3


def test_stage_times_and_throughput():
    m = compute_metrics(sample_records(), CAPTION_STAGES, meteor=False)
    assert m["wall_s"] == 6.0
    assert m["stages"]["visualize"] == {"rows": 5, "seconds": 2.0, "rows_per_s": 2.5, "images_per_s": 2.0,
                                        "regions_per_s": 2.5, "errors": {"image_unreadable": 1}}
    assert m["stages"]["caption"]["regions_per_s"] == 0.75  # 3 captioned in 4 s
    stages = {"caption": {"rows": 5, "seconds": 4.0, "errors": {}, "pid": 1234}}
    assert compute_metrics(sample_records(), stages)["stages"]["caption"]["pid"] == 1234  # carried through
    assert m["regions_per_s"] == 0.75 and m["images_per_s"] == 1.0
    # A zero-second or absent caption stage gives no rate rather than a division by zero.
    m0 = compute_metrics(sample_records(), {"visualize": {"rows": 5, "seconds": 0.0, "errors": {}}})
    assert m0["stages"]["visualize"]["rows_per_s"] is None and m0["regions_per_s"] is None


def test_tokens_and_visual_tokens():
    m = compute_metrics(sample_records(), CAPTION_STAGES, meteor=False)
    assert (m["prompt_tokens"], m["output_tokens"]) == (150, 30)
    per_image = (644 // 28) * (336 // 28)  # 23 * 12 = 276 visual tokens
    assert per_image == 276
    # 4 requests + 1 re-ask on the same image.
    assert m["visual_tokens"] == 5 * per_image
    assert m["visual_tokens_per_request"] == per_image
    assert m["visual_tokens_per_region"] == 5 * per_image / 5
    assert m["prompt_tokens_per_region"] == 30.0 and m["output_tokens_per_region"] == 6.0
    # patch/merge sizes come from the model config.
    m7 = compute_metrics(sample_records(), {}, patch_size=7, merge_size=2)
    assert m7["visual_tokens"] == 5 * (644 // 14) * (336 // 14)


def test_latency_quantiles():
    recs = [record(i, [region(1, "a cat")], [request([1], latency=float(i + 1),
                                                     reask={"latency_s": 0.1 * (i + 1)} if i < 10 else None)])
            for i in range(100)]
    m = compute_metrics(recs, {})
    assert m["latency_s"] == {"n": 100, "mean": 50.5, "p50": 50.5, "p95": 95.05, "min": 1.0, "max": 100.0}
    assert m["reask_latency_s"]["n"] == 10 and m["reask_latency_s"]["p50"] == pytest.approx(0.55)
    assert m["reasks"] == 10
    assert compute_metrics([], {})["latency_s"] is None


def test_quantile_matches_numpy():
    import numpy as np
    values = sorted([3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.3])
    for q in (0.0, 0.5, 0.95, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
    assert quantile([], 0.5) is None


def test_parse_success_rate_counts_answered_requests_only():
    recs = [record(0, [region(i, "a cat") for i in range(1, 5)],
                   [request([1]), request([2]), request([3], format_ok=False), request([4]),
                    request([5], error={"kind": "timeout", "message": "t"})])]
    m = compute_metrics(recs, {})
    assert (m["requests_answered"], m["requests_format_ok"], m["requests_failed"]) == (4, 3, 1)
    assert m["parse_success_rate"] == 0.75


def test_caption_length_empty_duplicates_and_prompt_repeats():
    regions = [
        region(1, "a dog"),                       # 2 words, duplicated (with 2 and 3)
        region(2, "A dog!"),                      # same once normalised
        region(3, " a  DOG "),
        region(4, ""),                            # empty
        region(5, "one short sentence"),          # contained in the prompt
        region(6, "describe what is inside each box in one short sentence please"),  # 4-gram share 7/8
        region(7, "a red bicycle leaning against a brick wall near the door"),  # 11 words
    ]
    other_row = record(1, [region(1, "a dog")], [request([1])])  # the same caption in another row is no duplicate
    recs = [record(0, regions, [request(list(range(1, 8)))]), other_row]
    m = compute_metrics(recs, {})
    assert m["captions_empty"] == 1
    assert m["captions_duplicated"] == 3
    assert m["captions_repeat_prompt"] == 2
    assert m["regions_captioned"] == 7  # the empty caption is not a caption
    words = [2, 2, 2, 3, 11, 11, 2]
    assert m["caption_words"]["n"] == 7
    assert m["caption_words"]["min"] == 2 and m["caption_words"]["max"] == 11
    assert m["caption_words"]["mean"] == round(sum(words) / 7, 2)
    assert m["caption_words"]["p50"] == 2.0
    assert m["caption_words"]["p95"] == pytest.approx(quantile(sorted(words), 0.95), abs=0.01)


def test_prompt_repeat_rule():
    assert mx.repeats_prompt("Describe what is inside each box.", PROMPT)
    assert mx.repeats_prompt("the image has 2 numbered boxes drawn on it describe", PROMPT)
    assert not mx.repeats_prompt("a woman holding an umbrella in the rain", PROMPT)
    assert not mx.repeats_prompt("box", None) and not mx.repeats_prompt("", PROMPT)
    # Whole words only: "ox" is inside "box" as letters, not as a word.
    assert not mx.repeats_prompt("ox", PROMPT)


def test_reasked_region_is_checked_against_the_reask_prompt():
    reask = {"prompt": "Describe only the boxes labelled 2 in one sentence", "latency_s": 0.2}
    recs = [record(0, [region(1, "a red car"), region(2, "describe only the boxes labelled 2", attempt=2)],
                   [request([1, 2], reask=reask)])]
    assert compute_metrics(recs, {})["captions_repeat_prompt"] == 1


def test_visualize_records_only():
    recs = [record(0, [{"id": 1, "source_index": 0, "chunk": 0, "number": 1}], [request([1])], status="pending",
                   tokens=(0, 0)),
            record(1, [], [], status="error", error={"stage": "visualize", "kind": "no_valid_boxes", "message": "m"})]
    for r in recs:
        for spec in r["requests"]:
            for k in ("answer", "error", "latency_s", "format_ok", "reask"):
                spec.pop(k)
        r.pop("tokens")
    m = compute_metrics(recs, {"visualize": {"rows": 2, "seconds": 1.0, "errors": {"no_valid_boxes": 1}}},
                        references_key="references")
    assert m["rows"] == 2 and m["rows_pending"] == 1 and m["error_rows"] == 1
    assert m["regions"] == 1 and m["regions_captioned"] == 0 and m["regions_missing"] == 0
    assert m["requests_answered"] == 0 and m["parse_success_rate"] is None
    assert m["visual_tokens"] == 276 and m["latency_s"] is None and m["caption_words"] is None
    assert m["regions_per_s"] is None


# ------------------------------------------------------------------ references
def ref_records(captions_refs, **kw) -> List[Dict[str, Any]]:
    """One row per (caption, references entry)."""
    return [record(i, [region(1, cap)], [request([1])], references=[refs], **kw)
            for i, (cap, refs) in enumerate(captions_refs)]


def test_perfect_and_unrelated_captions():
    perfect = score_regions([("a man riding a brown horse on the beach", ["a man riding a brown horse on the beach"])])
    assert perfect[0]["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect[0]["rouge_l"] == 1.0
    assert perfect[0]["meteor"] is None  # not asked for
    unrelated = score_regions([("a bowl of hot soup", ["two dogs playing in the snow"])])
    assert unrelated[0]["bleu4"] < 1e-6 and unrelated[0]["rouge_l"] == 0.0 and unrelated[0]["cider"] == 0.0

    m = compute_metrics(ref_records([("a man riding a brown horse on the beach",
                                      "A man riding a brown horse on the beach.")]), {}, meteor=False)
    refs = m["references"]
    assert refs["regions_scored"] == 1 and refs["bleu4"] == pytest.approx(1.0, abs=1e-4) and refs["rouge_l"] == 1.0
    assert refs["meteor"] is None and refs["meteor_absent"] == "not requested"
    m = compute_metrics(ref_records([("a bowl of hot soup", "two dogs playing in the snow")]), {}, meteor=False)
    assert m["references"]["bleu4"] < 1e-6 and m["references"]["rouge_l"] == 0.0


def test_reference_scores_are_on_the_toolkits_ptb_tokens():
    # PTB splits the possessive and keeps the brackets ("-lrb-"), as the COCO toolkit does;
    # regioncap's own words (exact match) drop both.
    pairs = [("A woman's hat (red).", ["a woman 's hat -lrb- red -rrb-"]), ("a dog", ["A dog, running."])]
    corpus, per = mx.score_references(pairs)
    assert per[0]["rouge_l"] == pytest.approx(1.0) and per[0]["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert per[0]["exact_match"] == 0.0  # "a woman s hat red" vs "a woman s hat lrb red rrb"
    assert corpus["bleu1"] >= corpus["bleu2"] >= corpus["bleu3"] >= corpus["bleu4"] > 0
    # 7 and 2 tokens; references 7 and 3; the 2-token caption has no 4-gram.
    assert corpus["caption_tokens_mean"] == 4.5 and corpus["reference_tokens_mean"] == 5.0
    assert corpus["captions_without_4gram"] == 0.5
    # The corpus BLEU is that of the summed per-pair statistics.
    bleu = mx.bleu_from_stats([sum(col) for col in zip(*mx.bleu_stats(pairs))])
    assert [corpus[f"bleu{k}"] for k in range(1, 5)] == [round(b, 4) for b in bleu]

    m = compute_metrics(ref_records(pairs), {}, meteor=False)["references"]
    assert m["tokenizer"] == mx.TOKENIZER and "PTB" in m["tokenizer"]
    line = next(t for t in format_summary({**compute_metrics(ref_records(pairs), {}, meteor=False), "errors": {},
                                           "stages": {}}, max_error_rate=0.1, out_dir="o").splitlines()
                if t.startswith("references"))
    assert "captions 4.5 PTB tokens, references 5.0 (50% of captions too short for BLEU-4)" in line
    assert {k: m[k] for k in corpus if k != "scoring_s"} == {k: v for k, v in corpus.items() if k != "scoring_s"}
    from regioncap import metricspec

    assert not metricspec.undeclared(compute_metrics(ref_records(pairs), {}, meteor=False))
    assert {f"references.bleu{k}" for k in range(1, 5)} <= set(metricspec.objective_names())


def test_cider_rewards_a_matching_caption_in_a_corpus():
    pairs = [("a man riding a horse", ["a man riding a horse", "a person on a horse"]),
             ("a red car parked on the street", ["a red car on a street"]),
             ("a plate of food", ["two dogs playing in the grass"]),
             ("a cat sleeping on a sofa", ["a cat asleep on the couch"])]
    per = score_regions(pairs)
    assert per[0]["cider"] > 1.0 and per[1]["cider"] > 0.0
    assert per[2]["cider"] == 0.0 and per[2]["rouge_l"] == 0.0
    assert per[0]["cider"] > per[3]["cider"]
    m = compute_metrics(ref_records([(c, r) for c, r in pairs]), {}, meteor=False)
    assert m["references"]["cider"] == pytest.approx(sum(p["cider"] for p in per) / 4, abs=1e-3)
    assert 0.0 < m["references"]["bleu4"] < 1.0


def test_references_as_string_or_list_and_alignment_by_source_index():
    # Box 0 was dropped in visualize: the one region has source_index 1 and must meet references[1].
    rec = record(0, [region(1, "a black cat", src=1)], [request([1])],
                 references=["wrong reference for the dropped box", ["a dark cat", "a black cat"]])
    rec_str = record(1, [region(1, "a yellow taxi")], [request([1])], references=["a yellow taxi"])
    m = compute_metrics([rec, rec_str], {}, meteor=False)
    refs = m["references"]
    assert refs["regions_scored"] == 2 and refs["references_missing"] == 0
    assert refs["rouge_l"] == 1.0
    found = mx.region_references(rec, "references")
    assert found[0] and found[1][0][1] == ["a dark cat", "a black cat"] and found[2] == 0
    # A bare string is the reference of box 0 (a one-box row).
    assert mx.region_references(record(2, [region(1, "x")], [], references="a taxi"), "references")[1][0][1] == ["a taxi"]


def test_misaligned_or_malformed_references_are_skipped_and_counted():
    rows = [
        # Three boxes, two references: the third region is skipped and counted.
        record(0, [region(1, "a cat"), region(2, "a dog"), region(3, "a bird")],
               [request([1, 2, 3])], references=["a cat", ["a dog"]]),
        # Empty, None and non-text entries count as missing too.
        record(1, [region(1, "a cat"), region(2, "a dog"), region(3, "a bird")],
               [request([1, 2, 3])], references=["", None, [1, 2]]),
        record(2, [region(1, "a cat")], [request([1])], references={"not": "a list"}),
        record(3, [region(1, "a cat")], [request([1])], references=42),
        # A region with references but without a caption is not scored.
        record(4, [region(1, None)], [request([1])], status="error", references=["a fish"]),
        record(5, [region(1, "a cow")], [request([1])]),  # no references at all: not counted
    ]
    refs = compute_metrics(rows, {}, meteor=False)["references"]
    assert refs["rows_with_references"] == 5
    assert refs["regions_with_references"] == 3 and refs["regions_scored"] == 2
    assert refs["references_missing"] == 1 + 3 + 1 + 1
    assert refs["references_uncaptioned"] == 1
    assert refs["bleu4"] is not None
    # Rows 1 (an entry of numbers), 2 (a dict) and 3 (a number) are malformed, not "without a reference":
    # counted, and said (a shorter list, "" and null entries are not malformed).
    assert refs["rows_malformed"] == 3


def test_malformed_references_are_counted_and_named_in_a_warning(caplog):
    rows = [record(0, [region(1, "a cat")], [request([1])], references=5),
            record(1, [region(1, "a cat")], [request([1])], references={"1": "a cat"}),
            # A single string is the one box's reference, as docs/formats.md says: legitimate.
            record(2, [region(1, "a cat")], [request([1])], references="a cat")]
    with caplog.at_level("WARNING", logger="regioncap"):
        refs = compute_metrics(rows, {}, meteor=False, bootstrap_resamples=0)["references"]
    assert refs["rows_malformed"] == 2 and refs["regions_scored"] == 1 and refs["references_missing"] == 2
    warning, = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert "2 row(s) carry a malformed 'references' field (data.references_key)" in warning
    assert "row 'row-0': a number (5), not a list" in warning
    assert mx.references_problem(rows[2], "references") is None
    assert mx.references_problem(record(3, [], [], references=["a", None, ["b"], ""]), "references") is None
    assert mx.references_problem(record(3, [], [], references=["a", 7]), "references") == \
        "entry 1 is a number (7), not a string or a list of strings"
    # Well-formed references say nothing.
    caplog.clear()
    with caplog.at_level("WARNING", logger="regioncap"):
        assert compute_metrics(rows[2:], {}, meteor=False, bootstrap_resamples=0)["references"]["rows_malformed"] == 0
    assert not [r for r in caplog.records if "malformed" in r.getMessage()]


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                 max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(_JSON)
def test_references_are_malformed_exactly_when_not_text_per_box(value):
    rec = record(0, [region(1, "a cat")], [], references=value)
    entries = value if isinstance(value, list) else [value]
    well_formed = isinstance(value, (str, list)) and all(
        e is None or isinstance(e, str) or (isinstance(e, list) and all(isinstance(t, str) for t in e))
        for e in (entries if not isinstance(value, str) else []))
    problem = mx.references_problem(rec, "references")
    if value is None or (well_formed and not (isinstance(value, str) and value.lstrip().startswith("["))):
        assert problem is None
    if not isinstance(value, (str, list, type(None))):
        assert problem is not None and "not a list" in problem


def test_a_rate_over_nothing_is_null_not_100_percent():
    # An empty shard's share of the input: no rows, so no error rate (it was 1.0, "100% errors").
    m = compute_metrics([], {"caption": {"rows": 0, "seconds": 0.5, "errors": {}}})
    assert m["error_rate"] is None and m["error_rows"] == 0
    shares = [p for p, _ in mx.metricspec.leaf_paths(m)
              if (spec := mx.metricspec.get(p)) is not None and spec.unit == "share"]
    assert "error_rate" in shares and all(mx.metricspec.value_at(m, p) is None for p in shares)
    assert "error rate n/a" in format_summary(m, max_error_rate=0.1, out_dir="out")


def _caption_stage(first: Dict[str, int], steady: Dict[str, int], steady_s: float, first_s: float) -> Dict[str, Any]:
    keys = ("rows", "images", "regions", "prompt_tokens", "output_tokens")
    return {"caption": {"rows": first["rows"] + steady["rows"], "seconds": 5.0, "errors": {},
                        "steady": {"seconds": steady_s, **{k: steady.get(k, 0) for k in keys}},
                        "first_batch": {k: first.get(k, 0) for k in keys},
                        "startup": {"engine_load_s": 2.0, "first_batch_s": first_s}}}


def test_steady_rate_on_a_sliver_after_one_huge_first_batch_takes_both_parts():
    # One huge row of 2,499 regions fills the first batch; one row of one region follows in 0.014 s:
    # 70 regions/s "steady" beside about 2,500/s overall. Both parts together give the rate instead.
    stages = _caption_stage({"rows": 1, "images": 1, "regions": 2499}, {"rows": 1, "images": 1, "regions": 1},
                            0.014, 1.0)
    m = compute_metrics([], stages)
    cap = m["stages"]["caption"]
    assert cap["steady"]["basis"] == "with_first_batch"
    assert cap["steady"]["regions"] == 2500 and cap["steady"]["seconds"] == 1.014
    assert m["regions_per_s"] == cap["regions_per_s"] == round(2500 / 1.014, 3)
    summary = format_summary(m, max_error_rate=0.1, out_dir="out")
    assert "under 10% of the work after the engine's first batch: rates over both" in summary
    assert "caption throughput (steady, first batch included): 2465.48 regions/s" in summary
    # A steady part that holds a fair share stands alone, as before.
    stages = _caption_stage({"rows": 4, "images": 4, "regions": 14}, {"rows": 4, "images": 4, "regions": 11},
                            0.236, 0.413)
    cap = compute_metrics([], stages)["stages"]["caption"]
    assert cap["steady"]["basis"] == "after_first_batch" and cap["regions_per_s"] == round(11 / 0.236, 3)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 5000), st.integers(1, 50), st.integers(0, 50),
       st.floats(0.1, 100), st.floats(0.1, 100))
def test_steady_rates_rest_on_a_meaningful_share(first_regions, steady_regions, first_rows, steady_rows,
                                                 steady_s, first_s):
    stages = _caption_stage({"rows": first_rows, "images": first_rows, "regions": first_regions},
                            {"rows": steady_rows, "images": steady_rows, "regions": steady_regions},
                            steady_s, first_s)
    cap = compute_metrics([], stages)["stages"]["caption"]
    steady = cap["steady"]
    # Whatever the basis, the rate is over at least MIN_STEADY_SHARE of the regions after engine load.
    total = first_regions + steady_regions
    if total:
        assert steady["regions"] >= mx.MIN_STEADY_SHARE * total
    assert steady["basis"] in ("after_first_batch", "with_first_batch")
    if steady["basis"] == "with_first_batch":
        assert steady["regions"] == total and steady["seconds"] == round(steady_s + first_s, 3)
    assert cap["regions_per_s"] == pytest.approx(steady["regions"] / steady["seconds"], rel=0.01, abs=0.001)


def test_json_string_references_and_other_key_and_collided_key():
    rec = record(0, [region(1, "a cat")], [request([1])], caption_ref=json.dumps([["a cat", "a kitten"]]))
    refs = compute_metrics([rec], {}, references_key="caption_ref", meteor=False)["references"]
    assert refs["regions_scored"] == 1 and refs["rouge_l"] == 1.0
    # A references field named like a regioncap field is carried under "input".
    rec = record(0, [region(1, "a cat")], [request([1])], input={"prompt": ["a cat"]})
    assert compute_metrics([rec], {}, references_key="prompt", meteor=False)["references"]["regions_scored"] == 1
    assert "references" not in compute_metrics([rec], {}, references_key=None)


def test_references_present_but_nothing_to_score():
    rows = [record(0, [region(1, None)], [request([1])], status="error", references=["a fish"])]
    refs = compute_metrics(rows, {}, meteor=False)["references"]
    assert refs["regions_scored"] == 0
    assert refs["bleu4"] is None and refs["rouge_l"] is None and refs["cider"] is None and refs["meteor"] is None


def test_score_regions_keeps_order_and_marks_pairs_without_references():
    per = score_regions([("a cat", ["a cat sitting"]), ("a dog", []), ("a dog", [""]), ("a cow", "a cow")])
    assert len(per) == 4
    assert per[1] == per[2] == {"bleu4": None, "rouge_l": None, "cider": None, "meteor": None,
                                "exact_match": None, "attribute_accuracy": None}
    assert per[3]["exact_match"] == 1.0 and per[0]["exact_match"] == 0.0
    assert per[0]["attribute_accuracy"] == 0.5  # "cat" found, "sitting" not
    assert per[0]["rouge_l"] > 0 and per[3]["rouge_l"] == 1.0


def test_meteor_absent_without_java(monkeypatch):
    monkeypatch.setattr(mx.shutil, "which", lambda name: None)
    refs = compute_metrics(ref_records([("a cat on a mat", "a cat on a mat")]), {}, meteor=True)["references"]
    assert refs["meteor"] is None and "java is not on PATH" in refs["meteor_absent"]
    assert refs["rouge_l"] == 1.0


def test_scores_absent_without_pycocoevalcap(monkeypatch):
    monkeypatch.setattr(mx, "scorers_absent", lambda: "pycocoevalcap is not installed")
    refs = compute_metrics(ref_records([("a cat", "a cat")]), {}, meteor=False)["references"]
    assert refs["regions_scored"] == 1 and refs["bleu4"] is None
    assert refs["scores_absent"] == refs["meteor_absent"] == "pycocoevalcap is not installed"


@pytest.mark.slow
def test_meteor_with_java():
    # Java ships with the machines CI runs on; without it this must fail, not skip.
    assert shutil.which("java"), "METEOR needs java on PATH (apt-get install default-jre-headless)"
    pairs = [("a man riding a horse on the beach", "a man riding a horse on the beach"),
             ("a bowl of soup", "a red car parked on the street")]
    corpus, per = mx.score_references([(c, [r]) for c, r in pairs], meteor=True)
    assert corpus["meteor"] is not None and 0.0 < corpus["meteor"] < 1.0, corpus.get("meteor_absent")
    assert "meteor_absent" not in corpus and corpus["scoring_meteor_s"] > 0
    assert per[0]["meteor"] == pytest.approx(1.0) and per[1]["meteor"] < 0.1


# ------------------------------------------------------------------ streaming
class _Rec(dict):
    """A record that can be weakly referenced, so the test sees how many are alive."""


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_one_streaming_pass_over_20000_records():
    alive = 0
    most_alive = 0
    consumed = 0

    def dropped() -> None:
        nonlocal alive
        alive -= 1

    def gen():
        nonlocal alive, most_alive, consumed
        for i in range(20_000):
            rec = _Rec(record(i, [region(1, f"caption number {i}"), region(2, "a cat")],
                              [request([1, 2], latency=0.001 * (i % 100))], tokens=(300, 12),
                              references=["caption number %d" % i] if i % 1000 == 0 else None))
            weakref.finalize(rec, dropped)
            alive += 1
            most_alive = max(most_alive, alive)
            consumed += 1
            yield rec

    records = gen()
    m = compute_metrics(records, {"caption": {"rows": 20_000, "seconds": 10.0, "errors": {}}}, meteor=False)
    assert consumed == 20_000 and next(records, None) is None  # consumed once, to the end
    assert most_alive <= 2  # never held as a list
    assert m["rows"] == 20_000 and m["regions_captioned"] == 40_000 and m["images"] == 20_000
    assert m["references"]["regions_scored"] == 20 and m["references"]["references_missing"] == 20
    assert m["prompt_tokens"] == 6_000_000 and m["regions_per_s"] == 4000.0


# ------------------------------------------------------------------ summary
def test_format_summary_lines():
    recs = sample_records() + ref_records([("a man riding a horse", "a man riding a horse")])
    m = compute_metrics(recs, CAPTION_STAGES, meteor=False)
    text = format_summary(m, max_error_rate=0.1, out_dir="/tmp/run")
    lines = text.splitlines()
    assert lines[0].startswith("rows 6: ok 2, partial 1, no regions 1, errors 2 (error rate 33.3%, max 10.0%)")
    assert lines[1].startswith("regions 6: captioned 4, missing 2")
    assert "images 4, chunks 5" in text
    assert "caption: 5 rows in 4.00 s" in text
    assert "caption throughput: 1.00 regions/s, 1.00 images/s" in text
    assert "tokens per region:" in text
    assert "latency per request: p50 0.500 s, p95 1.350 s; re-asks p50 0.250 s" in text
    assert "parse success 75.0% of 4 answered requests" in text
    assert "references: 1 regions scored" in text and "ROUGE-L 1.000" in text and "METEOR n/a" in text
    assert "BLEU-4 1.000" in text and "BLEU-1 1.000" in text and "captions 5.0 PTB tokens, references 5.0" in text
    assert "  error caption/engine_error: 1" in text
    assert lines[-1] == "outputs: /tmp/run"


def test_format_summary_of_the_minimal_old_metrics():
    # The keys the summary always had are enough (older metrics.json files).
    m = {"rows": 1, "rows_ok": 1, "rows_partial": 0, "rows_no_regions": 0, "error_rows": 0, "error_rate": 0.0,
         "regions": 18, "regions_captioned": 18, "regions_missing": 0, "boxes_dropped": 0, "boxes_clipped": 0,
         "requests": 5, "reasks": 0, "prompt_tokens": 1, "output_tokens": 1, "errors": {},
         "stages": {"caption": {"rows": 1, "seconds": 1.0, "rows_per_s": 1.0}}}
    text = format_summary(m, max_error_rate=0.1, out_dir="x")
    assert "regions 18: captioned 18" in text and text.endswith("outputs: x")


# ------------------------------------------------------------------ the run
def test_run_writes_reference_scores_to_metrics_json(tmp_path, monkeypatch):
    from PIL import Image

    from conftest import compose
    from regioncap.job import execute

    def no_java(*args, **kwargs):
        raise AssertionError("the default run must not start METEOR's JVM")

    monkeypatch.setattr(mx, "_meteor", no_java)
    Image.new("RGB", (320, 240), (40, 120, 200)).save(tmp_path / "a.png")
    rows = [{"id": "x", "image": "a.png", "bbox": [[10, 10, 50, 50], [100, 100, 60, 60], [5, 5, 5, 5]],
             "references": ["fake caption of region 1 in x/c0", ["a blue square"]]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={tmp_path / 'rows.jsonl'}"],
                  output_dir=out)
    metrics = execute(cfg)
    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    refs = written["references"]
    assert refs["regions_scored"] == 2 and refs["references_missing"] == 1
    # METEOR is off by default (metrics.meteor=false): no JVM, and metrics.json says why it is absent.
    assert cfg.metrics.meteor is False
    assert refs["meteor"] is None and refs["meteor_absent"] == "not requested" and "scoring_meteor_s" not in refs
    assert 0.0 < refs["rouge_l"] < 1.0  # the fake adds the image size to its caption
    assert written["images"] == 1 and written["visual_tokens"] > 0 and written["parse_success_rate"] == 1.0


def test_metrics_config_section():
    from hydra.errors import HydraException

    from conftest import compose

    assert compose(["engine=fake"]).metrics.meteor is False
    assert compose(["engine=fake", "metrics.meteor=true"]).metrics.meteor is True
    with pytest.raises(HydraException):
        compose(["engine=fake", "metrics.meteorr=true"])


def test_reference_scoring_logs_its_start_and_time(caplog):
    caplog.set_level("INFO", logger="regioncap")
    mx.score_references([("a red circle", ["a red circle"]), ("a dog", ["a blue square"])])
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("reference scoring: 2 regions") and "METEOR off" in line for line in lines), lines
    assert any(line.startswith("reference scoring took") for line in lines), lines


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 50), st.integers(0, 50), st.integers(1, 10), st.floats(0.01, 100.0))
def test_a_stages_rates_are_over_what_it_committed(regions_done, captioned_done, images_done, seconds):
    # A resumed stage timed only the rows it did: its rates are over its own counts, never over
    # the whole records file (found by a kill loop: regions/s grew with every resume).
    records = [record(i, [region(1, "a cat"), region(2, "a dog")], [request([1, 2])]) for i in range(10)]
    st_ = {"rows": 3, "seconds": seconds, "errors": {}, "regions": regions_done,
           "regions_captioned": captioned_done, "images": images_done}
    m = compute_metrics(records, {"visualize": dict(st_), "caption": dict(st_)})
    vis, cap = m["stages"]["visualize"], m["stages"]["caption"]
    assert vis["regions_per_s"] == round(regions_done / seconds, 3)
    assert cap["regions_per_s"] == round(captioned_done / seconds, 3)
    assert vis["images_per_s"] == cap["images_per_s"] == round(images_done / seconds, 3)
    assert (vis["regions"], cap["regions_captioned"], vis["images"]) == (regions_done, captioned_done, images_done)
    # Without them (a record of an older run), the whole file's counts, as before.
    old = compute_metrics(records, {"visualize": {"rows": 10, "seconds": seconds, "errors": {}}})
    assert old["stages"]["visualize"]["regions_per_s"] == round(20 / seconds, 3)


def test_merged_stage_counts_are_summed_only_when_every_shard_has_them():
    from pathlib import Path

    from regioncap.merge import _Shard, _sum_stages

    def shard(**counts):
        return _Shard(Path("."), {}, metrics={"stages": {"visualize": {"rows": 2, "seconds": 1.0, **counts}}})

    both = _sum_stages([shard(regions=3, images=1), shard(regions=4, images=2)])["visualize"]
    assert (both["rows"], both["regions"], both["images"]) == (4, 7, 3) and "regions_captioned" not in both
    one_old = _sum_stages([shard(regions=3, images=1), shard()])["visualize"]
    assert "regions" not in one_old and "images" not in one_old


def test_a_row_without_an_image_is_no_image():
    # Invalid lines and rows without an image field once counted as distinct images.
    recs = [record(i, [], [], status="error", image="<no image>", image_path=None) for i in range(3)]
    recs.append(record(3, [region(1, "a cat")], [request([1])]))
    assert compute_metrics(recs, {})["images"] == 1
