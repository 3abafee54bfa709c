"""Reference scores without holding the run (regioncap.metrics.ReferenceScorer): the
same numbers as the toolkit computes with every pair in memory, on random record
sets and on the shipped demo scenes; the streaming PTB batch and the interval
from per-row sums are the whole-batch ones.

The oracle here is the computation the scorer replaced, written out with
pycocoevalcap's own scorers: every pair gathered, tokenized as one batch of
captions and one of references, ``Bleu``/``Rouge``/``Cider`` over the whole
``gts``/``res``, and the intervals from per-region values.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regioncap import intervals as iv_mod
from regioncap import metrics as mx
from regioncap import ptb

pytest.importorskip("pycocoevalcap")

SHAPES = Path(mx.__file__).parent / "demo" / "shapes" / "shapes.jsonl"


# ------------------------------------------------------------------ the oracle
def toolkit_references(records: Sequence[Dict[str, Any]], *, n_boot: int, seed: int,
                       references_key: str = "references") -> Dict[str, Any]:
    """``metrics.json``'s ``references`` block as computed before streaming: every pair in memory."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not any(mx.region_references(rec, references_key)[0] for rec in records):
        return {}  # no row carries references: no references block
    pairs, rows = [], []
    for row, rec in enumerate(records):
        for reg, refs in mx.region_references(rec, references_key)[1]:
            if reg.get("caption") and mx.normalize(reg["caption"]):
                pairs.append((reg["caption"], refs))
                rows.append(row)
    out: Dict[str, Any] = {"regions_scored": len(pairs)}
    exact = [mx.exact_match(c, r) for c, r in pairs]
    attrs = [mx.attribute_accuracy(c, r) for c, r in pairs]
    out["exact_match"] = round(sum(exact) / len(exact), 4) if exact else None
    known = [a for a in attrs if a is not None]
    out["attribute_accuracy"] = round(sum(known) / len(known), 4) if known else None
    if not pairs:
        return out
    res = {i: [t] for i, t in enumerate(ptb.ptb_tokenize_batch([c for c, _ in pairs]))}
    flat = iter(ptb.ptb_tokenize_batch([t for _, r in pairs for t in r]))
    gts = {i: [next(flat) for _ in r] for i, (_, r) in enumerate(pairs)}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    out.update({f"bleu{k + 1}": round(float(bleu[k]), 4) for k in range(4)})
    out.update(rouge_l=round(float(rouge), 4), cider=round(float(cider), 4))
    cand = [len(res[i][0].split()) for i in res]
    refs = [len(r.split()) for i in gts for r in gts[i]]
    out.update(caption_tokens_mean=round(sum(cand) / len(cand), 3), reference_tokens_mean=round(sum(refs) / len(refs), 3),
               captions_without_4gram=round(sum(n < 4 for n in cand) / len(cand), 4))
    if n_boot:
        ivs = {}
        stats = mx.bleu_stats(pairs)
        per = {"bleu4": (stats, mx._bleu4_of_totals), "exact_match": (exact, "mean"),
               "attribute_accuracy": (attrs, "mean"), "rouge_l": (list(rouge_each), "mean"),
               "cider": (list(cider_each), "mean")}
        for name, (values, statistic) in per.items():
            keep = [i for i, v in enumerate(values) if v is not None]
            if not keep:
                continue
            iv = iv_mod.bootstrap_interval([values[i] for i in keep], [rows[i] for i in keep], statistic=statistic,
                                           n_boot=n_boot, seed=seed)
            if iv["low"] is not None:
                ivs[name] = {"low": round(iv["low"], 4), "high": round(iv["high"], 4),
                             "n_clusters": iv["n_clusters"], "n_boot": n_boot}
        out["intervals"] = ivs
    out["per_pair"] = [{"bleu4": float(bleu_each[3][i]), "rouge_l": float(rouge_each[i]),
                        "cider": float(cider_each[i])} for i in range(len(pairs))]
    out["pairs"] = pairs
    return out


def streamed(records: Sequence[Dict[str, Any]], *, n_boot: int, seed: int, **kw: Any) -> Dict[str, Any]:
    refs = mx.compute_metrics(iter(records), {}, bootstrap_resamples=n_boot, seed=seed, **kw).get("references") or {}
    return {k: v for k, v in refs.items() if k != "scoring_s"}


def assert_same(records: Sequence[Dict[str, Any]], *, n_boot: int = 60, seed: int = 0) -> Dict[str, Any]:
    want = toolkit_references(records, n_boot=n_boot, seed=seed)
    got = streamed(records, n_boot=n_boot, seed=seed)
    for key, value in want.items():
        if key in ("per_pair", "pairs"):
            continue
        assert got.get(key) == value, (key, got.get(key), value)
    if "intervals" not in want:
        assert "intervals" not in got or not want.get("regions_scored")
    if want.get("per_pair"):
        # Per pair, unrounded: the same bits as the toolkit's scorers.
        _, per = mx.score_references(want["pairs"])
        for mine, theirs in zip(per, want["per_pair"]):
            assert {k: mine[k] for k in theirs} == theirs
    return got


# ------------------------------------------------------------------ record sets
WORDS = ["a", "an", "the", "red", "blue", "green", "circle", "square", "star", "dog", "man's", "U.S.", "B.",
         "no.", "5", "3.5", "don't", "(big)", "\u00e9t\u00e9", "\u732b", "\U0001f600", "caf\u00e9", "--", "!"]
TEXT = st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=0, max_size=8).map(" ".join),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(lambda w: " ".join(w) + "."),
    st.text(max_size=12),
    st.sampled_from(["", " ", "...", "plan B.", "The dog", "a red circle", "A red circle."]),
)


@st.composite
def record_sets(draw: Any) -> List[Dict[str, Any]]:
    records = []
    for i in range(draw(st.integers(0, 8))):
        n = draw(st.integers(0, 4))
        regions = [{"id": k + 1, "source_index": k, "caption": draw(st.one_of(st.none(), TEXT))} for k in range(n)]
        rec: Dict[str, Any] = {"id": f"r{i}", "index": i, "status": "ok", "image_path": f"{i}.png",
                               "regions": regions}
        kind = draw(st.sampled_from(["list", "none", "short", "string"]))
        if kind == "list":
            rec["references"] = [draw(st.one_of(TEXT, st.lists(TEXT, max_size=3))) for _ in range(n)]
        elif kind == "short":
            rec["references"] = [draw(TEXT) for _ in range(max(0, n - 1))]
        elif kind == "string":
            rec["references"] = draw(TEXT)
        records.append(rec)
    return records


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_sets(), st.integers(0, 3))
def test_streamed_scores_equal_the_toolkits_on_random_records(records, seed):
    assert_same(records, n_boot=40, seed=seed)


def test_empty_one_row_no_references_and_a_huge_caption():
    assert streamed([], n_boot=50, seed=0) == {}
    no_refs = [{"id": "a", "index": 0, "status": "ok", "regions": [{"id": 1, "source_index": 0, "caption": "a cat"}]}]
    assert streamed(no_refs, n_boot=50, seed=0) == {}
    one = [{"id": "a", "index": 0, "status": "ok", "regions": [{"id": 1, "source_index": 0, "caption": "A cat."}],
            "references": ["a cat"]}]
    got = assert_same(one)
    assert got["exact_match"] == 1.0 and got["cider"] == 0.0  # one pair: every n-gram in every document
    huge = " ".join(random.Random(3).choice(WORDS) for _ in range(3000)) + " plan B."
    rows = [{"id": f"r{i}", "index": i, "status": "ok",
             "regions": [{"id": 1, "source_index": 0, "caption": huge if i == 1 else "a red circle"},
                         {"id": 2, "source_index": 1, "caption": "The dog no."}],
             "references": [["a red circle", huge[:300] + "."], "5 dogs"]} for i in range(3)]
    assert_same(rows)


def shapes_records(wrong_every: int = 3) -> List[Dict[str, Any]]:
    """The shipped shapes scenes as caption records: each region captioned with its reference,
    every ``wrong_every``-th with another colour (so exact match and the n-gram scores vary)."""
    out = []
    for i, line in enumerate(SHAPES.read_text().splitlines()):
        row = json.loads(line)
        regions = []
        for k, ref in enumerate(row["references"]):
            caption = ref.replace("red", "blue") if k % wrong_every == 0 and "red" in ref else \
                ref.replace("a ", "the ", 1) if k % wrong_every == 1 else ref
            regions.append({"id": k + 1, "source_index": k, "caption": caption.capitalize() + "."})
        out.append({"id": row["id"], "index": i, "status": "ok", "image_path": row["image"], "regions": regions,
                    "references": row["references"]})
    return out


#: ``references`` of metrics.json for :func:`shapes_records`, seed 0 and 1000 resamples, as the
#: scorer before streaming (every pair held) wrote it: the streamed scores must stay these.
SHAPES_BEFORE = {
    "regions_scored": 25, "bleu1": 0.88, "bleu2": 0.8285, "bleu3": 0.7602, "bleu4": 0.0257, "rouge_l": 0.88,
    "cider": 5.5813, "exact_match": 0.64, "attribute_accuracy": 0.96, "caption_tokens_mean": 3.0,
    "reference_tokens_mean": 3.0, "captions_without_4gram": 1.0,
    "intervals": {"bleu4": {"low": 0.023, "high": 0.0274, "n_clusters": 8, "n_boot": 1000},
                  "exact_match": {"low": 0.52, "high": 0.7273, "n_clusters": 8, "n_boot": 1000},
                  "attribute_accuracy": {"low": 0.8846, "high": 1.0, "n_clusters": 8, "n_boot": 1000},
                  "rouge_l": {"low": 0.84, "high": 0.9097, "n_clusters": 8, "n_boot": 1000},
                  "cider": {"low": 4.6929, "high": 6.1117, "n_clusters": 8, "n_boot": 1000}},
}


def test_shipped_shapes_scenes_score_as_before():
    records = shapes_records()
    got = assert_same(records, n_boot=1000, seed=0)
    assert {k: got[k] for k in SHAPES_BEFORE} == SHAPES_BEFORE
    # Cycled twenty times: more rows, the same streaming scores as the whole batch.
    many = [dict(rec, id=f"{rec['id']}-{k}", index=len(records) * k + i) for k in range(20)
            for i, rec in enumerate(records)]
    assert_same(many, n_boot=100, seed=4)


def test_shipped_demo_photos_with_their_objects_as_references():
    rows = [json.loads(line) for line in (SHAPES.parent.parent / "demo.jsonl").read_text().splitlines()]
    records = [{"id": r["id"], "index": i, "status": "ok", "image_path": r["image"], "objects": r["objects"],
                "regions": [{"id": k + 1, "source_index": k, "caption": f"the {obj} of the {r['id']}"}
                            for k, obj in enumerate(r["objects"])]} for i, r in enumerate(rows)]
    want = toolkit_references(records, n_boot=80, seed=2, references_key="objects")
    got = mx.compute_metrics(records, {}, references_key="objects", bootstrap_resamples=80, seed=2)["references"]
    assert {k: got[k] for k in want if k not in ("per_pair", "pairs")} == \
        {k: v for k, v in want.items() if k not in ("per_pair", "pairs")}
    assert got["cider"] > 0


def test_reference_intervals_of_per_region_values_are_the_streamed_ones():
    records = shapes_records(wrong_every=2)
    pairs = [(reg["caption"], [rec["references"][reg["source_index"]]]) for rec in records for reg in rec["regions"]]
    rows = [i for i, rec in enumerate(records) for _ in rec["regions"]]
    _, per = mx.score_references(pairs)
    assert mx.reference_intervals(per, rows, n_boot=300, seed=5, pairs=pairs) == \
        streamed(records, n_boot=300, seed=5)["intervals"]
    # Rows given out of order: the clusters are sorted, each summed in the order given, as
    # bootstrap_interval does with per-region values (a sum in another order can flip a tie
    # between a resample and the estimate, so the order is part of the result).
    order = list(range(len(per)))[::-1]
    got = mx.reference_intervals([per[i] for i in order], [rows[i] for i in order], n_boot=300, seed=5)
    for name in ("exact_match", "rouge_l", "cider"):
        want = iv_mod.bootstrap_interval([per[i][name] for i in order], [rows[i] for i in order], n_boot=300, seed=5)
        assert got[name] == {"low": round(want["low"], 4), "high": round(want["high"], 4), "n_clusters": 8,
                             "n_boot": 300}


# ------------------------------------------------------------------ CIDEr-D, one pair at a time
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(WORDS[:12]), min_size=0, max_size=7),
                          st.lists(st.lists(st.sampled_from(WORDS[:12]), min_size=1, max_size=7), min_size=1,
                                   max_size=3)), min_size=1, max_size=12))
def test_cider_of_one_pair_is_the_toolkits_bit_for_bit(corpus):
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.cider.cider_scorer import precook

    gts = {i: [" ".join(r) for r in refs] for i, (_, refs) in enumerate(corpus)}
    res = {i: [" ".join(c)] for i, (c, _) in enumerate(corpus)}
    want_mean, want = Cider().compute_score(gts, res)
    df: Dict[tuple, float] = {}
    for i in gts:
        for ngram in {g for ref in gts[i] for g in precook(ref, 4)}:
            df[ngram] = df.get(ngram, 0.0) + 1.0
    got = [mx._cider(res[i][0], gts[i], df, np.log(float(len(gts)))) for i in gts]
    assert got == [float(x) for x in want]
    assert float(np.mean(np.array(got))) == float(want_mean)


# ------------------------------------------------------------------ the PTB batch, streamed
def whole_batch(texts: Sequence[Optional[str]]) -> List[str]:
    """ptb_tokenize_batch as it was written before the streaming batch: the whole list at once."""
    clean = [t.replace("\n", " ") if t else "" for t in texts]
    out = []
    for i, text in enumerate(clean):
        if i + 1 == len(clean):
            out.append(ptb._tokenize_lexed(text, None) if text else "")
        elif ptb._PERIOD_END.search(text):
            following, j = [], i + 1
            while j < len(clean) and sum(len(f) + 1 for f in following) < ptb._CONTEXT_CHARS:
                following.append(clean[j])
                j += 1
            out.append(ptb._tokenize_cached(text, ptb._context(text, "\n".join(following))))
        else:
            out.append(ptb._tokenize_cached(text) if text else "")
    return out


PIECES = ["plan B.", "The dog", "no.", "5 cats", "A.", "etc.", "", None, "x" * 390 + ".", "He said", "U.S.",
          "fig.", "3 apples.", "a\nb.", "=D", "Mr.", "I'll go", "cat. ", " ", "\u00a0.", "J. ", "y" * 120]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=20)), max_size=14))
def test_streamed_ptb_batch_is_the_whole_batch(texts):
    batch = ptb.PTBBatch()
    out: List[str] = []
    for i, text in enumerate(texts):
        out.extend(batch.push(text))
        assert len(out) <= i  # the last text pushed always waits: it may be the batch's last
    out.extend(batch.finish())
    assert out == whole_batch(texts) == ptb.ptb_tokenize_batch(texts)


def test_streamed_batch_holds_only_the_texts_whose_tokens_wait_on_the_next():
    batch = ptb.PTBBatch()
    assert batch.push("a red circle") == []  # the batch's last, until another comes
    assert batch.push("a dog") == ["a red circle"]
    assert batch.push("plan B.") == ["a dog"]
    assert batch.push("The cat") == []  # "plan B." waits for 400 characters of context
    assert batch.push("z" * 400) == ["plan b", "the cat"]
    assert batch.finish() == ["z" * 400]


# ------------------------------------------------------------------ intervals from per-row sums
@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.floats(0, 5, allow_nan=False)), min_size=1, max_size=40),
       st.integers(0, 5))
def test_interval_of_cluster_totals_is_the_bootstrap_interval(values, seed):
    values.sort(key=lambda v: v[0])
    want = iv_mod.bootstrap_interval([v for _, v in values], [c for c, _ in values], n_boot=120, seed=seed)
    sums, counts, _ = iv_mod.cluster_totals([v for _, v in values], [c for c, _ in values])
    assert iv_mod.totals_interval(sums, counts, n_boot=120, seed=seed) == want
    row_sums = mx._RowSums()
    for cluster, value in values:
        row_sums.add(cluster, (value,))
    got = row_sums.interval("mean", n_boot=120, seed=seed, confidence=0.95)
    if want["low"] is None:
        assert got is None
    else:
        assert got == {"low": round(want["low"], 4), "high": round(want["high"], 4),
                       "n_clusters": want["n_clusters"], "n_boot": 120}


def test_resampling_block_size_changes_no_draw(monkeypatch):
    rng = np.random.default_rng(1)
    values, clusters = rng.random(3000), np.sort(rng.integers(0, 900, 3000))
    want = iv_mod.bootstrap_interval(values, clusters.tolist(), n_boot=300, seed=9)
    for block in (1, 1000, 10 ** 8):
        monkeypatch.setattr(iv_mod, "_BLOCK", block)
        assert iv_mod.bootstrap_interval(values, clusters.tolist(), n_boot=300, seed=9) == want
    assert math.isfinite(want["low"])


# ------------------------------------------------------------------ METEOR, streamed (a JVM: slow tier)
@pytest.mark.slow
def test_streamed_meteor_is_the_toolkits_and_its_watchdog_stops_it():
    import shutil

    # Java ships with the machines CI runs on; without it this must fail, not skip.
    assert shutil.which("java"), "METEOR needs java on PATH (apt-get install default-jre-headless)"
    records = shapes_records()
    want = toolkit_references(records, n_boot=0, seed=0)
    res = {i: [t] for i, t in enumerate(ptb.ptb_tokenize_batch([c for c, _ in want["pairs"]]))}
    flat = iter(ptb.ptb_tokenize_batch([t for _, r in want["pairs"] for t in r]))
    gts = {i: [next(flat) for _ in r] for i, (_, r) in enumerate(want["pairs"])}
    score, each = mx._meteor(gts, res, 600.0)  # the toolkit's compute_score, every pair at once
    got = mx.compute_metrics(records, {}, meteor=True, bootstrap_resamples=0)["references"]
    assert got["meteor"] == round(score, 4) and "meteor_absent" not in got
    _, per = mx.score_references(want["pairs"], meteor=True)
    assert [p["meteor"] for p in per] == each
    # A JVM past its time is killed: METEOR absent with the reason, every other score still there.
    slow = mx.compute_metrics(records, {}, meteor=True, meteor_timeout_s=0.01, bootstrap_resamples=0)["references"]
    assert slow["meteor"] is None and slow["meteor_absent"].startswith("METEOR failed: TimeoutError")
    assert slow["cider"] == got["cider"]
