"""DenseCap mAP (regioncap.densecap): hand-computed cases, properties, the Lua code re-done, real METEOR."""

from __future__ import annotations

import hashlib
import json
import random
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import compose, requires
from regioncap import densecap as dc
from regioncap.boxes import iou
from regioncap.densecap import DenseCapImage, densecap_map, merge_truth
from regioncap.metrics import DenseCapStats, format_summary


def exact(pairs):
    """A METEOR stand-in: 1 when the caption is one of the references, else 0."""
    return [1.0 if caption in refs else 0.0 for caption, refs in pairs]


def image(preds, truth, scores=None):
    """``preds``: [(box, caption)], ``truth``: [(box, [references])]."""
    return DenseCapImage(boxes=[b for b, _ in preds], captions=[c for _, c in preds],
                         truth_boxes=[b for b, _ in truth], references=[r for _, r in truth], scores=scores)


A, B, C = [0, 0, 100, 100], [200, 0, 300, 100], [400, 0, 500, 100]
FAR = [1000, 1000, 1010, 1010]
TRUTH3 = [(A, ["a"]), (B, ["b"]), (C, ["c"])]


def grid(result):
    return [[result["ap"][t][m] for m in dc.METEOR_THRESHOLDS] for t in dc.IOU_THRESHOLDS]


# ------------------------------------------------------------------ hand-computed
def test_recall_points_are_the_lua_loops():
    # `for t=0,1,0.01` in doubles: 100 points, the last 0.99..., and 0.06 is not exactly 0.06.
    assert len(dc.RECALL_POINTS) == 100 and dc.RECALL_POINTS[0] == 0.0
    assert 0.99 < dc.RECALL_POINTS[-1] < 0.991 and dc.RECALL_POINTS[6] > 0.06


def test_perfect_predictions_score_one():
    r = densecap_map([image([(A, "a"), (B, "b")], [(A, ["a"]), (B, ["b", "bee"])], [0.9, 0.8]),
                      image([(C, "c")], [(C, ["c"])])], exact)
    assert r["map"] == r["det_map"] == 1.0 and r["absent"] is None
    assert r["images"] == 2 and r["predictions"] == 3 and r["truth_boxes"] == 3 and r["meteor_pairs"] == 3


def test_a_box_at_iou_045_counts_at_03_and_04_only():
    box = [0, 0, 45, 100]
    assert iou(box, A) == pytest.approx(0.45)
    r = densecap_map([image([(box, "a")], [(A, ["a"])])], exact)
    assert [row[0] for row in grid(r)] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert all(len(set(row)) == 1 for row in grid(r))  # the caption is right at every METEOR threshold
    assert r["map"] == 0.4 and r["det_ap"] == {0.3: 1.0, 0.4: 1.0, 0.5: 0.0, 0.6: 0.0, 0.7: 0.0}


def test_a_wrong_caption_is_a_false_positive_at_every_meteor_threshold():
    r = densecap_map([image([(A, "b")], [(A, ["a"])])], exact)
    assert r["map"] == 0.0 and r["det_map"] == 1.0  # the box alone is right


def test_a_duplicate_prediction_is_a_false_positive():
    # tp 1,0,1,1 -> recall 1/3,1/3,2/3,1 and precision 1,1/2,2/3,3/4: 34 points at 1, 66 at 3/4.
    preds = [(A, "a"), (A, "a"), (B, "b"), (C, "c")]
    r = densecap_map([image(preds, TRUTH3, [0.9, 0.8, 0.7, 0.6])], exact)
    assert r["map"] == pytest.approx((34 + 66 * 0.75) / 100)
    assert densecap_map([image([p for i, p in enumerate(preds) if i != 1], TRUTH3, [0.9, 0.7, 0.6])],
                        exact)["map"] == 1.0


def test_the_duplicate_is_the_less_confident_one():
    # The more confident prediction takes the box, whatever its caption: the right caption ranked second loses.
    r = densecap_map([image([(A, "wrong"), (A, "a")], [(A, ["a"])], [0.9, 0.8])], exact)
    assert r["map"] == 0.0 and r["det_map"] == 1.0
    assert densecap_map([image([(A, "wrong"), (A, "a")], [(A, ["a"])], [0.8, 0.9])], exact)["map"] == 1.0


def test_ranking_by_score_changes_ap():
    # One right prediction among three truth boxes, one false positive: recall 1/3 at best (34 points).
    right_first = densecap_map([image([(A, "a"), (FAR, "x")], TRUTH3, [0.9, 0.1])], exact)
    wrong_first = densecap_map([image([(A, "a"), (FAR, "x")], TRUTH3, [0.1, 0.9])], exact)
    assert right_first["map"] == pytest.approx(0.34) and wrong_first["map"] == pytest.approx(0.17)


def test_unscored_predictions_are_one_operating_point():
    # Without scores the order carries nothing: precision 1/2 at recall 1/3, in either order.
    for preds in ([(A, "a"), (FAR, "x")], [(FAR, "x"), (A, "a")]):
        r = densecap_map([image(preds, TRUTH3)], exact)
        assert r["map"] == pytest.approx(0.17) and r["predictions_unscored"] == 2
    # Ranked below every scored prediction.
    r = densecap_map([image([(A, "a"), (FAR, "x")], TRUTH3, [None, 0.01])], exact)
    assert r["map"] == pytest.approx(0.17)


def test_truth_boxes_at_iou_07_are_merged_and_their_references_pooled():
    low = [0, 0, 100, 80]
    assert iou(A, low) == pytest.approx(0.8)
    boxes, refs = merge_truth([A, low, B], [["a"], ["a low"], ["b"]])
    assert boxes == [[0, 0, 100, 90], B] and refs == [["a", "a low"], ["b"]]
    r = densecap_map([image([([0, 0, 100, 90], "a low"), (B, "b")], [(A, ["a"]), (low, ["a low"]), (B, ["b"])])],
                     exact)
    assert r["map"] == 1.0 and r["truth_boxes"] == 2 and r["truth_boxes_given"] == 3
    # At IoU 0.6 they stay two boxes (two truths, one found).
    apart = [0, 0, 100, 60]
    assert len(merge_truth([A, apart], [["a"], ["b"]])[0]) == 2


def test_merging_takes_the_box_with_most_neighbours_first():
    # The middle box is within 0.7 of both ends, the ends not of each other: it takes both.
    left, mid, right = [0, 0, 100, 100], [10, 0, 110, 100], [20, 0, 120, 100]
    assert iou(left, right) < 0.7 <= iou(left, mid) and iou(mid, right) >= 0.7
    assert merge_truth([left, mid, right], [["x"], ["y"], ["z"]]) == ([[10, 0, 110, 100]], [["x", "y", "z"]])
    # Ties go to the first: `left` and `right` each have one neighbour in [left, right, mid-less pair].
    assert merge_truth([left, [0, 0, 100, 90], right], [["x"], ["y"], ["z"]])[1] == [["x", "y"], ["z"]]


def test_an_image_without_predictions_lowers_recall():
    r = densecap_map([image([(A, "a")], [(A, ["a"])], [0.9]), image([], [(B, ["b"]), (C, ["c"])])], exact)
    assert r["map"] == pytest.approx(0.34) and r["images"] == 2 and r["truth_boxes"] == 3


def test_no_truth_boxes_gives_no_map():
    r = densecap_map([image([(A, "a")], [])], exact)
    assert r["map"] is None and r["det_map"] is None and "no truth" in r["absent"]
    assert densecap_map([], exact)["images"] == 0


def test_no_predictions_at_all_score_zero_without_meteor():
    def never(pairs):
        raise AssertionError("METEOR started with nothing to score")

    assert densecap_map([image([], [(A, ["a"])])], never)["map"] == 0.0
    # Predictions that cannot be true positives (no overlap) are not sent to METEOR either.
    assert densecap_map([image([(FAR, "x")], [(A, ["a"])])], never)["map"] == 0.0


def test_meteor_threshold_is_strict():
    def score(value):
        return lambda pairs: [value] * len(pairs)

    r = densecap_map([image([(A, "a")], [(A, ["a"])])], score(0.1))
    assert [r["ap"][0.5][m] for m in dc.METEOR_THRESHOLDS] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert densecap_map([image([(A, "a")], [(A, ["a"])])], score(0.0))["map"] == 0.0


def test_a_failing_meteor_leaves_the_box_map_and_says_why():
    def broken(pairs):
        raise OSError("no jvm")

    r = densecap_map([image([(A, "a")], [(A, ["a"])])], broken)
    assert r["map"] is None and r["det_map"] == 1.0 and r["absent"] == "METEOR failed: OSError: no jvm"


def test_mismatched_lengths_name_the_input():
    with pytest.raises(ValueError, match="2 boxes but 1 captions"):
        DenseCapImage(boxes=[A, B], captions=["a"], truth_boxes=[], references=[])


# ------------------------------------------------------------------ the Lua code, re-done literally
def lua_map(images, meteor_fn):
    """eval_utils.lua's DenseCaptioningEvaluator, line by line (IoU: regioncap's, no +1)."""
    records, all_scores, npos = [], [], 0
    for img in images:
        tb, refs = [list(map(float, b)) for b in img.truth_boxes], list(img.references)
        # box_utils.merge_boxes
        n = len(tb)
        D = [[1.0 if i == j else iou(tb[i], tb[j]) for j in range(n)] for i in range(n)]
        groups = []
        while True:
            good = [[1 if D[i][j] >= 0.7 else 0 for j in range(n)] for i in range(n)]
            sums = [sum(good[i][j] for i in range(n)) for j in range(n)]
            if not sums or max(sums) == 0:
                break
            top = sums.index(max(sums))
            ix = [j for j in range(n) if good[top][j]]
            groups.append(ix)
            for i in ix:
                for j in range(n):
                    D[i][j] = D[j][i] = 0
        merged = [[sum(tb[i][k] for i in g) / len(g) for k in range(4)] for g in groups]
        merged_text = [[t for i in g for t in refs[i]] for g in groups]
        order = sorted(range(len(img.boxes)), key=lambda i: -img.scores[i])
        used = [0] * len(merged)
        for ii in order:
            ovmax, jmax = 0, -1
            for j, gt in enumerate(merged):
                ov = iou(img.boxes[ii], gt)
                if ov > ovmax:
                    ovmax, jmax = ov, j
            ok = 1
            if jmax >= 0 and used[jmax] == 0:  # (the Lua code's used[-1] quirk left out)
                used[jmax] = 1
            else:
                ok = 0
            records.append({"ok": ok, "ov": ovmax, "candidate": img.captions[ii],
                            "references": merged_text[jmax] if jmax >= 0 else []})
            all_scores.append(img.scores[ii])
        npos += len(merged)
    scores = meteor_fn([(r["candidate"], r["references"]) for r in records])
    ix = sorted(range(len(records)), key=lambda i: -all_scores[i])
    out = {}
    for min_overlap in (0.3, 0.4, 0.5, 0.6, 0.7):
        for min_score in (0, 0.05, 0.1, 0.15, 0.2, 0.25):
            tp, fp = [], []
            for i in ix:
                r = records[i]
                hit = r["ov"] >= min_overlap and r["ok"] == 1 and scores[i] > min_score
                tp.append(int(hit))
                fp.append(1 - int(hit))
            ctp = [sum(tp[:k + 1]) for k in range(len(tp))]
            cfp = [sum(fp[:k + 1]) for k in range(len(fp))]
            rec = [t / npos for t in ctp]
            prec = [t / (t + f) for t, f in zip(ctp, cfp)]
            ap, apn, t = 0.0, 0, 0.0
            while t <= 1:
                ap += max([p if r >= t else 0.0 for r, p in zip(rec, prec)] or [0.0])
                apn += 1
                t += 0.01
            out[(min_overlap, min_score)] = ap / apn
    return sum(out.values()) / len(out), out


def hashed_meteor(pairs):
    """A deterministic METEOR stand-in spread over [0, 0.35): hits every threshold band."""
    out = []
    for caption, refs in pairs:
        if not refs:
            out.append(0.0)
            continue
        digest = hashlib.sha256(f"{caption}|{'|'.join(refs)}".encode()).digest()
        out.append(int.from_bytes(digest[:4], "little") / 2**32 * 0.35)
    return out


def random_images(rng, n_images, distinct=True):
    images, scores = [], rng.sample(range(10_000), 200)
    for _ in range(n_images):
        def box():
            x, y = rng.randrange(0, 60, 5), rng.randrange(0, 60, 5)
            return [x, y, x + rng.randrange(5, 40, 5), y + rng.randrange(5, 40, 5)]
        truth = [(box(), [rng.choice("abcd")]) for _ in range(rng.randrange(0, 5))]
        preds = [(box(), rng.choice("abcd")) for _ in range(rng.randrange(0, 6))]
        images.append(image(preds, truth, [scores.pop() / 10_000 for _ in preds]))
    return images


@pytest.mark.parametrize("seed", range(12))
def test_matches_the_lua_code_on_random_data(seed):
    images = random_images(random.Random(seed), 6)
    if not sum(len(i.truth_boxes) for i in images):
        images.append(image([], [(A, ["a"])]))
    ref_map, ref_ap = lua_map(images, hashed_meteor)
    r = densecap_map(images, hashed_meteor)
    for (t, m), value in ref_ap.items():
        assert r["ap"][t][m] == pytest.approx(value, abs=1e-6), (t, m)
    assert r["map"] == pytest.approx(ref_map, abs=1e-6)


# ------------------------------------------------------------------ properties
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 6), st.randoms(use_true_random=False))
def test_properties(seed, n_images, shuffler):
    images = random_images(random.Random(seed), n_images) + [image([], [(A, ["a"])])]
    r = densecap_map(images, hashed_meteor)
    assert 0.0 <= r["map"] <= 1.0 and 0.0 <= r["det_map"] <= 1.0
    assert r["map"] <= r["det_map"] + 1e-9  # a caption condition can only take true positives away
    # The order of the images does not matter.
    shuffled = list(images)
    shuffler.shuffle(shuffled)
    assert densecap_map(shuffled, hashed_meteor)["ap"] == r["ap"]
    # A false positive ranked below everything never raises any AP.
    last = images[-1]
    images[-1] = DenseCapImage(boxes=[*last.boxes, FAR], captions=[*last.captions, "a"],
                               truth_boxes=last.truth_boxes, references=last.references,
                               scores=[*(last.scores or []), -1.0])
    worse = densecap_map(images, hashed_meteor)
    assert all(worse["ap"][t][m] <= r["ap"][t][m] for t in dc.IOU_THRESHOLDS for m in dc.METEOR_THRESHOLDS)


# ------------------------------------------------------------------ from run records
def record(regions, refs, **extra):
    return {"id": "r", "status": "ok", "references": refs, "regions": regions, **extra}


def test_records_of_a_given_box_run_put_each_prediction_on_its_truth_box():
    stats = DenseCapStats("references")
    stats.add(record([{"id": 1, "source": "input", "source_index": 0, "bbox": A, "caption": "A!"},
                      {"id": 2, "source": "input", "source_index": 1, "bbox": B, "caption": "b"},
                      {"id": 3, "source": "input", "source_index": 2, "bbox": C, "caption": "c"}],
                     ["a", ["b", "bee"], ""]))  # the third box has no reference: neither truth nor prediction
    stats.add(record([{"id": 1, "source_index": 0, "bbox": A, "missing": True, "caption": None}], ["a"]))
    stats.add({"id": "e", "status": "error", "references": ["a"], "regions": []})
    out = stats.summary(lambda pairs: [1.0 if c.lower().strip("!") in r else 0.0 for c, r in pairs])
    assert out["mode"] == "given" and out["n_images"] == 2 and out["n_truth"] == 3 and out["n_predictions"] == 2
    assert out["map"] == pytest.approx(0.67) and out["det_map"] == pytest.approx(0.67)  # recall 2/3: 67 points
    assert out["iou_thresholds"] == [0.3, 0.4, 0.5, 0.6, 0.7] and len(out["ap"]) == 5 and len(out["ap"][0]) == 6
    assert len(out["ap_by_iou"]) == 5 and len(out["ap_by_meteor"]) == 6 and out["absent"] is None
    json.dumps(out)  # metrics.json holds it as it is


def test_records_of_a_proposal_run_score_the_proposals_against_the_given_boxes():
    regions = [{"id": 1, "source": "contours", "source_index": None, "bbox": [0, 0, 45, 100], "caption": "a"},
               {"id": 2, "source": "contours", "source_index": None, "bbox": B, "caption": "b", "score": 0.5}]
    rec = record(regions, ["a", "b", "c"], proposals={"method": "contours", "truth_bbox": [A, B],
                                                       "truth_index": [0, 1]})
    stats = DenseCapStats("references")
    stats.add(rec)
    stats.add({"id": "nobox", "status": "ok", "regions": regions, "proposals": {"method": "contours"}})
    out = stats.summary(exact)
    assert out["mode"] == "proposals" and out["n_images"] == 1 and out["n_truth"] == 2 and out["n_unscored"] == 1
    # The scored box (IoU 1) first, then the unscored one at IoU 0.45: recall 1 at IoU 0.3/0.4, 1/2 above.
    assert out["ap_by_iou"] == [1.0, 1.0, 0.5, 0.5, 0.5]


def test_compute_metrics_says_why_without_java_and_keeps_the_box_map(monkeypatch):
    import regioncap.metrics as mx

    monkeypatch.setattr(mx.shutil, "which", lambda name: None)
    recs = [record([{"id": 1, "source": "input", "source_index": 0, "bbox": A, "caption": "a"}], ["a"])]
    assert "densecap" not in mx.compute_metrics(recs, {})  # opt-in
    block = mx.compute_metrics(recs, {}, densecap=True)["densecap"]
    assert block["map"] is None and block["det_map"] == 1.0 and block["absent"].startswith("java is not on PATH")
    assert "densecap" not in mx.compute_metrics(recs, {}, densecap=True, references_key=None)


def test_the_setting_is_declared_and_off_by_default():
    from regioncap.config import MetricsConfig

    assert MetricsConfig().densecap is False
    assert compose(["metrics.densecap=true"]).metrics.densecap is True


def test_summary_line():
    stats = DenseCapStats("references")
    stats.add(record([{"id": 1, "source": "input", "source_index": 0, "bbox": A, "caption": "a"}], ["a"]))
    m = {"rows": 1, "rows_ok": 1, "rows_partial": 0, "rows_no_regions": 0, "error_rows": 0, "error_rate": 0.0,
         "regions": 1, "regions_captioned": 1, "regions_missing": 0, "boxes_dropped": 0, "boxes_clipped": 0,
         "requests": 1, "reasks": 0, "stages": {}, "errors": {}, "densecap": stats.summary(exact)}
    text = format_summary(m, max_error_rate=0.1, out_dir="out")
    assert "DenseCap mAP 1.000 (localization only 1.000) on 1 image(s), 1 prediction(s), 1 truth box(es)" in text
    assert "upper bound" in text


# ------------------------------------------------------------------ real METEOR, real runs
@pytest.mark.slow
@requires("pycocoevalcap")
def test_real_meteor_on_a_proposal_run_and_a_given_box_run(tmp_path):
    from regioncap.job import execute

    # Java ships with the machines CI runs on; without it this must fail, not skip.
    assert shutil.which("java"), "METEOR needs java on PATH (apt-get install default-jre-headless)"
    runs = {"proposals": ["data=shapes", "propose.when=always", "propose.threshold_c=6"],
            "given": ["data=shapes", "propose=none"]}
    for mode, extra in runs.items():
        out = tmp_path / mode
        metrics = execute(compose(["engine=fake", "progress=false", "metrics.densecap=true", *extra],
                                  output_dir=out))
        block = json.loads((out / "metrics.json").read_text())["densecap"]
        assert block == metrics["densecap"] and block["mode"] == mode and block["absent"] is None, block
        assert block["n_images"] == 8 and block["n_truth"] == 25 and block["n_meteor_pairs"] > 0
        assert 0.0 <= block["map"] <= block["det_map"] <= 1.0 and block["meteor_s"] > 0
        if mode == "given":
            assert block["det_map"] == 1.0  # every prediction on its own truth box


@pytest.mark.slow
@requires("pycocoevalcap")
def test_real_meteor_scores_pairs_one_by_one():
    assert shutil.which("java"), "METEOR needs java on PATH (apt-get install default-jre-headless)"
    from regioncap.metrics import densecap_meteor

    scores = densecap_meteor([("a red circle", ["a red circle"]), ("a blue square", ["a red circle", "red"]),
                               ("!!!", ["a red circle"])])
    assert scores[0] == pytest.approx(1.0) and 0.0 <= scores[1] < 0.5 and scores[2] == 0.0
