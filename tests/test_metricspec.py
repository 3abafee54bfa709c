"""The metric specification: one declaration per metric, held to what the code writes and the docs say."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest

from regioncap import metricspec as ms
from regioncap.metrics import DenseCapStats, compute_metrics

DOCS = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


def _records() -> List[Dict[str, Any]]:
    """Records that make compute_metrics write every block it can without a real run:
    references, proposals with truth boxes and labels, re-asks, an error row, a missing region."""
    def region(rid: int, caption: Any, **kw: Any) -> Dict[str, Any]:
        return {"id": rid, "chunk": 0, "source_index": rid - 1, "caption": caption, "attempt": 1, **kw}

    given = {"id": "a", "index": 0, "status": "partial", "image_path": "a.png", "references": ["a red circle", "a dog"],
             "dropped_boxes": [{"reason": "degenerate"}], "clipped_boxes": [[0, 0, 1, 1]],
             "tokens": {"prompt": 40, "output": 8},
             "regions": [region(1, "a red circle"), region(2, None, missing=True, reason="not_in_answer"),
                         region(3, "a blue star", attempt=2)],
             "requests": [{"image_size": [56, 56], "latency_s": 0.2, "answer": "1: a red circle", "format_ok": True,
                           "region_ids": [1, 2, 3], "prompt": "Describe each box.",
                           "reask": {"latency_s": 0.1, "prompt": "Describe box 2."}}]}
    proposed = {"id": "b", "index": 1, "status": "ok", "image_path": "b.png",
                "references": ["a red circle", ["a blue star", "blue star"]],
                "proposals": {"method": "vlm", "capped": 1, "truth_bbox": [[0, 0, 10, 10], [100, 100, 150, 150]],
                              "truth_index": [0, 1]},
                "regions": [{"id": 1, "chunk": 0, "source": "vlm", "bbox": [0, 0, 10, 9], "caption": "a red circle",
                             "label": "a red circle", "attempt": 1}],
                "requests": [{"image_size": [56, 56], "latency_s": 0.3, "answer": "oops", "format_ok": False,
                              "region_ids": [1]}]}
    failed = {"id": "c", "index": 2, "status": "error", "image_path": "c.png",
              "error": {"stage": "visualize", "kind": "missing_file", "message": "no such file"}}
    return [given, proposed, failed]


def _full_metrics() -> Dict[str, Any]:
    stages = {name: {"rows": 3, "seconds": 1.5, "errors": {"missing_file": 1}, "pid": 1,
                     "regions": 4, "regions_captioned": 3, "images": 3} for name in ms.STAGE_NAMES}
    # The caption stage's timing as StageStats.timing() gives it (an isolated child's start-up included).
    counts = {"rows": 2, "images": 2, "regions": 3, "prompt_tokens": 20, "output_tokens": 6}
    stages["caption"].update(steady={"seconds": 0.5, **counts}, first_batch=counts,
                             startup={"engine_load_s": 0.4, "first_batch_s": 0.3, "time_to_first_caption_s": 0.9,
                                      "process_start_s": 0.2, "cluster_start_s": 3.0, "replicas_start_s": 0.6,
                                      "engines": 1})
    out = compute_metrics(_records(), stages)
    # DenseCap mAP needs METEOR (Java): the block from its own code, with a stand-in METEOR.
    dense = DenseCapStats("references")
    for rec in _records():
        dense.add(rec)
    out["densecap"] = dense.summary(lambda pairs: [1.0 if c in refs else 0.0 for c, refs in pairs])
    # What run.py adds beside compute_metrics' own figures.
    out["model_weights"] = "real"
    out["pipeline"] = {"overlap": True, "workers": 1, "seconds": 2.0, "images_per_s": 1.5, "regions_per_s": 2.0}
    return out


def test_every_number_compute_metrics_writes_is_declared() -> None:
    assert ms.undeclared(_full_metrics()) == []


def test_every_declared_metric_is_written_somewhere() -> None:
    """A declaration nothing writes is a stale name (the ones only a real scorer or a run writes are listed)."""
    written = {ms.get(path).path for path, _ in ms.leaf_paths(_full_metrics()) if ms.get(path) is not None}
    needs_more = {  # METEOR (Java), a missing scorer package, and figures a run adds from its own state
        "references.meteor_absent", "references.scores_absent", "references.scoring_meteor_s",
        "latency_s.p50", "reask_latency_s",
        "shards.count", "shards.wall_s_max", "shards.span_s", "shards.regions_per_s",  # a merged dir
    }
    assert {m.path for m in ms.SPEC} - written - needs_more == set()


def test_formats_md_holds_the_generated_table() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert ms.docs_block() in text, "run: python -m regioncap.metricspec --write-docs"
    for spec in ms.SPEC:
        assert f"| `{spec.path}` |" in text


def test_write_docs_replaces_only_the_block(tmp_path: Path) -> None:
    doc = tmp_path / "f.md"
    doc.write_text(f"before\n{ms.DOCS_BEGIN}\nstale\n{ms.DOCS_END}\nafter\n", encoding="utf-8")
    assert ms.write_docs(str(doc)) is True
    assert doc.read_text(encoding="utf-8") == f"before\n{ms.docs_block()}\nafter\n"
    assert ms.write_docs(str(doc)) is False
    (tmp_path / "g.md").write_text("no block", encoding="utf-8")
    with pytest.raises(ValueError, match="no generated metrics block"):
        ms.write_docs(str(tmp_path / "g.md"))


def test_objectives_resolve_and_typos_name_the_closest() -> None:
    names = ms.objective_names()
    assert {"regions_per_s", "references.exact_match", "stages.caption.regions_per_s", "latency_s.p95",
            "proposals.quality.recall"} <= set(names)
    assert "model_weights" not in names and "errors" not in names  # text and counts are not objectives
    assert all(ms.get(name) is not None for name in names)
    with pytest.raises(ValueError, match="did you mean references.exact_match"):
        ms.check_objective("references.exact_matc")


def test_lookup_of_patterns_and_distributions() -> None:
    assert ms.get("stages.caption.seconds").path == "stages.*.seconds"
    assert ms.get("stages.caption.extra.seconds") is None
    assert ms.get("latency_s.p95").path == "latency_s"
    assert ms.get("latency_s.p50").path == "latency_s.p50"
    assert ms.get("nothing") is None
    assert ms.number_at({"a": {"b": 2}}, "a.b") == 2.0
    assert ms.number_at({"a": {"b": None}}, "a.b") is None
    assert ms.number_at({"a": True}, "a") is None


@pytest.mark.parametrize("path, value, text", [
    ("error_rate", 0.125, "12.5%"),
    ("rows", 1200, "1,200"),
    ("regions_per_s", 3.14159, "3.142"),
    ("references.cider", None, "n/a"),
    ("references.exact_match", float("nan"), "n/a"),
])
def test_format_value(path: str, value: Any, text: str) -> None:
    assert ms.format_value(value, ms.get(path)) == text


def test_format_interval() -> None:
    spec = ms.get("references.exact_match")
    assert ms.format_interval(0.92, {"low": 0.74, "high": 0.99}, spec) == "92.0% [74.0%, 99.0%]"
    assert ms.format_interval(0.92, None, spec) == "92.0%"


def test_directions_of_what_the_sweep_compares() -> None:
    compared = {m.path: m.better for m in ms.flagged("compare")}
    assert compared["error_rate"] == "lower" and compared["references.exact_match"] == "higher"
    assert all(m.better is not None or m.unit == "count" for m in ms.flagged("compare"))
