"""DenseCap mAP: where and what together, as region-captioning papers report it.

The measure of Johnson, Karpathy and Fei-Fei, "DenseCap" (CVPR 2016), used
unchanged by GRiT and later region-captioning work, following the reference
code (``eval/eval_utils.lua`` and ``densecap/box_utils.lua`` in
jcjohnson/densecap):

1. Per image, truth boxes that overlap at IoU >= 0.7 are merged
   (:func:`merge_truth`): greedily, the box with the most such neighbours
   absorbs them; the merged box is their mean and their references are pooled.
2. Per image, predictions in order of confidence are each assigned to the truth
   box of highest IoU; if that box was already taken by a more confident
   prediction, this one can never be a true positive (Pascal VOC's rule: it
   does not fall back to the next best free box).
3. METEOR (sentence level, per prediction) of each prediction's caption against
   the references of its truth box.
4. Over the whole data set, predictions sorted by confidence; at each pair of an
   IoU threshold (0.3 ... 0.7) and a METEOR threshold (0 ... 0.25), a
   prediction is a true positive when its box was free, its IoU >= the IoU
   threshold and its METEOR is *strictly above* the METEOR threshold (so 0 is
   not a catch-all); AP is the reference's interpolated AP (:func:`average_precision`);
   mAP is the mean of the 30 APs. ``det_map`` is the reference's detection-only
   mAP (METEOR threshold -1: boxes alone), which needs no METEOR.

Where regioncap differs, and why (also in docs/formats.md, ``densecap``):

- IoU is :func:`regioncap.boxes.iou` on continuous pixel coordinates (the one
  regioncap uses everywhere, e.g. ``proposals.quality``), not the Lua code's
  inclusive-pixel ``+1`` convention for integer boxes, which raises the IoU of
  small boxes (``[0, 0, 10, 10]`` and ``[5, 0, 15, 10]``: 0.33 here, 0.375 there).
- Predictions of equal confidence are scored as one block: precision and recall
  are read only after the last of them, so the result does not depend on the
  order of the rows (the Lua code's ``torch.sort`` leaves ties in an
  unspecified order). Predictions without a score (the ``contours`` and
  ``vlm`` proposers, given boxes) form one such block below every scored
  prediction: their AP is that of one operating point, not of a ranking.
  Inside an image, unscored predictions are assigned in their given order.
- A prediction that overlaps no truth box takes none (the Lua code then marks
  ``used[-1]`` taken, which Torch reads from the end: the image's last truth box).
- Only predictions that can be true positives (a free truth box at IoU >= 0.3)
  are sent to METEOR: the others are false positives at every threshold, so
  this changes no AP and saves the JVM's time.

Pure module: no Hydra, no W&B, no engine imports. METEOR comes in as
``meteor_fn``: a run's metrics pass :func:`regioncap.metrics.densecap_meteor`
(pycocoevalcap's METEOR 1.5 jar, once for all pairs, with its watchdog);
without one, ``map`` is absent and ``det_map`` is still computed.
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from regioncap.boxes import Box, iou

log = logging.getLogger("regioncap")

#: IoU thresholds of DenseCap mAP.
IOU_THRESHOLDS: Tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
#: Seconds METEOR's Java process may take before it is killed and METEOR reported absent
#: (``metrics.meteor_timeout_s``; also the library's default).
METEOR_TIMEOUT_S = 300.0

#: METEOR thresholds of DenseCap mAP (a true positive's METEOR is strictly above).
METEOR_THRESHOLDS: Tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
#: Truth boxes of one image overlapping at least this much are merged into one.
MERGE_IOU = 0.7

#: ``meteor_fn(pairs) -> scores``: one METEOR per ``(caption, references)`` pair, in order.
MeteorFn = Callable[[Sequence[Tuple[str, Sequence[str]]]], List[float]]


def _recall_points() -> Tuple[float, ...]:
    # The Lua loop `for t=0,1,0.01` adds 0.01 in doubles and stops once past 1:
    # 100 points (0 ... 0.99, slightly off k/100 from 0.06 on), not COCO's 101.
    points, t = [], 0.0
    while t <= 1:
        points.append(t)
        t += 0.01
    return tuple(points)


#: Recall levels of the interpolated AP, exactly as the reference code makes them.
RECALL_POINTS: Tuple[float, ...] = _recall_points()


@dataclass
class DenseCapImage:
    """One image: its predictions and its truth.

    ``boxes`` (xyxy pixels), ``captions`` and ``scores`` (confidence, higher is
    surer; ``None`` for a prediction without one, or for all) are parallel;
    ``truth_boxes`` (xyxy, same pixels) and ``references`` (a list of reference
    captions per truth box) are parallel.
    """

    boxes: Sequence[Sequence[float]]
    captions: Sequence[str]
    truth_boxes: Sequence[Sequence[float]]
    references: Sequence[Sequence[str]]
    scores: Optional[Sequence[Optional[float]]] = None

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.captions):
            raise ValueError(f"DenseCapImage: {len(self.boxes)} boxes but {len(self.captions)} captions")
        if self.scores is not None and len(self.scores) != len(self.boxes):
            raise ValueError(f"DenseCapImage: {len(self.boxes)} boxes but {len(self.scores)} scores")
        if len(self.truth_boxes) != len(self.references):
            raise ValueError(f"DenseCapImage: {len(self.truth_boxes)} truth boxes but "
                             f"{len(self.references)} reference lists")


def merge_truth(boxes: Sequence[Sequence[float]], references: Sequence[Sequence[str]], thr: float = MERGE_IOU
                ) -> Tuple[List[List[float]], List[List[str]]]:
    """Truth boxes of one image with those overlapping at IoU >= ``thr`` merged, as
    ``box_utils.merge_boxes`` does: repeatedly, the box with the most boxes at
    IoU >= ``thr`` (itself included; ties: the first) takes all of them as one
    group, whose box is their coordinate mean and whose references are theirs
    pooled in order; until every box is in a group."""
    n = len(boxes)
    near = [[i == j or iou(boxes[i], boxes[j]) >= thr for j in range(n)] for i in range(n)]
    left = set(range(n))
    out_boxes: List[List[float]] = []
    out_refs: List[List[str]] = []
    while left:
        counts = [(sum(near[i][j] for j in left), -i) for i in sorted(left)]
        _, neg = max(counts)
        group = [j for j in sorted(left) if near[-neg][j]]
        left.difference_update(group)
        out_boxes.append([sum(float(boxes[j][k]) for j in group) / len(group) for k in range(4)])
        out_refs.append([r for j in group for r in references[j]])
    return out_boxes, out_refs


def average_precision(tp: Sequence[bool], ties: Sequence[bool], n_truth: int) -> float:
    """The reference code's interpolated AP of predictions already in descending
    confidence: the mean over :data:`RECALL_POINTS` ``t`` of the highest precision
    at a recall >= ``t`` (0 where none). ``ties[i]`` says prediction ``i`` has
    the same confidence as ``i + 1``: precision and recall are read only at the
    end of such a block."""
    import numpy as np

    tp = np.asarray(tp, dtype=bool)
    ends = ~np.asarray(ties, dtype=bool)
    hits = np.cumsum(tp)[ends]
    recall = hits / n_truth
    precision = hits / (np.flatnonzero(ends) + 1)
    # Recall never falls along the ranking: the best precision at recall >= t is a suffix maximum.
    best = np.append(np.maximum.accumulate(precision[::-1])[::-1], 0.0)
    return float(best[np.searchsorted(recall, RECALL_POINTS, side="left")].sum() / len(RECALL_POINTS))


class DenseCapEvaluator:
    """DenseCap mAP accumulated one image at a time, then evaluated once. Per
    prediction it keeps four numbers (score, IoU with its truth box, whether that
    box was free, its METEOR pair), and for a possible true positive its caption
    and references."""

    def __init__(self) -> None:
        self.images = self.truth_given = self.truth = 0
        self.score = array("d")  # NaN: no score
        self.ok = array("b")
        self.overlap = array("d")
        self.pair = array("q")  # index into self.pairs; -1: can be no true positive
        self.pairs: List[Tuple[str, List[str]]] = []

    def add(self, image: DenseCapImage) -> None:
        """Match one image's predictions to its (merged) truth boxes."""
        merged, refs = merge_truth(image.truth_boxes, image.references)
        truth = [Box(*b) for b in merged]
        scores = list(image.scores) if image.scores is not None else [None] * len(image.boxes)
        order = sorted(range(len(image.boxes)), key=lambda i: _order_key(scores[i], i))
        used = [False] * len(merged)
        for rank in order:
            box = Box(*image.boxes[rank])
            best, ov = -1, 0.0
            for j, gt in enumerate(truth):
                v = iou(box, gt)
                if v > ov:  # strictly: ties keep the first truth box, as the Lua loop
                    best, ov = j, v
            ok = best >= 0 and not used[best]
            if ok:
                used[best] = True
            pair = -1
            if ok and ov >= IOU_THRESHOLDS[0]:
                pair = len(self.pairs)
                self.pairs.append((image.captions[rank], refs[best]))
            self.score.append(math.nan if scores[rank] is None else float(scores[rank]))
            self.ok.append(ok)
            self.overlap.append(ov)
            self.pair.append(pair)
        self.images += 1
        self.truth_given += len(image.truth_boxes)
        self.truth += len(merged)

    def evaluate(self, meteor_fn: Optional[MeteorFn] = None) -> Dict[str, Any]:
        """``{map, ap, det_map, det_ap, images, predictions, truth_boxes, truth_boxes_given,
        predictions_unscored, meteor_pairs, meteor_s, absent}``: ``ap[iou][meteor]`` and
        ``det_ap[iou]`` by threshold. ``map``/``ap`` are ``None`` with ``absent``
        saying why when METEOR could not run (``det_map`` needs none), and
        everything is ``None`` when there is no truth box."""
        import numpy as np

        score = np.frombuffer(self.score, dtype=np.float64) if self.score else np.zeros(0)
        unscored = np.isnan(score)
        out: Dict[str, Any] = {
            "map": None, "ap": None, "det_map": None, "det_ap": None, "images": self.images,
            "predictions": len(score), "truth_boxes": self.truth, "truth_boxes_given": self.truth_given,
            "predictions_unscored": int(unscored.sum()), "meteor_pairs": len(self.pairs), "meteor_s": None,
            "absent": None}
        if not self.truth:
            out["absent"] = "no truth boxes to score against"
            return out
        # Most confident first; the unscored after them (lexsort: last key first).
        rank = np.lexsort((np.arange(len(score)), np.where(unscored, 0.0, -score), unscored))
        score, unscored = score[rank], unscored[rank]
        ties = np.append((score[:-1] == score[1:]) | (unscored[:-1] & unscored[1:]), False)[:len(score)]
        ok = np.frombuffer(self.ok, dtype=np.int8)[rank].astype(bool) if self.ok else np.zeros(0, bool)
        overlap = np.frombuffer(self.overlap, dtype=np.float64)[rank] if self.overlap else np.zeros(0)
        pair = np.frombuffer(self.pair, dtype=np.int64)[rank] if self.pair else np.zeros(0, np.int64)
        out["det_ap"] = {t: _ap(ok & (overlap >= t), ties, self.truth) for t in IOU_THRESHOLDS}
        out["det_map"] = _mean(out["det_ap"].values())
        meteor = np.full(len(pair), -np.inf)
        if self.pairs:
            t0 = time.perf_counter()
            try:
                scores = _run_meteor(self.pairs, meteor_fn)
            except Exception as exc:  # noqa: BLE001 - METEOR is optional: say why it is missing
                out["absent"] = str(exc) if isinstance(exc, MeteorUnavailable) else \
                    f"METEOR failed: {type(exc).__name__}: {exc}"
                log.warning("DenseCap mAP: %s", out["absent"])
                return out
            out["meteor_s"] = round(time.perf_counter() - t0, 3)
            if len(scores) != len(self.pairs):
                raise ValueError(f"meteor_fn gave {len(scores)} scores for {len(self.pairs)} pairs")
            has = pair >= 0
            meteor[has] = np.asarray(scores, dtype=np.float64)[pair[has]]
        ap: Dict[float, Dict[float, float]] = {}
        for t in IOU_THRESHOLDS:
            ap[t] = {m: _ap((pair >= 0) & (overlap >= t) & (meteor > m), ties, self.truth)
                     for m in METEOR_THRESHOLDS}
        out["ap"] = ap
        out["map"] = _mean(v for row in ap.values() for v in row.values())
        return out


class MeteorUnavailable(RuntimeError):
    """METEOR cannot run here (no Java, no pycocoevalcap); the message says why."""


def _order_key(score: Optional[float], rank: int) -> Tuple[int, float, int]:
    # Most confident first; predictions without a score after all scored ones, in their given order.
    return (1, 0.0, rank) if score is None else (0, -float(score), rank)


def _ap(tp: Sequence[bool], ties: Sequence[bool], n_truth: int) -> float:
    return round(average_precision(tp, ties, n_truth), 6)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return round(sum(values) / len(values), 6)


def _run_meteor(pairs: Sequence[Tuple[str, List[str]]], meteor_fn: Optional[MeteorFn]) -> List[float]:
    if meteor_fn is None:
        raise MeteorUnavailable("no METEOR scorer was given (meteor_fn)")
    return [float(s) for s in meteor_fn(pairs)]


def densecap_map(images: Iterable[DenseCapImage], meteor_fn: Optional[MeteorFn] = None) -> Dict[str, Any]:
    """DenseCap mAP of ``images`` (see the module docstring for the procedure and
    where it differs from the reference code); the result is
    :meth:`DenseCapEvaluator.evaluate`'s. ``meteor_fn`` scores the pairs
    (:func:`regioncap.metrics.densecap_meteor`: one Java process); without it
    ``map`` is None and ``absent`` says so."""
    evaluator = DenseCapEvaluator()
    for image in images:
        evaluator.add(image)
    return evaluator.evaluate(meteor_fn)


# ------------------------------------------------------------------ from run records
