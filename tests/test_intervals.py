"""Cluster bootstrap intervals (regioncap/intervals.py): coverage by simulation, determinism,
paired comparisons, and where they surface: metrics.json, the summary line, the sweep report."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import compose
from regioncap import metricspec
from regioncap.intervals import METHOD, bootstrap_interval, paired_difference
from regioncap.job import execute
from regioncap.metrics import format_summary
from regioncap.report import write_report


# ---------------------------------------------------------------- coverage
def _clustered_shares(rng: np.random.Generator, p: float, images: int, concentration: float):
    """One data set: per image a rate drawn from Beta (mean ``p``: images differ), 1-6 regions
    per image, each region right with its image's rate. The truth (the mean over regions in the
    population) is ``p``, since the region count does not depend on the rate."""
    per_image = rng.integers(1, 7, size=images)
    rates = rng.beta(p * concentration, (1 - p) * concentration, size=images)
    values = (rng.random(per_image.sum()) < np.repeat(rates, per_image)).astype(float)
    return values, np.repeat(np.arange(images), per_image)


def _coverage(p: float, images: int, concentration: float, draws: int, n_boot: int, *,
              by_region: bool = False, seed: int = 20261206) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for draw in range(draws):
        values, clusters = _clustered_shares(rng, p, images, concentration)
        if by_region:  # the mistake the cluster bootstrap avoids: every region its own cluster
            clusters = np.arange(values.size)
        iv = bootstrap_interval(values, clusters, n_boot=n_boot, seed=draw)
        hits += iv["low"] <= p <= iv["high"]
    return hits / draws


def test_95_percent_intervals_cover_a_known_rate_95_percent_of_the_time():
    # 400 simulated runs of 80 images with strong per-image effects (measured: 0.935; 2000 draws: slow tier).
    assert 0.93 <= _coverage(0.8, 80, 6.0, draws=400, n_boot=500) <= 0.97


def test_resampling_regions_instead_of_images_would_be_too_narrow():
    # Same data, every region its own cluster: the per-image effect is ignored and coverage drops.
    assert _coverage(0.8, 80, 2.0, draws=200, n_boot=300, by_region=True) < 0.88
    assert _coverage(0.8, 80, 2.0, draws=200, n_boot=300) >= 0.91


@pytest.mark.slow
@pytest.mark.parametrize("p,images,concentration", [(0.8, 80, 6.0), (0.5, 120, 3.0), (0.7, 60, 4.0),
                                                    (0.9, 200, 4.0)])
def test_coverage_over_many_draws(p, images, concentration):
    assert 0.93 <= _coverage(p, images, concentration, draws=2000, n_boot=1000) <= 0.97


# ---------------------------------------------------------------- the interval itself
def test_same_seed_same_interval_and_the_fields_of_an_interval():
    rng = np.random.default_rng(3)
    values, clusters = _clustered_shares(rng, 0.7, 40, 4.0)
    a = bootstrap_interval(values, clusters, seed=11)
    assert a == bootstrap_interval(values.tolist(), [f"img{c}" for c in clusters], seed=11)  # ids of any kind
    assert a != bootstrap_interval(values, clusters, seed=12)
    assert a["estimate"] == pytest.approx(values.mean())
    assert a["low"] < a["estimate"] < a["high"]
    assert (a["n_clusters"], a["n_regions"], a["n_boot"], a["confidence"], a["method"], a["seed"]) == \
        (40, values.size, 1000, 0.95, METHOD, 11)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1), min_size=1, max_size=5), min_size=1, max_size=25),
       st.integers(0, 2**31))
def test_an_interval_lies_within_the_values(rows: List[List[float]], seed: int):
    values = [v for row in rows for v in row]
    clusters = [i for i, row in enumerate(rows) for _ in row]
    iv = bootstrap_interval(values, clusters, n_boot=200, seed=seed)
    if len(rows) == 1:  # one row: no interval, only the estimate
        assert iv["low"] is iv["high"] is None and iv["estimate"] == pytest.approx(sum(values) / len(values))
        return
    assert min(values) - 1e-12 <= iv["low"] <= iv["high"] <= max(values) + 1e-12
    if len(set(values)) == 1:  # nothing varies: the interval is the value itself
        assert iv["low"] == iv["high"] == pytest.approx(values[0])


def test_one_row_has_no_interval_and_no_paired_verdict():
    """One image gave [v, v]: a score read as certain, and a paired difference over one row in common
    that excluded zero made a sweep report call a job best on a single image."""
    from regioncap.report import _diff_text

    iv = bootstrap_interval([1.0, 0.0, 1.0], [0, 0, 0])
    assert (iv["estimate"], iv["low"], iv["high"], iv["n_clusters"]) == (pytest.approx(2 / 3), None, None, 1)
    diff = paired_difference({"r": [1.0, 1.0]}, {"r": [0.0, 0.0]})
    assert (diff["difference"], diff["low"], diff["high"], diff["includes_zero"]) == (1.0, None, None, True)
    assert _diff_text("references.exact_match", diff) == "+100.0 pts (one row in common: no interval)"
    two = paired_difference({"r": [1.0], "s": [1.0]}, {"r": [0.0], "s": [0.0]})
    assert two["low"] == two["high"] == 1.0 and not two["includes_zero"]  # two rows: an interval again


def test_no_values_and_bad_inputs_are_named():
    assert bootstrap_interval([], [])["low"] is None
    with pytest.raises(ValueError, match="3 values but 2 cluster ids"):
        bootstrap_interval([1.0, 0.0, 1.0], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_interval([1.0, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="n_boot=0"):
        bootstrap_interval([1.0], [0], n_boot=0)
    with pytest.raises(ValueError, match="statistic='median'"):
        bootstrap_interval([1.0], [0], statistic="median")


def test_ratio_and_vector_statistics():
    # Matched words over candidate words, per region: the ratio of sums, not the mean of ratios.
    stats = np.array([[3, 4], [0, 1], [5, 5], [2, 8], [6, 6], [1, 2]], dtype=float)
    iv = bootstrap_interval(stats, [0, 0, 1, 2, 2, 3], statistic="ratio", seed=1)
    assert iv["estimate"] == pytest.approx(17 / 26)
    assert iv["low"] <= iv["estimate"] <= iv["high"]
    mean_first = bootstrap_interval(stats, [0, 0, 1, 2, 2, 3], statistic=lambda t: t[:, 0] / t[:, 1], seed=1)
    assert mean_first["estimate"] == pytest.approx(17 / 26)


def test_corpus_bleu4_interval_pools_the_resampled_pairs_statistics():
    """BLEU-4 pools n-gram counts over the corpus: its interval resamples rows of pairs and pools
    their bleu_stats, and on every row it is the toolkit's corpus BLEU-4."""
    pytest.importorskip("pycocoevalcap")
    from regioncap.metrics import reference_intervals, score_references

    pairs = [("a red circle on the left", ["a red circle", "the red round shape on the left"]),
             ("a small blue square", ["a blue square"]), ("two cats", ["a cat sleeping on a sofa"]),
             ("a man riding a brown horse", ["a man riding a horse on the beach"]),
             ("a green triangle near the top", ["a green triangle at the top"])]
    corpus, per = score_references(pairs)
    rows = [0, 0, 1, 2, 3]
    iv = reference_intervals(per, rows, n_boot=200, seed=0, pairs=pairs)["bleu4"]
    assert iv["n_clusters"] == 4 and iv["low"] <= corpus["bleu4"] + 1e-4 and iv["high"] >= corpus["bleu4"] - 1e-4
    # Without the pairs there is no BLEU-4 interval: a mean of sentence BLEU would sit around the wrong number.
    assert "bleu4" not in reference_intervals(per, rows, n_boot=200, seed=0)


# ---------------------------------------------------------------- paired comparison
def _job_values(rng: np.random.Generator, rate_shift: float, rows: int = 60):
    base = rng.beta(4, 2, size=rows)  # how easy each row is: shared by both jobs
    return {f"row{r}": (rng.random(3) < min(1.0, base[r] + rate_shift)).astype(float).tolist()
            for r in range(rows)}


def test_identical_jobs_differ_by_zero_and_a_clearly_better_one_does_not():
    rng = np.random.default_rng(5)
    a = _job_values(rng, 0.0)
    same = paired_difference(a, dict(a))
    assert same["difference"] == 0.0 and same["low"] == same["high"] == 0.0 and same["includes_zero"]
    better = {k: [1.0] * len(v) for k, v in a.items()}
    diff = paired_difference(better, a, seed=3)
    assert diff["difference"] > 0.2 and diff["low"] > 0 and not diff["includes_zero"]
    assert diff == paired_difference(better, a, seed=3)
    assert diff["n_clusters"] == 60 and diff["only_a"] == diff["only_b"] == 0


def test_paired_uses_only_rows_both_jobs_ran():
    a = {"r1": [1.0, 1.0], "r2": [0.0], "r3": [1.0]}
    b = {"r1": [1.0, 0.0], "r2": [0.0], "r4": [1.0, 1.0]}
    diff = paired_difference(a, b)
    assert (diff["n_clusters"], diff["only_a"], diff["only_b"]) == (2, 1, 1)
    assert diff["estimate_a"] == pytest.approx(2 / 3) and diff["estimate_b"] == pytest.approx(1 / 3)
    assert paired_difference({"x": [1.0]}, {"y": [1.0]})["difference"] is None


def test_pairing_narrows_the_interval_when_rows_differ_in_difficulty():
    rng = np.random.default_rng(8)
    a = _job_values(rng, 0.0, rows=80)
    b = {k: v[:] for k, v in a.items()}
    for k in list(b)[:6]:  # b gets six more regions right
        b[k] = [1.0] * len(b[k])
    paired = paired_difference(b, a, seed=1)
    apart = [bootstrap_interval([x for v in d.values() for x in v],
                                [k for k, v in d.items() for _ in v], seed=1) for d in (b, a)]
    unpaired_width = (apart[0]["high"] - apart[0]["low"]) + (apart[1]["high"] - apart[1]["low"])
    assert paired["high"] - paired["low"] < unpaired_width / 2


# ---------------------------------------------------------------- metrics.json and the summary
def test_metrics_json_of_a_run_has_intervals_and_the_summary_shows_them(tmp_path):
    Image.new("RGB", (320, 240), (40, 120, 200)).save(tmp_path / "blue.png")
    rows = [{"id": f"r{i}", "image": "blue.png", "bbox": [[10, 10, 80, 80], [120, 60, 90, 90]],
             "references": [["fake caption of region 1"], ["a region in blue"]]} for i in range(6)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}", "seed=7",
                   "metrics.bootstrap_resamples=300"], output_dir=out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("regioncap.metrics.meteor_absent", lambda: "skipped by the interval tests", raising=False)
        execute(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    refs = metrics["references"]
    ivs = refs["intervals"]
    # BLEU-4 from its pooled statistics; METEOR has none (its corpus score is not a mean of sentence scores).
    assert sorted(ivs) == ["attribute_accuracy", "bleu4", "cider", "exact_match", "rouge_l"]
    for name, iv in ivs.items():
        assert iv["low"] <= refs[name] <= iv["high"] and (iv["n_clusters"], iv["n_boot"]) == (6, 300)
    assert metricspec.undeclared(metrics) == []  # the shape the metric specification reads as an interval
    assert metricspec.format_interval(refs["exact_match"], ivs["exact_match"],
                                      metricspec.get("references.exact_match")).count("%") == 3
    line = next(ln for ln in format_summary(metrics, max_error_rate=0.1, out_dir="x").splitlines()
                if ln.startswith("references"))
    assert f"attribute accuracy {refs['attribute_accuracy']:.1%} [{ivs['attribute_accuracy']['low']:.1%}, " in line
    assert "95% intervals over 6 rows" in line
    # The run's seed drives the resampling: the same records and seed give the same intervals.
    from regioncap.metrics import compute_metrics
    from regioncap.records import read_jsonl

    again = compute_metrics(read_jsonl(out / "captions.jsonl"), {}, seed=7, bootstrap_resamples=300)
    assert again["references"]["intervals"] == ivs


def test_intervals_follow_the_seed_and_can_be_turned_off():
    from regioncap.metrics import compute_metrics

    records = [{"id": f"r{i}", "index": i, "status": "ok", "image_path": f"{i}.png",
                "regions": [{"id": k, "source_index": k, "caption": "a red circle"} for k in range(3)],
                "references": ["a red circle", "a red circle" if i % 2 else "a blue square", "a red square"]}
               for i in range(12)]
    runs = [compute_metrics(records, {}, seed=seed)["references"] for seed in (1, 1, 2)]
    assert runs[0]["intervals"] == runs[1]["intervals"]
    assert runs[0]["intervals"]["exact_match"] != runs[2]["intervals"]["exact_match"]
    assert runs[0]["exact_match"] == 0.5 and runs[0]["intervals"]["exact_match"]["low"] < 0.5
    off = compute_metrics(records, {}, bootstrap_resamples=0)
    assert "intervals" not in off["references"]
    line = format_summary(off, max_error_rate=0.1, out_dir="x")
    assert "exact match 50.0%, attribute accuracy" in line and "intervals" not in line


# ---------------------------------------------------------------- the sweep report
def _sweep_job(sweep: Path, name: str, override: str, regions: List[List[float]]) -> None:
    """A finished job without a model: captions.jsonl with per-region exact match, and metrics.json."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- {override}\n")
    records = [{"id": f"r{i}", "index": i, "digest": f"d{i}", "status": "ok",
                "regions": [{"id": k, "caption": "c", "scores": {"exact_match": v}} for k, v in enumerate(vals)]}
               for i, vals in enumerate(regions)]
    (job / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    flat = [v for vals in regions for v in vals]
    (job / "metrics.json").write_text(json.dumps({"rows": len(regions), "regions": len(flat), "error_rate": 0.0,
                                                  "references": {"exact_match": sum(flat) / len(flat)}}))


def _best_card(page: str) -> str:
    return re.search(r'<div class="card big"><div class="v">[^<]*</div><div class="k">([^<]*)</div>', page).group(1)


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_sweep_calls_a_job_best_only_when_it_is_distinguishable(tmp_path):
    rng = np.random.default_rng(2)
    good = [(rng.random(3) < 0.9).astype(float).tolist() for _ in range(40)]
    one_more = [vals[:] for vals in good]
    one_more[0] = [1.0, 1.0, 1.0] if sum(good[0]) < 3 else [0.0, 1.0, 1.0]  # one region apart
    poor = [(rng.random(3) < 0.3).astype(float).tolist() for _ in range(40)]

    close = tmp_path / "close"
    _sweep_job(close, "0", "max_boxes=2", good)
    _sweep_job(close, "1", "max_boxes=10", one_more)
    page = write_report(close).read_text(encoding="utf-8")
    assert _best_card(page).startswith("no job is better than the others at 95%")
    assert 'class="best"' not in page and "not distinguishable" in page

    apart = tmp_path / "apart"
    _sweep_job(apart, "0", "prompt=marked", good)
    _sweep_job(apart, "1", "prompt=crop", poor)
    page = write_report(apart).read_text(encoding="utf-8")
    assert _best_card(page) == "best exact match: job 0 (prompt=marked)"
    assert '<b class="best" title="best exact match">' in page
    table = page[page.index('<table class="compare">'):page.index("</table>")]
    assert "vs best -" in table and "not distinguishable" not in table


def test_equal_values_give_the_value_exactly():
    """Found by the property above: the mean of cluster sums of equal values differs in its last bit."""
    x = 0.9023785630554129
    iv = bootstrap_interval([x, x, x], [0, 1, 1], n_boot=200, seed=0)
    assert iv["low"] == iv["high"] == iv["estimate"]
