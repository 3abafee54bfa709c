"""The one specification of every number in ``metrics.json``.

Each metric is declared here once: its dotted path in ``metrics.json``, a label
for people, its group, its unit, which direction is better, how it combines
when runs are put together (shards, sweep jobs), whether a sweep may optimise
it, and one line of meaning. Everything that names, formats, orders, compares
or documents a metric reads this table: the console summary, the report's
tables and sweep comparison, the sweep plots, W&B, the objective check and the
metrics table of ``docs/formats.md`` (generated from it; a test holds the two
together, and another holds this table to what :func:`regioncap.metrics.compute_metrics`
writes).

Pure module: no imports beyond the standard library.

Adding a metric: compute it in :mod:`regioncap.metrics` (or where the run
records it), declare it below, run ``python -m regioncap.metricspec --write-docs``.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from regioncap import stages

#: Units: how a value is read and formatted.
UNITS = {
    "count": "a number of things",
    "share": "a fraction in [0, 1], shown as a percentage",
    "seconds": "seconds of wall-clock time",
    "per_s": "things per second",
    "tokens": "tokens (per the unit in the label)",
    "words": "words",
    "score": "a caption score on the scale its paper defines",
    "iou": "intersection over union in [0, 1]",
    "counts": "a mapping of kind to count",
    "text": "a string (not a number; not an objective)",
    "setting": "a setting the run used (not a result)",
}
#: How a figure combines when runs are put together (a merge of shards, a comparison of jobs).
AGGREGATIONS = {
    "sum": "counts add up over shards",
    "ratio": "recomputed from the summed counts it is a ratio of",
    "records": "recomputed from the records (reference scores, distributions, intervals)",
    "process": "a timing of one process: not comparable across shards; a merge recomputes it from the shards' sums",
    "same": "a setting every part shares",
}
#: Statistics of a distribution metric (``latency_s`` is ``{n, mean, p50, p95, min, max}``).
DISTRIBUTION_STATS = ("n", "mean", "p50", "p95", "min", "max")
#: Bounds of an interval metric (``references.intervals.exact_match`` is ``{low, high}``).
INTERVAL_BOUNDS = ("low", "high")


@dataclass(frozen=True)
class Metric:
    """One metric of ``metrics.json``.

    ``path`` is the dotted path; ``*`` stands for a stage name (``stages.*.seconds``).
    ``kind`` is ``value`` (a number), ``distribution`` (``{n, mean, p50, p95, min,
    max}``), ``counts`` (a mapping of kind to count), ``list`` (numbers along an
    axis) or ``text``.
    ``better`` is ``higher``, ``lower`` or ``None`` (neither: a count, a setting).
    ``compare``: shown in the sweep comparison table; ``plot``: offered as a
    sweep plot metric; ``headline``: a card in the run report's header.
    """

    path: str
    label: str
    group: str
    unit: str
    better: Optional[str]
    aggregation: str
    doc: str
    kind: str = "value"
    compare: bool = False
    plot: bool = False
    headline: bool = False

    @property
    def objective(self) -> bool:
        """Whether a sweep may optimise it (a number with a direction, or any count)."""
        return self.kind in ("value", "distribution") and self.unit not in ("text", "setting")

    @property
    def key(self) -> str:
        """The last part of the path (``exact_match`` for ``references.exact_match``)."""
        return self.path.rsplit(".", 1)[-1]

    @property
    def is_share(self) -> bool:
        return self.unit == "share"


#: Groups in the order the report and the docs show them, with their titles.
GROUPS = {
    "rows": "Rows",
    "regions": "Regions",
    "speed": "Cost and speed",
    "startup": "Start-up",
    "answers": "Answers",
    "references": "References",
    "faithfulness": "Faithfulness",
    "proposals": "Proposals",
    "densecap": "DenseCap",
    "stages": "Stages",
    "pipeline": "End to end",
    "shards": "Shards",
    "model": "Model",
}


def _specs() -> Iterator[Metric]:
    def m(path: str, label: str, unit: str, better: Optional[str], agg: str, doc: str, **kw: Any) -> Metric:
        return Metric(path, label, group, unit, better, agg, doc, **kw)

    group = "rows"
    yield m("rows", "rows", "count", None, "sum", "input rows read (each ends up once: a result or an error row)",
            headline=True)
    yield m("rows_ok", "rows ok", "count", "higher", "sum", "rows with every region captioned")
    yield m("rows_partial", "rows partial", "count", None, "sum", "rows with some regions captioned")
    yield m("rows_no_regions", "rows without regions", "count", None, "sum",
            "rows with no usable box (every box dropped, none given and none proposed)")
    yield m("rows_pending", "rows pending", "count", None, "sum", "rows a stopped run left unfinished")
    yield m("error_rows", "error rows", "count", "lower", "sum", "rows that ended as an error row",
            headline=True)
    yield m("error_rate", "error rate", "share", "lower", "ratio", "error rows over rows",
            compare=True, plot=True)
    yield m("errors", "errors", "counts", "lower", "sum", "error rows by `stage/kind`", kind="counts")
    yield m("error_rows_by_stage", "error rows by stage", "counts", "lower", "sum", "error rows by stage",
            kind="counts")

    group = "regions"
    yield m("regions", "regions", "count", None, "sum", "regions to caption (boxes kept after validation)",
            headline=True)
    yield m("regions_captioned", "regions captioned", "count", "higher", "sum", "regions with a caption",
            compare=True)
    yield m("captioned_share", "regions captioned (share)", "share", "higher", "ratio",
            "regions captioned over regions", plot=True)
    yield m("regions_missing", "regions missing", "count", "lower", "sum",
            "regions the answer left out (after the re-ask)")
    yield m("regions_missing_by_reason", "regions missing by reason", "counts", "lower", "sum",
            "missing regions by reason", kind="counts")
    yield m("regions_from_reask", "regions from re-asks", "count", None, "sum",
            "regions whose caption came from a re-ask")
    yield m("boxes_dropped", "boxes dropped", "count", "lower", "sum", "input boxes refused by validation")
    yield m("boxes_dropped_by_reason", "boxes dropped by reason", "counts", "lower", "sum",
            "dropped boxes by reason", kind="counts")
    yield m("boxes_clipped", "boxes clipped", "count", None, "sum", "boxes clipped to the image")
    yield m("images", "images", "count", None, "sum",
            "distinct images (a row that gave none, such as a line that is not JSON, counts none)")
    yield m("chunks", "chunks", "count", None, "sum", "marked images sent (a row with more boxes than "
            "max_boxes is split into chunks)")
    yield m("requests", "requests", "count", None, "sum", "requests sent to the engine (first asks)")
    yield m("reasks", "re-asks", "count", None, "sum", "re-asks for regions an answer left out")

    group = "speed"
    yield m("wall_s", "wall time (s)", "seconds", "lower", "process", "the run's wall-clock time, both stages")
    yield m("regions_per_s", "regions / s", "per_s", "higher", "process",
            "captioned regions per second of the caption stage, steady (= `stages.caption.regions_per_s`)",
            compare=True, plot=True, headline=True)
    yield m("images_per_s", "images / s", "per_s", "higher", "process",
            "images per second of the caption stage, steady (= `stages.caption.images_per_s`)")
    yield m("prompt_tokens", "prompt tokens", "tokens", None, "sum", "prompt tokens, as the engine counted them")
    yield m("output_tokens", "output tokens", "tokens", None, "sum", "output tokens, as the engine counted them")
    yield m("visual_tokens", "visual tokens", "tokens", None, "sum",
            "visual tokens of every image sent (re-asks count again), from the image sizes by the model "
            "family's rule (`Family.visual_tokens`)")
    yield m("prompt_tokens_per_region", "prompt tokens / region", "tokens", "lower", "ratio",
            "prompt tokens over regions", compare=True, plot=True)
    yield m("visual_tokens_per_region", "visual tokens / region", "tokens", "lower", "ratio",
            "visual tokens over regions")
    yield m("output_tokens_per_region", "output tokens / region", "tokens", "lower", "ratio",
            "output tokens over regions", compare=True, plot=True)
    yield m("visual_tokens_per_request", "visual tokens / request", "tokens", None, "ratio",
            "visual tokens over requests and re-asks")
    yield m("latency_s", "latency (s)", "seconds", "lower", "records", "seconds per request",
            kind="distribution")
    yield m("latency_s.p50", "latency p50 (s)", "seconds", "lower", "records",
            "median seconds per request", compare=True, plot=True)
    yield m("reask_latency_s", "re-ask latency (s)", "seconds", "lower", "records", "seconds per re-ask",
            kind="distribution")

    group = "answers"
    yield m("requests_answered", "requests answered", "count", None, "sum",
            "first requests that got an answer (re-asks are not counted)")
    yield m("requests_failed", "requests failed", "count", "lower", "sum",
            "requests the engine failed (an error response)")
    yield m("requests_format_ok", "answers in the format", "count", "higher", "sum",
            "answered requests whose answer followed the requested layout")
    yield m("requests_debris", "answers with debris", "count", "lower", "sum",
            "answered requests with at least one caption carrying answer-format debris")
    yield m("requests_parsed_clean", "answers parsed clean", "count", "higher", "sum",
            "answered requests with the layout followed and no debris")
    yield m("parse_success_rate", "parse success", "share", "higher", "ratio",
            "`requests_parsed_clean / requests_answered`: clean parses of the first answer, whatever the re-ask "
            "then fixed", compare=True, plot=True)
    yield m("regions_reasked_debris", "regions re-asked for debris", "count", "lower", "sum",
            "regions re-asked because their first caption carried debris")
    yield m("captions_debris", "captions kept with debris", "count", "lower", "sum",
            "regions whose kept caption still carries debris (`regions[].debris` set)")
    yield m("captions_debris_by_reason", "captions with debris by reason", "counts", "lower", "sum",
            "the same, by reason", kind="counts")
    yield m("caption_words", "caption words", "words", None, "records", "words per caption",
            kind="distribution")
    yield m("captions_empty", "captions empty", "count", "lower", "sum", "empty captions")
    yield m("captions_duplicated", "captions duplicated", "count", None, "sum",
            "captions equal to another region's caption of the same row")
    yield m("captions_repeat_prompt", "captions repeating the prompt", "count", "lower", "sum",
            "captions that echo the prompt's words")

    group = "references"
    refs = "references."
    yield m(refs + "rows_with_references", "rows with references", "count", None, "sum",
            "rows that carry the references field")
    yield m(refs + "regions_with_references", "regions with references", "count", None, "sum",
            "regions whose box has a non-empty reference")
    yield m(refs + "references_missing", "regions without a reference", "count", None, "sum",
            "regions of rows with references whose box has none")
    yield m(refs + "rows_malformed", "rows with malformed references", "count", "lower", "sum",
            "rows whose references field is not one string, list of strings or null per box (a number, a "
            "dict...): their boxes count as without a reference; the run warns with the first")
    yield m(refs + "references_uncaptioned", "referenced regions uncaptioned", "count", "lower", "sum",
            "regions with references but no caption")
    yield m(refs + "regions_scored", "regions scored", "count", None, "sum",
            "captioned regions with references (what every score below is over)")
    yield m(refs + "exact_match", "exact match", "share", "higher", "records",
            "captions equal to a reference after normalisation (lowercase, punctuation stripped)",
            compare=True, plot=True, headline=True)
    yield m(refs + "attribute_accuracy", "attribute accuracy", "share", "higher", "records",
            "mean share of a reference's content words (all but a/an/the) found in the caption; best reference",
            compare=True, plot=True)
    yield m(refs + "cider", "CIDEr-D", "score", "higher", "records",
            "CIDEr-D, COCO caption toolkit (pycocoevalcap) on the toolkit's tokens", compare=True, plot=True)
    yield m(refs + "rouge_l", "ROUGE-L", "score", "higher", "records",
            "ROUGE-L, COCO caption toolkit, mean over regions", compare=True, plot=True)
    yield m(refs + "meteor", "METEOR", "score", "higher", "records",
            "METEOR 1.5, COCO caption toolkit (Java; `metrics.meteor=true`)", compare=True, plot=True)
    yield m(refs + "bleu4", "BLEU-4", "score", "higher", "records",
            "corpus BLEU-4, COCO caption toolkit on its PTB tokens", compare=True, plot=True)
    for n in (1, 2, 3):
        yield m(refs + f"bleu{n}", f"BLEU-{n}", "score", "higher", "records",
                f"corpus BLEU-{n}, COCO caption toolkit on its PTB tokens")
    yield m(refs + "caption_tokens_mean", "caption length (PTB tokens)", "tokens", None, "records",
            "mean length of the scored captions in PTB tokens, as BLEU counts them")
    yield m(refs + "reference_tokens_mean", "reference length (PTB tokens)", "tokens", None, "records",
            "mean length of their references in PTB tokens")
    yield m(refs + "captions_without_4gram", "captions too short for BLEU-4", "share", None, "records",
            "scored captions under 4 PTB tokens (no 4-gram: BLEU-4 says little when most are)")
    yield m(refs + "scoring_s", "scoring time (s)", "seconds", "lower", "process",
            "seconds spent on reference scoring")
    yield m(refs + "scoring_meteor_s", "METEOR time (s)", "seconds", "lower", "process",
            "seconds of that in METEOR")
    yield m(refs + "tokenizer", "tokenizer", "text", None, "same",
            "how captions were tokenized for the toolkit's scores (PTB, as the toolkit's PTBTokenizer)",
            kind="text")
    yield m(refs + "meteor_absent", "METEOR absent", "text", None, "same", "why METEOR is null", kind="text")
    yield m(refs + "scores_absent", "scores absent", "text", None, "same",
            "why the toolkit scores are null", kind="text")

    group = "faithfulness"
    faith = "faithfulness."
    yield m(faith + "regions_checked", "captions checked", "count", None, "sum", "captioned regions checked")
    yield m(faith + "scene_captions", "scene captions", "count", "lower", "sum",
            "captions flagged as describing the scene, not the region")
    yield m(faith + "scene_caption_rate", "scene caption rate", "share", "lower", "ratio",
            "scene captions over captions checked")
    yield m(faith + "by_reason", "scene captions by reason", "counts", "lower", "sum",
            "flagged captions per flag (one caption may have several)", kind="counts")

    group = "proposals"
    prop = "proposals."
    yield m(prop + "images", "images with proposals", "count", None, "sum", "images whose regions were proposed")
    yield m(prop + "regions", "proposed regions", "count", None, "sum", "regions proposed")
    yield m(prop + "per_image", "proposals / image", "count", None, "ratio", "proposed regions per image")
    yield m(prop + "capped", "proposals capped", "count", None, "sum", "proposals over the cap left out")
    yield m(prop + "by_method", "proposals by method", "counts", None, "sum", "proposed regions by method",
            kind="counts")
    q = prop + "quality."
    yield m(q + "images", "images scored", "count", None, "sum", "images with truth boxes (`propose.when=always`)")
    yield m(q + "iou_threshold", "IoU threshold", "iou", None, "same", "IoU at which a proposal matches a truth box",
            kind="value")
    yield m(q + "recall", "proposal recall", "share", "higher", "ratio", "truth boxes matched over truth boxes",
            compare=True, plot=True)
    yield m(q + "precision", "proposal precision", "share", "higher", "ratio",
            "matched proposals over proposals", compare=True, plot=True)
    yield m(q + "mean_best_iou", "mean best IoU", "iou", "higher", "ratio",
            "each truth box's best IoU with a proposal, mean over truth boxes")
    yield m(q + "truth_boxes", "truth boxes", "count", None, "sum", "truth boxes")
    yield m(q + "matched", "truth boxes matched", "count", "higher", "sum", "truth boxes matched one-to-one")
    qr = q + "references."
    yield m(qr + "truth_boxes", "truth boxes with references", "count", None, "sum",
            "truth boxes that have references")
    yield m(qr + "matched", "of them matched", "count", "higher", "sum", "of those, matched by a proposal")
    yield m(qr + "caption_exact_match", "proposal caption exact match", "share", "higher", "ratio",
            "truth boxes whose matched proposal's caption equals a reference (unmatched count as wrong)",
            compare=True)
    yield m(qr + "caption_exact_match_of_matched", "exact match of matched", "share", "higher", "ratio",
            "the same over matched truth boxes only")
    yield m(qr + "labels", "grounding labels", "count", None, "sum", "matched proposals with a grounding label")
    yield m(qr + "label_exact_match", "label exact match", "share", "higher", "ratio",
            "grounding labels equal to a reference")

    group = "densecap"  # metrics.densecap=true, where truth boxes and their references are known
    dc = "densecap."
    yield m(dc + "map", "DenseCap mAP", "score", "higher", "records",
            "DenseCap mAP: AP over IoU 0.3-0.7 x METEOR 0-0.25 thresholds, averaged (Johnson et al. 2016)",
            compare=True, plot=True)
    yield m(dc + "det_map", "detection mAP", "score", "higher", "records",
            "mean AP over the IoU thresholds alone (no caption condition)", compare=True)
    yield m(dc + "ap", "AP by IoU x METEOR", "score", "higher", "records",
            "AP per IoU threshold (rows) x METEOR threshold (columns)", kind="list")
    yield m(dc + "ap_by_iou", "AP by IoU", "score", "higher", "records", "row means of `ap`", kind="list")
    yield m(dc + "ap_by_meteor", "AP by METEOR", "score", "higher", "records", "column means of `ap`",
            kind="list")
    yield m(dc + "det_ap_by_iou", "detection AP by IoU", "score", "higher", "records",
            "localisation-only AP per IoU threshold", kind="list")
    yield m(dc + "iou_thresholds", "IoU thresholds", "setting", None, "same", "the IoU axis", kind="list")
    yield m(dc + "meteor_thresholds", "METEOR thresholds", "setting", None, "same", "the METEOR axis",
            kind="list")
    yield m(dc + "mode", "DenseCap mode", "text", None, "same",
            "`proposals`, `given` (every prediction on a truth box: an upper bound) or `mixed`", kind="text")
    yield m(dc + "n_images", "images scored", "count", None, "sum", "images with truth boxes")
    yield m(dc + "n_predictions", "predictions", "count", None, "sum", "predicted regions")
    yield m(dc + "n_unscored", "unscored predictions", "count", None, "sum",
            "predictions without a confidence (ranked as one block below the scored ones)")
    yield m(dc + "n_truth", "truth boxes (merged)", "count", None, "records",
            "truth boxes after merging those at IoU >= 0.7")
    yield m(dc + "n_truth_given", "truth boxes", "count", None, "sum", "truth boxes before merging")
    yield m(dc + "n_meteor_pairs", "METEOR pairs", "count", None, "sum",
            "prediction/reference pairs scored by METEOR")
    yield m(dc + "meteor_s", "DenseCap METEOR time (s)", "seconds", "lower", "process", "seconds of METEOR")
    yield m(dc + "absent", "DenseCap absent", "text", None, "same", "why `map` is null", kind="text")

    group = "stages"
    st = "stages.*."
    yield m(st + "rows", "rows", "count", None, "sum", "rows the stage handled")
    yield m(st + "seconds", "seconds", "seconds", "lower", "process", "wall time of the stage")
    for name, what in (("regions", "regions"), ("regions_captioned", "captioned regions"),
                       ("images", "distinct images")):
        yield m(st + name, what, "count", None, "sum",
                f"{what} in the rows the stage committed: after a resume, the resumed part's, which its "
                "seconds and rates are of")
    yield m(st + "rows_per_s", "rows / s", "per_s", "higher", "process", "rows per second of the stage")
    yield m(st + "images_per_s", "images / s", "per_s", "higher", "process", "images per second of the stage")
    yield m(st + "regions_per_s", "regions / s", "per_s", "higher", "process", "regions per second of the stage")
    yield m(st + "errors", "errors", "counts", "lower", "sum", "error rows of the stage by kind", kind="counts")
    yield m(st + "pid", "process id", "setting", None, "process", "the process that ran the stage")
    # The caption stage's rates are steady ones, its engine's start-up apart (docs/formats.md,
    # "Throughput: start-up apart").
    cap = "stages.caption."
    group = "speed"
    for name, label in (("prompt_tokens", "prompt tokens"), ("output_tokens", "output tokens")):
        yield m(cap + name + "_per_s", label + " / s", "per_s", "higher", "process",
                f"{label} per second of the caption stage's steady part")
    yield m(cap + "steady.basis", "steady basis", "text", None, "process",
            "`after_first_batch`; `first_batch` (nothing came after the engine's first batch: its own rates); "
            "`with_first_batch` (what came after held under 10% of the regions: both parts' rates)",
            kind="text")
    yield m(cap + "steady.seconds", "steady seconds", "seconds", None, "process",
            "the caption stage's steady part: from its first commit with an engine answer to its last commit")
    for name, what in (("rows", "rows committed"), ("images", "rows the engine answered (one image each)"),
                       ("regions", "regions captioned"), ("prompt_tokens", "prompt tokens"),
                       ("output_tokens", "output tokens")):
        yield m(cap + "steady." + name, "steady " + name.replace("_", " "),
                "tokens" if name.endswith("tokens") else "count", None, "process", f"{what} in the steady part")
    group = "startup"
    yield m(cap + "startup.engine_load_s", "engine load (s)", "seconds", "lower", "process",
            "building the engine: imports, processor, weights, vLLM's engine start, a server's check")
    yield m(cap + "startup.first_batch_s", "first batch (s)", "seconds", "lower", "process",
            "the engine's first batch (its first call and re-asks), which carries lazy warm-up")
    yield m(cap + "startup.time_to_first_caption_s", "time to first caption (s)", "seconds", "lower", "process",
            "from the caption stage's start to its first commit with an engine answer")
    yield m(cap + "startup.process_start_s", "process start (s)", "seconds", "lower", "process",
            "executor=isolated: spawning the child process until its stage loop starts")
    yield m(cap + "startup.cluster_start_s", "Ray cluster start (s)", "seconds", "lower", "process",
            "executor=ray: starting the run's local Ray cluster, or joining the one at executor.address")
    yield m(cap + "startup.replicas_start_s", "Ray replicas start (s)", "seconds", "lower", "process",
            "executor=ray: from asking for the replicas to the last one up (process, imports; engines load "
            "at their first batch)")
    yield m(cap + "startup.engines", "engines started", "count", None, "process",
            "engines started (Ray replicas); the seconds are the slowest one's")

    group = "pipeline"
    pipe = "pipeline."
    yield m(pipe + "overlap", "stages overlapped", "setting", None, "same",
            "whether the two stages ran at the same time", kind="text")
    yield m(pipe + "workers", "preparation workers", "setting", None, "same", "preparation worker processes")
    yield m(pipe + "seconds", "end-to-end seconds", "seconds", "lower", "process", "wall time of both stages")
    yield m(pipe + "images_per_s", "end-to-end images / s", "per_s", "higher", "process",
            "images over the wall time of both stages, start-up included")
    yield m(pipe + "regions_per_s", "end-to-end regions / s", "per_s", "higher", "process",
            "regions over the wall time of both stages, start-up included")

    group = "shards"  # a merged dir only (regioncap.merge)
    yield m("shards.count", "shards", "count", None, "sum", "shard runs merged")
    yield m("shards.wall_s_max", "longest shard (s)", "seconds", "lower", "process", "the longest shard's `wall_s`")
    yield m("shards.span_s", "sharded span (s)", "seconds", "lower", "process",
            "first shard's start to last shard's end, from their manifests")
    yield m("shards.regions_per_s", "sharded regions / s", "per_s", "higher", "process",
            "regions captioned over `span_s`: the sharded run as a whole")

    group = "model"
    yield m("model_weights", "model weights", "text", None, "same",
            "`real`, or `random` (built from the architecture's config: captions are noise)", kind="text")


#: Every metric, in the order shown.
SPEC: Tuple[Metric, ...] = tuple(_specs())
#: The metrics by path.
BY_PATH: Dict[str, Metric] = {m.path: m for m in SPEC}
assert len(BY_PATH) == len(SPEC), "a metric is declared twice"
assert all(m.group in GROUPS and m.unit in UNITS and m.aggregation in AGGREGATIONS for m in SPEC)
assert all(m.better in ("higher", "lower", None) for m in SPEC)
#: Stage names the ``stages.*`` metrics take (the run's stages).
STAGE_NAMES = stages.STAGE_NAMES


def get(path: str) -> Optional[Metric]:
    """The metric at the dotted ``path`` (``stages.caption.seconds`` finds ``stages.*.seconds``;
    ``latency_s.p95`` finds the distribution ``latency_s``), or ``None``."""
    found = BY_PATH.get(path)
    if found is not None:
        return found
    for spec in SPEC:
        if "*" in spec.path and fnmatch.fnmatchcase(path, spec.path) and path.count(".") == spec.path.count("."):
            return spec
    head, _, tail = path.rpartition(".")
    parent = BY_PATH.get(head) if head else None
    if parent is not None and parent.kind == "distribution" and tail in DISTRIBUTION_STATS:
        return parent
    return None


def in_group(group: str) -> List[Metric]:
    """The metrics of one group, in order."""
    return [m for m in SPEC if m.group == group]


def flagged(flag: str) -> List[Metric]:
    """The metrics with a flag set (``compare``, ``plot``, ``headline``), in order."""
    return [m for m in SPEC if getattr(m, flag)]


def _expand(spec: Metric) -> List[str]:
    paths = [spec.path.replace("*", stage) for stage in STAGE_NAMES] if "*" in spec.path else [spec.path]
    if spec.kind == "distribution":
        return [f"{p}.{stat}" for p in paths for stat in DISTRIBUTION_STATS]
    return paths


def objective_names() -> List[str]:
    """Every dotted path of a number ``metrics.json`` can hold: the values a sweep's
    ``objective`` may name (``regions_per_s``, ``references.exact_match``,
    ``stages.caption.regions_per_s``, ``latency_s.p95``...)."""
    return sorted({p for spec in SPEC if spec.objective for p in _expand(spec)})


def check_objective(objective: str) -> None:
    """Raise ``ValueError`` naming the closest metric names when ``objective`` is not a
    number ``metrics.json`` can hold."""
    names = objective_names()
    if objective in names:
        return
    close = difflib.get_close_matches(objective, names, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"objective={objective!r} is not a metric of metrics.json; {hint}"
                     f"choose a dotted path such as regions_per_s, references.exact_match, "
                     f"stages.caption.regions_per_s (all: python -m regioncap.metricspec --names)")


def value_at(metrics: Dict[str, Any], path: str) -> Any:
    """The value at the dotted ``path`` of ``metrics`` (``KeyError`` when absent)."""
    node: Any = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def number_at(metrics: Dict[str, Any], path: str) -> Optional[float]:
    """The finite number at ``path``, or ``None`` (absent, null, not a number)."""
    try:
        value = value_at(metrics, path)
    except KeyError:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def interval_at(metrics: Dict[str, Any], path: str) -> Optional[Dict[str, Any]]:
    """The 95% interval of the metric at ``path`` (``references.exact_match`` ->
    ``references.intervals.exact_match``), or ``None`` where ``metrics`` has none."""
    head, _, name = path.rpartition(".")
    try:
        value = value_at(metrics, f"{head}.intervals.{name}" if head else f"intervals.{name}")
    except KeyError:
        return None
    if not isinstance(value, dict) or number_at(value, "low") is None:
        return None
    return value


def leaf_paths(metrics: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """``(path, value)`` of every leaf of a ``metrics.json`` dict, where a leaf is a
    value that is not a dict, a distribution, a counts mapping or an interval
    (those stop the descent at their own path)."""
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        spec = get(path)
        if isinstance(value, dict) and not (spec is not None and spec.kind in ("distribution", "counts")) \
                and not _is_interval(value):
            yield from leaf_paths(value, f"{path}.")
        else:
            yield path, value


def _is_interval(value: Dict[str, Any]) -> bool:
    return set(INTERVAL_BOUNDS) <= set(value) and set(value) <= set(INTERVAL_BOUNDS) | {"n_clusters", "n_boot"}


def undeclared(metrics: Dict[str, Any]) -> List[str]:
    """Paths of a ``metrics.json`` dict that no metric declares (a test keeps this empty)."""
    return [path for path, _ in leaf_paths(metrics) if get(path) is None and not _interval_of(path)]


def _interval_of(path: str) -> bool:
    """Whether ``path`` is the interval of a declared metric (``references.intervals.exact_match``)."""
    head, _, name = path.rpartition(".")
    if not head.endswith("intervals"):
        return False
    base = head[: -len("intervals")]
    return get(f"{base}{name}") is not None


# ------------------------------------------------------------------ formatting
def format_value(value: Any, spec: Optional[Metric] = None, *, digits: int = 3) -> str:
    """A value as people read it: shares as percentages, counts as integers,
    seconds and scores with ``digits`` significant decimals; ``n/a`` for none."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {format_value(v, spec, digits=digits)}" for k, v in value.items()) or "–"
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    unit = spec.unit if spec else ""
    if unit == "share":
        return f"{value:.1%}"
    if isinstance(value, int) or (unit == "count" and float(value).is_integer()):
        return f"{int(value):,}"
    if unit in ("per_s", "seconds", "tokens", "words", "score", "iou", "count"):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.1f}"
    return f"{value:.4g}"


def format_interval(value: Optional[float], interval: Any, spec: Optional[Metric] = None) -> str:
    """``0.920 [0.740, 0.990]`` (or percentages for a share); the value alone without an interval."""
    text = format_value(value, spec)
    if isinstance(interval, dict) and interval.get("low") is not None and interval.get("high") is not None:
        text += f" [{format_value(interval['low'], spec)}, {format_value(interval['high'], spec)}]"
    return text


# ------------------------------------------------------------------ docs
DOCS_BEGIN = "<!-- metrics table: generated by `python -m regioncap.metricspec --write-docs`; do not edit -->"
DOCS_END = "<!-- end of the metrics table -->"


def markdown_table() -> str:
    """The metrics table of ``docs/formats.md``: one row per metric, grouped."""
    lines = ["| path | unit | better | combines | meaning |", "|---|---|---|---|---|"]
    for group, title in GROUPS.items():
        specs = in_group(group)
        if not specs:
            continue
        lines.append(f"| **{title}** | | | | |")
        for spec in specs:
            kind = f" ({spec.kind})" if spec.kind not in ("value", "text", spec.unit) else ""
            lines.append(f"| `{spec.path}` | {spec.unit}{kind} | {spec.better or '–'} | {spec.aggregation} | "
                         f"{spec.doc} |")
    return "\n".join(lines)


def docs_block() -> str:
    """The generated block, with its markers, as it stands in ``docs/formats.md``."""
    return f"{DOCS_BEGIN}\n{markdown_table()}\n{DOCS_END}"


def write_docs(path: str) -> bool:
    """Replace the generated block of the Markdown file at ``path``; return whether it changed."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    start, end = text.find(DOCS_BEGIN), text.find(DOCS_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no generated metrics block ({DOCS_BEGIN!r} ... {DOCS_END!r})")
    new = text[:start] + docs_block() + text[end + len(DOCS_END):]
    if new != text:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(new)
    return new != text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m regioncap.metricspec [--names | --markdown | --write-docs [FILE]]``."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m regioncap.metricspec",
                                     description="The metrics of metrics.json, as declared once.")
    parser.add_argument("--names", action="store_true", help="every path a sweep objective may name")
    parser.add_argument("--markdown", action="store_true", help="the metrics table of docs/formats.md")
    parser.add_argument("--write-docs", nargs="?", const=str(Path(__file__).resolve().parents[1] / "docs" /
                                                             "formats.md"), metavar="FILE",
                        help="rewrite the generated table in FILE (default: the checkout's docs/formats.md)")
    args = parser.parse_args(argv)
    if args.write_docs:
        print(("updated " if write_docs(args.write_docs) else "unchanged ") + args.write_docs)
    elif args.markdown:
        print(markdown_table())
    else:
        print(*objective_names(), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
