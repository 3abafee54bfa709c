"""The HTML report (regioncap/report.py): built from real runs with the fake
engine, checked as markup (captions present and escaped, images embedded,
nothing fetched), then opened in headless Debian Chromium over the DevTools
protocol: no console error, no broken image, no request but the file itself.

Chromium comes from Debian (``bash scripts/install_chromium.sh``); without it
the browser tests fail, they do not skip.
"""

from __future__ import annotations

import base64
import fcntl
import html
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import given, settings, strategies as st
from markupsafe import escape
from PIL import Image

from conftest import REPO, compose, run_cli
from regioncap.job import execute
from regioncap.records import read_jsonl
from regioncap.report import (IMAGES_PER_ROW, SWEEP_ROWS, ReportError, job_dirs, load_run, main as report_main,
                              param_figure, reference_scores, thumbnail_uri, write_report)

ARTIFACTS = REPO / "outputs" / "test-artifacts"
HOSTILE_ID = '<script>alert("id")</script>'
HOSTILE_IMAGE = "evil<img src=x onerror=alert(1)>.png"
HOSTILE_REF = "<b>a reference</b> & more"


# ---------------------------------------------------------------- runs
def _write_rows(path: Path, rows: List[Dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run with the fake engine: hostile strings in an id, an image name and
    a reference (the fake's captions repeat the row id), a missing region, an error row."""
    root = tmp_path_factory.mktemp("report")
    data_dir = root / "data"
    data_dir.mkdir()
    Image.new("RGB", (480, 320), (40, 120, 200)).save(data_dir / "blue.png")
    Image.new("RGB", (320, 480), (200, 90, 40)).save(data_dir / HOSTILE_IMAGE)
    rows = [
        {"id": HOSTILE_ID, "image": HOSTILE_IMAGE, "bbox": [[10, 10, 100, 100], [120, 200, 150, 150]],
         "references": [HOSTILE_REF, ["second box", "another reference"]]},
        # References on a second row too: an interval needs two rows (one row has none).
        {"id": "plain", "image": "blue.png", "bbox": [[20, 20, 200, 100], [250, 40, 100, 200], [5, 200, 60, 60]],
         "references": ["a wide box", "a tall box", "a small box"]},
        {"id": "gone", "image": "missing.png", "bbox": [[1, 1, 20, 20]]},
    ]
    data = _write_rows(data_dir / "rows.jsonl", rows)
    out = root / "run"
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}", "max_error_rate=1.0",
                   "engine.skip_regions=[2]", "engine.answer_on_reask=false"], output_dir=out)
    with pytest.MonkeyPatch.context() as mp:
        # METEOR starts a JVM (~10 s); the report only shows whatever scores metrics.json has.
        mp.setattr("regioncap.metrics.meteor_absent", lambda: "skipped by the report tests", raising=False)
        execute(cfg)
    return out


@pytest.fixture(scope="module")
def crop_dir(tmp_path_factory) -> Path:
    """A real ``prompt=crop`` run with the fake engine: one request (one crop) per region, every
    mark numbered 1; the fake's caption names the request (``<row>/r<region id>``)."""
    root = tmp_path_factory.mktemp("crop")
    Image.new("RGB", (480, 320), (40, 120, 200)).save(root / "blue.png")
    rows = [{"id": "three", "image": "blue.png", "bbox": [[20, 20, 200, 100], [250, 40, 100, 200], [5, 200, 60, 60]],
             "references": ["a box", "another box", "a third box"]},
            {"id": "one", "image": "blue.png", "bbox": [[30, 30, 90, 90]], "references": ["a box"]}]
    data = _write_rows(root / "rows.jsonl", rows)
    out = root / "run"
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}", "prompt=crop"], output_dir=out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("regioncap.metrics.meteor_absent", lambda: "skipped by the report tests", raising=False)
        execute(cfg)
    return out


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A real multirun from the CLI: ``max_boxes=0`` fails before writing anything, the others run."""
    sweep = tmp_path_factory.mktemp("sweep") / "multirun"
    proc = run_cli(["-m", "engine=fake", "progress=false", "max_boxes=0,2,10", f"hydra.sweep.dir={sweep}"])
    assert (sweep / "multirun.yaml").is_file(), proc.stderr[-3000:]
    assert not (sweep / "0" / "captions.jsonl").exists(), "job 0 (max_boxes=0) was meant to fail"
    assert (sweep / "1" / "captions.jsonl").is_file() and (sweep / "2" / "captions.jsonl").is_file(), \
        proc.stderr[-3000:]
    return sweep


# ---------------------------------------------------------------- markup checks
class _Tags(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: List[tuple] = []
        self.text: List[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    parser.close()
    return parser


def assert_self_contained(page: str) -> _Tags:
    """No script, no event handler, nothing the browser would fetch: images are data URIs."""
    doc = parse(page)
    names = {t for t, _ in doc.tags}
    assert not names & {"script", "iframe", "object", "embed", "link", "base", "form", "video", "audio",
                        "source"}, names
    for tag, attrs in doc.tags:
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            if name in ("src", "srcset", "poster", "background", "data", "action"):
                assert (value or "").startswith("data:image/"), (tag, name, (value or "")[:80])
            if name == "href":  # only relative links to the jobs' own reports
                assert "://" not in value and not value.lower().startswith(("file:", "javascript:", "//")), value
            if name == "style":
                assert "url(" not in value, value
    lowered = page.lower()
    for needle in ('src="http', "src='http", "file://", '="file:', "url(", "@import", "<script"):
        assert needle not in lowered, needle
    assert "default-src 'none'" in page  # the page's CSP forbids any request or script
    return doc


def test_run_report_shows_captions_escaped_and_embeds_images(run_dir):
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    page = out.read_text(encoding="utf-8")
    doc = assert_self_contained(page)
    text = "".join(doc.text)
    records = {r["id"]: r for r in read_jsonl(run_dir / "captions.jsonl")}

    # Every caption of the sample rows is on the page, as text (escaped in the markup).
    for rid in (HOSTILE_ID, "plain"):
        for reg in records[rid]["regions"]:
            if reg["caption"]:
                assert reg["caption"] in text
                assert str(escape(reg["caption"])) in page
    assert HOSTILE_ID in text and "&lt;script&gt;alert(&#34;id&#34;)&lt;/script&gt;" in page
    assert HOSTILE_IMAGE in text and "onerror=alert(1)&gt;" in page
    assert HOSTILE_REF in text and "&lt;b&gt;a reference&lt;/b&gt; &amp; more" in page
    assert "another reference" in text

    # Region 2 of every row is missing (the fake skips it, the re-ask does not answer): flagged.
    assert page.count('class="missing"') == 2
    # The error row, by kind, with its message.
    assert "visualize/missing_file" in text and "missing.png" in text

    # The marked images are embedded as small JPEG thumbnails, one per request.
    imgs = [a["src"] for t, a in doc.tags if t == "img"]
    assert len(imgs) == 2 and all(src.startswith("data:image/jpeg;base64,") for src in imgs)
    for src in imgs:
        import io

        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert max(im.size) <= 384
    assert len(page.encode()) < 500_000


def _sections(page: str) -> List[str]:
    """The page's section headings (h2), in order."""
    return [t for t in re.findall(r"<h2>(.*?)</h2>", page)]


def test_run_report_leads_with_results(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    doc = assert_self_contained(page)
    # The title and the header name the model, the prompt, the data and the engine.
    title = re.search(r"<title>(.*?)</title>", page).group(1)
    for part in ("model tiny", "prompt marked", "data jsonl", "engine fake"):
        assert part in title, title
    header = page[page.index('<header class="top">'):page.index("</header>")]
    for name in ("model", "prompt", "data", "engine"):
        assert f'<span class="k">{name}</span>' in header
    assert "<b>tiny</b>" in header and "<b>marked</b>" in header and "<b>fake</b>" in header
    # Headline: exact match and attribute accuracy (the data has references), not BLEU-4.
    big = re.findall(r'<div class="card big"><div class="v">(.*?)</div><div class="k">(.*?)</div>', header)
    assert [k for _, k in big] == ["exact match", "attribute accuracy"]
    assert "bleu" not in header.lower()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    iv = metrics["references"]["intervals"]["exact_match"]
    # The headline carries its 95% interval (metrics.json references.intervals).
    assert big[0][0] == f"{metrics['references']['exact_match']:.1%} [{iv['low']:.1%}, {iv['high']:.1%}]"
    # Results, then samples, then metrics and errors, then provenance, last.
    assert _sections(page) == ["Samples", "Metrics", "Errors by kind", "Provenance"]
    assert page.index("</header>") < page.index('<div class="sample">') < page.index("<h2>Metrics")
    assert page.index("manifest_version") > page.index("<h2>Provenance")
    assert "scene-like captions" in "".join(doc.text)


def test_wrong_captions_are_marked_against_their_references(run_dir, tmp_path):
    records = list(read_jsonl(run_dir / "captions.jsonl"))
    # The fake's captions are not the references: every scored region is wrong.
    wrong = [r for rec in records for r in rec["regions"] if (r.get("scores") or {}).get("exact_match") == 0.0]
    assert wrong
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert page.count('<span class="mk wrong"') == len(wrong) + 1  # + the legend above the samples
    assert page.count('<tr class="wrong">') == len(wrong)
    assert page.count('<span class="cap bad" dir="auto">') == len(wrong)
    assert page.count('<span class="mk right"') == 1  # the legend only
    # Made right: the same region gets a check, not a cross.
    fixed = tmp_path / "fixed"
    shutil.copytree(run_dir, fixed)
    for rec in records:
        for reg in rec["regions"]:
            if isinstance(reg.get("scores"), dict):
                reg["scores"]["exact_match"] = 1.0
    _write_rows(fixed / "captions.jsonl", records)
    page = write_report(fixed).read_text(encoding="utf-8")
    assert page.count('<span class="mk right"') == len(wrong) + 1 and '<tr class="wrong">' not in page


def test_headline_without_references_is_parse_rate_and_speed(run_dir, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(run_dir, plain)
    metrics = json.loads((plain / "metrics.json").read_text())
    metrics.pop("references")
    (plain / "metrics.json").write_text(json.dumps(metrics))
    records = list(read_jsonl(plain / "captions.jsonl"))
    for rec in records:
        rec.pop("references", None)
        for reg in rec["regions"]:
            reg.pop("scores", None)
    _write_rows(plain / "captions.jsonl", records)
    page = write_report(plain).read_text(encoding="utf-8")
    header = page[page.index('<header class="top">'):page.index("</header>")]
    big = re.findall(r'<div class="card big"><div class="v">(.*?)</div><div class="k">(.*?)</div>', header)
    assert [k for _, k in big] == ["parse success", "regions / s"]
    assert "exact match" not in header and 'class="mk' not in page


def test_crop_mode_shows_each_crop_under_its_own_region(crop_dir):
    records = {r["id"]: r for r in read_jsonl(crop_dir / "captions.jsonl")}
    assert [r["number"] for r in records["three"]["regions"]] == [1, 1, 1]  # what made every label "1"
    page = write_report(crop_dir).read_text(encoding="utf-8")
    assert_self_contained(page)
    cards = page.split('<div class="sample cropmode">')[1:]
    assert len(cards) == 2
    card = next(c for c in cards if '<span class="rowid">three</span>' in c)
    crops = re.split(r'<div class="crop[ "]', card)[1:]
    assert len(crops) == 3
    ids = [re.search(r'<span class="num rid">(\d+)</span>', c).group(1) for c in crops]
    assert ids == ["1", "2", "3"]
    for rid, crop in zip(ids, crops):
        assert crop.count("<img ") == 1  # its own crop
        assert f"three/r{rid} " in html.unescape(crop)  # the fake's caption of that crop, under that id
    # The original image with every box labelled by region id, drawn over it.
    assert card.count("<rect ") == 3 and [t for t in re.findall(r"<text [^>]*>(\d+)</text>", card)] == ids
    assert '<span class="num rid">1</span>' in next(c for c in cards if '<span class="rowid">one</span>' in c)


def test_crop_mode_input_image_keeps_the_runs_image_limits(crop_dir, tmp_path):
    """The input image is decoded as the run decoded it (regioncap.images, the run's limits): one over
    ``limits.max_image_pixels`` is a placeholder, the crops (the run's own files) still show."""
    small = tmp_path / "small"
    shutil.copytree(crop_dir, small)
    manifest = json.loads((small / "manifest.json").read_text())
    manifest["config"]["limits"]["max_image_pixels"] = 100
    (small / "manifest.json").write_text(json.dumps(manifest))
    page = write_report(small).read_text(encoding="utf-8")
    assert page.count("image not available") == 2 and page.count("<rect ") == 0
    assert page.count('<span class="num rid">') == 4


def _proposed_copy(run_dir: Path, dest: Path) -> Path:
    """The run with region 1 of the first row turned into a proposed region (``source``, ``score``),
    as a proposal stage writes them, and that row a ``without_bbox`` row."""
    shutil.copytree(run_dir, dest)
    records = list(read_jsonl(dest / "captions.jsonl"))
    records[0]["type"] = "without_bbox"
    records[0]["regions"][0].update(source="contours", score=0.875)
    records[0]["regions"][1]["source"] = "input"
    if len(records) > 1 and records[1]["regions"]:
        records[1]["regions"][0].update(source="vlm", label='a red <circle>')  # a grounding label, escaped
    _write_rows(dest / "captions.jsonl", records)
    return dest


def test_proposed_regions_are_drawn_and_labelled_distinctly(run_dir, tmp_path):
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "proposed (" not in page and "num prop" not in page and "<svg" not in page  # absent: nothing changes
    page = write_report(_proposed_copy(run_dir, tmp_path / "proposed")).read_text(encoding="utf-8")
    assert_self_contained(page)
    assert page.count("proposed (contours) 0.875") == 1  # the "input" region is not tagged
    assert page.count("proposed (vlm): &#34;a red &lt;circle&gt;&#34;") == 1  # its label beside the caption
    assert page.count('class="num prop"') == 2
    assert page.count('<rect class="prop"') == 2  # dashed, over the marked image
    assert "no input boxes: regions proposed" in page


def test_reference_scores_read_only_what_metrics_json_holds():
    metrics = {"spice": 0.5, "bertscore": 0.4, "clipscore": 0.3, "bleu4": 0.9,
               "references": {"bleu4": 0.02, "cider": 5.0, "meteor": None, "exact_match": 0.64,
                              "attribute_accuracy": 0.74, "regions_scored": 25, "tokenizer": "x"}}
    assert list(reference_scores(metrics).items()) == [
        ("exact_match", 0.64), ("attribute_accuracy", 0.74), ("cider", 5.0), ("bleu4", 0.02)]
    assert reference_scores({"spice": 0.5}) == {}


def test_report_is_reproducible_and_keeps_to_its_inputs(run_dir, tmp_path):
    a = write_report(run_dir, tmp_path / "a.html")
    b = write_report(run_dir, tmp_path / "b.html")
    assert a.read_bytes() == b.read_bytes()
    assert not (run_dir / "a.html").exists()


def test_report_survives_a_damaged_run_dir(run_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    (damaged / "metrics.json").unlink()
    with open(damaged / "captions.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"id": "cut-off", "regions": [')  # a job killed mid-line
    for img in (damaged / "images").iterdir():
        img.unlink()
        break
    page = write_report(damaged).read_text(encoding="utf-8")
    assert_self_contained(page)
    assert "not JSON records and were skipped" in page
    assert "no metrics.json" in page
    assert "image not available" in page  # a placeholder, not a broken <img>


@pytest.mark.cli
def test_cli_writes_the_report_and_names_bad_paths(run_dir, tmp_path, capsys):
    target = tmp_path / "sub" / "r.html"
    assert report_main([str(run_dir), "--out", str(target), "--rows", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert target.read_text(encoding="utf-8").count('class="sample"') == 1
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="neither a run dir"):
        write_report(empty)
    proc = subprocess.run([sys.executable, "-m", "regioncap.report", str(run_dir), "--out", str(tmp_path / "c.html")],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO),
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c.html").is_file()


def _fake_job(sweep: Path, name: str, overrides: List[str], source: Optional[Path]) -> Path:
    job = sweep / name
    if source is not None:
        shutil.copytree(source, job)
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {json.dumps(o)}\n" for o in overrides))
    return job


def _categorical_sweep(run_dir: Path, sweep: Path) -> Path:
    """Three jobs over a categorical override (prompt) and a numeric one (max_boxes), with references."""
    for i, (prompt, boxes, exact) in enumerate([("marked", "2", 0.25), ("crop", "2", 0.75), ("marked", "10", 0.5)]):
        job = _fake_job(sweep, str(i), ["engine=fake", f"prompt={prompt}", f"max_boxes={boxes}"], run_dir)
        metrics = json.loads((job / "metrics.json").read_text())
        metrics["references"].update(exact_match=exact, attribute_accuracy=exact + 0.1, bleu4=0.02)
        metrics["references"].pop("intervals", None)  # the copied run's, not these made-up scores
        metrics["regions_per_s"] = 10.0 + i
        (job / "metrics.json").write_text(json.dumps(metrics))
    return sweep


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_sweep_table_leads_with_exact_match_and_plots_bars_for_categories(run_dir, tmp_path):
    sweep = _categorical_sweep(run_dir, tmp_path / "sweep")
    page = write_report(sweep).read_text(encoding="utf-8")
    doc = assert_self_contained(page)
    table = page[page.index('<table class="compare">'):]
    table = table[:table.index("</table>")]
    header = re.findall(r"<th>(.*?)</th>", table)
    assert header[:4] == ["job", "status", "exact match", "attribute accuracy"]
    assert header.index("exact match") < header.index("BLEU-4")
    assert "25.0%" in table and "75.0%" in table
    # The jobs are copies of one run: their per-region exact match is the same, so the highest is not "best"
    # (tests/test_intervals.py has jobs that differ).
    assert "highest, not distinguishable from all others" in table and 'class="best"' not in table
    assert "no job is better than the others at 95%" in page
    # Plots of exact match (the default with references): bars by prompt, a line by max_boxes.
    alts = [a["alt"] for t, a in doc.tags if t == "img" and a["src"].startswith("data:image/png")]
    assert alts == ["exact match by prompt (bar chart)", "exact match by max_boxes (line chart)",
                    "exact match vs cost (scatter)"]
    jobs = [load_run(d) for d in job_dirs(sweep)]
    varying = ["prompt", "max_boxes"]
    bars = param_figure(jobs, varying, "prompt", "exact_match")
    ax = bars.axes[0]
    assert ax.get_title() == "exact match" and len(ax.patches) == 3 and not ax.lines  # bars, no joining line
    assert sorted(round(p.get_height(), 2) for p in ax.patches) == [0.25, 0.5, 0.75]
    line = param_figure(jobs, varying, "max_boxes", "exact_match").axes[0]
    assert line.lines and not line.patches
    # --metric picks what the plots show; a metrics.json path works; a wrong name is refused by name.
    assert report_main([str(sweep), "--metric", "references.attribute_accuracy"]) == 0
    page = (sweep / "report.html").read_text(encoding="utf-8")
    assert "attribute accuracy by prompt (bar chart)" in page and "exact match by prompt" not in page


def test_sweep_metric_must_be_one_the_report_knows(run_dir, tmp_path, capsys):
    sweep = _categorical_sweep(run_dir, tmp_path / "sweep")
    assert report_main([str(sweep), "--metric", "spice"]) == 2
    err = capsys.readouterr().err
    assert "--metric 'spice' is not a metric" in err and "exact_match" in err
    assert not (sweep / "report.html").exists()


@pytest.mark.cli
def test_sweep_report_plots_the_sweeps_objective(tmp_path):
    """A sweep run with ``objective=`` gets that metric in its report's plots (here parse success, where
    regions/s would be the default: the demo data has no references)."""
    sweep = tmp_path / "multirun"
    proc = run_cli(["-m", "engine=fake", "progress=false", "objective=parse_success_rate",
                    "max_boxes=2,10", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = parse((sweep / "report.html").read_text(encoding="utf-8"))
    alts = [a["alt"] for t, a in doc.tags if t == "img" and a["src"].startswith("data:image/png")]
    assert alts == ["parse success by max_boxes (line chart)", "parse success vs cost (scatter)"]


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_sweep_report_with_hostile_overrides_and_a_failed_job(run_dir, tmp_path):
    sweep = tmp_path / "sweep"
    _fake_job(sweep, "0", ["engine=fake", "prompt.system=<script>x</script>", "max_boxes=2"], run_dir)
    _fake_job(sweep, "1", ["engine=fake", "prompt.system=$\\alpha$ {price}", "max_boxes=10"], run_dir)
    failed = _fake_job(sweep, "2", ["engine=fake", "prompt.system=plain", "max_boxes=5"], None)
    (failed / "regioncap.log").write_text("[2026-01-01 00:00:00,000][regioncap][ERROR] - model <x> not found\n")
    # The second job scored against references: its scores show up as columns.
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    metrics["references"] = {"regions_scored": 3, "cider": 0.42, "bleu4": 0.1, "meteor": None}
    (sweep / "1" / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(sweep).read_text(encoding="utf-8")
    doc = assert_self_contained(page)
    text = "".join(doc.text)
    assert "prompt.system" in text and "max_boxes" in text  # the varying overrides are columns
    assert "<script>x</script>" in text and "$\\alpha$ {price}" in text
    assert "model <x> not found" in text and "failed" in text
    assert "CIDEr" in text and "0.42" in text
    plots = [a["alt"] for t, a in doc.tags if t == "img" and a["src"].startswith("data:image/png")]
    # Only job 0 has exact match (the default metric with references): no plot by a swept value, one point vs cost.
    assert plots == ["exact match vs cost (scatter)"]
    assert report_main([str(sweep), "--metric", "regions_per_s"]) == 0
    doc = parse((sweep / "report.html").read_text(encoding="utf-8"))
    plots = [a["alt"] for t, a in doc.tags if t == "img" and a["src"].startswith("data:image/png")]
    assert plots == ["regions / s by prompt.system (bar chart)", "regions / s by max_boxes (line chart)"]
    assert "Captions side by side" in text


def _cards(page: str) -> Dict[str, str]:
    """The header's cards, label -> value."""
    header = page[page.index('<header class="top">'):page.index("</header>")]
    return {k: v for v, k in re.findall(r'<div class="card[^"]*"><div class="v">(.*?)</div><div class="k">(.*?)</div>',
                                        header)}


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_sweep_counts_a_job_stopped_by_max_error_rate_as_failed(run_dir, tmp_path):
    """A job over ``max_error_rate`` wrote its records and metrics, then failed: the cards count it,
    as they count a job that failed after writing records and one that wrote nothing."""
    sweep = tmp_path / "sweep"
    _fake_job(sweep, "0", ["engine=fake", "max_error_rate=1.0"], run_dir)
    over = _fake_job(sweep, "1", ["engine=fake", "max_error_rate=0.1"], run_dir)
    crashed = _fake_job(sweep, "2", ["engine=fake", "max_error_rate=0.9"], run_dir)
    for job, limit, error in ((over, 0.1, "error rate 33.3% is over max_error_rate 10.0%"),
                              (crashed, 0.9, "engine <died> mid-run")):
        manifest = json.loads((job / "manifest.json").read_text())
        manifest.update(status="failed", error=error)
        manifest["config"]["max_error_rate"] = limit
        (job / "manifest.json").write_text(json.dumps(manifest))
    assert json.loads((over / "metrics.json").read_text())["error_rate"] > 0.1
    _fake_job(sweep, "3", ["engine=fake", "max_error_rate=0.5"], None)  # nothing written at all
    page = write_report(sweep).read_text(encoding="utf-8")
    doc = assert_self_contained(page)
    assert _cards(page)["jobs"] == "4" and _cards(page)["failed"] == "3"
    table = page[page.index('<table class="compare">'):]
    table = table[:table.index("</table>")]
    badges = re.findall(r'<span class="badge [^"]*">(.*?)</span>', table)
    assert badges == ["ok", "over max_error_rate", "failed", "failed"]
    assert '<span class="badge s-over_max_error_rate">' in table  # coloured as a warning by the CSS
    assert ".s-over_max_error_rate" in page
    text = "".join(doc.text)
    # Why each one failed, from its manifest, escaped.
    assert "error rate 33.3% is over max_error_rate 10.0%" in text and "engine <died> mid-run" in text
    assert "engine &lt;died&gt; mid-run" in page


@pytest.mark.cli
def test_sweep_side_by_side_shows_each_jobs_own_marks(sweep_dir):
    """Each job's marked images of a row, not the first job's: ``max_boxes=2`` splits a row's boxes
    over several request images, ``max_boxes=10`` draws them all on one."""
    page = write_report(sweep_dir).read_text(encoding="utf-8")
    section = page[page.index("<h2>Captions side by side</h2>"):]
    section = section[:section.index("</section>")]
    blocks = section.split('<div class="sample ')[1:]
    assert blocks
    jobs = [load_run(d, max_rows=SWEEP_ROWS, prefer_partial=False) for d in job_dirs(sweep_dir)]
    jobs = [j for j in jobs if j.records_file is not None]
    assert [j.name for j in jobs] == ["1", "2"]  # job 0 (max_boxes=0) failed
    split = renumbered = rows = 0
    for block in blocks:
        rid = html.unescape(re.search(r'<span class="rowid">(.*?)</span>', block).group(1))
        srcs = re.findall(r'<img src="([^"]+)"', block)
        captions = [html.unescape(c) for c in re.findall(r"<figcaption>(.*?)</figcaption>", block)]
        want_srcs, want_captions = [], []
        for job, label in zip(jobs, ("max_boxes=2", "max_boxes=10")):
            (rec,) = [r for r in job.samples if str(r.id) == rid]  # the record model (record_types.Record)
            requests = rec.requests[:IMAGES_PER_ROW]
            want_srcs += [thumbnail_uri(job.path / spec.image) for spec in requests]
            want_captions += [f"job {job.name}: {label}" + (f": {spec.key}" if len(rec.requests) > 1 else "")
                              for spec in requests]
            split += job.name == "1" and len(rec.requests) > 1
        assert srcs == want_srcs and captions == want_captions, rid
        # The table's first column numbers a region as job 1 marked it; job 2's cell shows its own mark
        # where it numbered the region otherwise.
        (first,), (second,) = ([r for r in j.samples if str(r.id) == rid] for j in jobs)
        numbers = {reg.id: reg.number for reg in second.regions}
        rows += len(first.regions)
        renumbered += sum(1 for reg in first.regions if numbers.get(reg.id, reg.number) != reg.number)
    assert split, "no row that max_boxes=2 split over several images: the test shows nothing"
    assert renumbered and section.count('<td><span class="num"') == rows + renumbered


def test_package_data_ships_every_template():
    """The wheel ships the templates: each file under regioncap/templates/ matches a package-data glob."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["regioncap"]
    package = REPO / "regioncap"
    files = [p.relative_to(package).as_posix() for p in (package / "templates").rglob("*") if p.is_file()]
    assert files
    # fnmatch's * crosses "/", setuptools' does not: compare part by part.
    unshipped = [f for f in files if not any(
        len(g.split("/")) == len(f.split("/")) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(f.split("/"), g.split("/")))
        for g in globs)]
    assert unshipped == []


def test_nothing_from_the_data_is_marked_safe():
    """Autoescape does the escaping: no template turns it off or marks a value safe, and
    report.py builds no markup of its own."""
    templates = sorted((REPO / "regioncap" / "templates" / "report").glob("*.j2"))
    assert templates
    for path in templates:
        text = path.read_text(encoding="utf-8")
        for needle in ("|safe", "| safe", "{% autoescape", "Markup"):
            assert needle not in text, (path.name, needle)
    source = (REPO / "regioncap" / "report.py").read_text(encoding="utf-8")
    assert "Markup" not in source and "html.escape" not in source and "autoescape=True" in source
    assert not re.search(r"""["']<(div|span|table|td|tr|p|figure|img|svg|section|details|code|pre|b)\b""", source)


_CELL = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(caption=_CELL, flag=_CELL, label=_CELL, source=_CELL)
def test_a_caption_cell_shows_any_text_as_text(caption, flag, label, source):
    """Whatever a caption, a flag, a proposal's source or label holds, the cell's markup is the
    template's spans and its text is the data."""
    from regioncap.record_types import Region
    from regioncap.report import _caption_cell, _environment

    macros = _environment().get_template("macros.html.j2").module
    reg = {"caption": caption, "flags": [flag], "source": source, "label": label,
           "scores": {"exact_match": 0.0}, "attempt": 2}
    out = str(macros.caption_cell(_caption_cell(Region.from_dict(reg), "caption")))
    doc = parse(out)
    assert {t for t, _ in doc.tags} == {"span"}
    classes = [a.get("class") for _, a in doc.tags]
    assert classes == ["mk wrong", "cap bad", "tag", "tag flag", "tag prop"]
    # The caption is its own bidi island: its text cannot reorder the tags after it.
    assert [a.get("dir") for _, a in doc.tags] == [None, "auto", None, None, None]
    text = "".join(doc.text)
    for value in (caption, flag, source, label):
        assert value.strip() in text


def test_a_right_to_left_override_in_a_caption_stays_inside_it():
    """A model's U+202E (right-to-left override) in a caption ran on over the re-asked and flag tags
    after it in the same cell (they read reversed); the caption span isolates it now."""
    from regioncap.record_types import Region
    from regioncap.report import _caption_cell, _environment

    macros = _environment().get_template("macros.html.j2").module
    reg = {"caption": "\u0645\u0631\u062d\u0628\u0627 \u202e reversed", "flags": ["debris"], "attempt": 2}
    out = str(macros.caption_cell(_caption_cell(Region.from_dict(reg), "caption")))
    assert '<span class="cap" dir="auto">\u0645\u0631\u062d\u0628\u0627 \u202e reversed</span>' in out
    assert out.index("</span>", out.index('dir="auto"')) < out.index("re-asked")
    refs = str(_environment().get_template("macros.html.j2").module.refs(["\u202e a ref"]))
    assert refs == '<span class="ref" dir="auto">\u202e a ref</span>'


# ---------------------------------------------------------------- the browser
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio"]


def chromium_path() -> str:
    """Debian's chromium (``REGIONCAP_CHROMIUM`` overrides); a missing browser fails the test, never skips it."""
    exe = os.environ.get("REGIONCAP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        pytest.fail(f"no chromium at {exe}: the report's browser test needs Debian's chromium. "
                    "Run `bash scripts/install_chromium.sh` (apt-get install chromium), or set REGIONCAP_CHROMIUM.",
                    pytrace=False)
    return exe


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    commands in on fd 3, replies and events out on fd 4, NUL-terminated JSON). Standard library only."""

    def __init__(self, exe: str, user_data_dir: Path, log_file: Path) -> None:
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()

        def to_fds_3_and_4() -> None:  # in the child, before exec
            a = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log = open(log_file, "wb")
        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, pass_fds=(3, 4),
            preexec_fn=to_fds_3_and_4)
        os.close(cmd_r)
        os.close(out_w)
        self._w = os.fdopen(cmd_w, "wb", buffering=0)
        self._r = os.fdopen(out_r, "rb", buffering=0)
        self._q: "queue.Queue[Optional[dict]]" = queue.Queue()
        self.events: List[dict] = []
        self._id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = self._r.read(1 << 16)
            if not chunk:
                self._q.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self._q.put(json.loads(msg))

    def _next(self, deadline: float) -> dict:
        try:
            msg = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("chromium did not answer in time") from None
        if msg is None:
            raise RuntimeError("chromium closed the DevTools pipe (crashed?)")
        return msg

    def send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None,
             timeout: float = 30) -> dict:
        self._id += 1
        msg: Dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._w.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            ev = self._next(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._w.close()
        self.log.close()


PAGE_STATE = """JSON.stringify({
  images: [...document.images].map(i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                                          src: i.src.slice(0, 40)})),
  scripts: document.scripts.length,
  text: document.body.innerText,
  width: document.documentElement.scrollWidth,
  cards_bottom: (q => q ? q.getBoundingClientRect().bottom : null)(document.querySelector("header .cards")),
  sample_top: (q => q ? q.getBoundingClientRect().top : null)(document.querySelector(".sample")),
  compare_top: (q => q ? q.getBoundingClientRect().top : null)(document.querySelector("table.compare")),
  compare_overflow: (q => q ? q.parentElement.scrollWidth - q.parentElement.clientWidth : null)(
    document.querySelector("table.compare")),
})"""


def open_in_chromium(page: Path, screenshot: Path, tmp_path: Path, size: tuple = (1280, 2000)) -> Dict[str, Any]:
    """Load ``page`` from file://, collect what went wrong, take a screenshot of ``size`` (width, height)."""
    browser = Chromium(chromium_path(), tmp_path / "chromium-profile", tmp_path / "chromium.log")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False}, session=session)
        url = page.absolute().as_uri()
        browser.send("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired")
        state = json.loads(browser.send("Runtime.evaluate", {"expression": PAGE_STATE, "returnByValue": True},
                                        session=session)["result"]["value"])
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        screenshot.write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
    problems = []
    requests = []
    for ev in browser.events:
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Runtime.exceptionThrown":
            problems.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            problems.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
            problems.append(f"log {params['entry'].get('source')}: {params['entry'].get('text')}")
        elif method == "Network.loadingFailed":
            problems.append(f"load failed: {params.get('errorText')}")
        elif method == "Network.requestWillBeSent":
            requests.append(params["request"]["url"])
    state["problems"] = problems
    state["requests"] = requests
    state["url"] = url
    return state


def _check_in_browser(report: Path, name: str, tmp_path: Path, size: tuple = (1280, 2000)) -> Dict[str, Any]:
    shot = tmp_path / name
    state = open_in_chromium(report, shot, tmp_path, size)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / name)
    assert not state["problems"], state["problems"]
    # The only request is the page itself: every image is inline.
    assert [u for u in state["requests"] if not u.startswith("data:")] == [state["url"]], state["requests"]
    assert state["images"], "no image on the page"
    broken = [i for i in state["images"] if not i["complete"] or i["w"] <= 0]
    assert not broken, broken
    assert state["scripts"] == 0
    assert state["width"] <= size[0], "the page scrolls sideways"
    with Image.open(shot) as im:
        assert im.size == size
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # not a blank page
    return state


def test_run_report_in_chromium(run_dir, tmp_path):
    report = write_report(run_dir)
    state = _check_in_browser(report, "report-screenshot.png", tmp_path)
    assert len(state["images"]) == 2
    # Hostile data shows as text; none of it ran or became markup.
    assert HOSTILE_ID in state["text"] and HOSTILE_IMAGE in state["text"] and HOSTILE_REF in state["text"]


@pytest.mark.cli
def test_sweep_report_in_chromium(sweep_dir, tmp_path):
    report = write_report(sweep_dir)
    page = report.read_text(encoding="utf-8")
    assert_self_contained(page)
    state = _check_in_browser(report, "sweep-report-screenshot.png", tmp_path)
    text = state["text"]
    assert "max_boxes must be a whole number in 1..1000" in text  # job 0 failed: in the table, with its reason
    assert "max_boxes" in text and "failed" in text
    plots = [i for i in state["images"] if i["src"].startswith("data:image/png")]
    assert len(plots) == 1  # no references (data=demo): regions/s by max_boxes, numbers joined by a line
    alts = [a["alt"] for t, a in parse(page).tags if t == "img" and a["src"].startswith("data:image/png")]
    assert alts == ["regions / s by max_boxes (line chart)"]


def test_results_are_on_the_first_screen_at_1400px(run_dir, crop_dir, tmp_path):
    """At 1400x1000 the header's numbers and the first sample row are on the first screen; the
    sweep's job table too, and it fits the page without scrolling sideways."""
    for name, report in (("run", write_report(run_dir)), ("crop", write_report(crop_dir))):
        state = _check_in_browser(report, f"report-{name}-1400.png", tmp_path, (1400, 1000))
        assert state["cards_bottom"] is not None and state["cards_bottom"] < 400, state["cards_bottom"]
        assert state["sample_top"] is not None and state["sample_top"] < 700, state["sample_top"]
    sweep = _categorical_sweep(run_dir, tmp_path / "sweep")
    state = _check_in_browser(write_report(sweep), "report-sweep-1400.png", tmp_path, (1400, 1000))
    assert state["compare_top"] is not None and state["compare_top"] < 600, state["compare_top"]
    assert state["compare_overflow"] == 0, "the job table scrolls sideways at 1400 px"


def test_browser_check_catches_a_broken_page(tmp_path):
    """The checks above can fail: a broken image, a script the CSP blocks, an outside request."""
    csp = "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:\">"
    page = tmp_path / "broken.html"
    page.write_text(f"<html><head>{csp}</head><body><img src='data:image/jpeg;base64,AAAA'>"
                    "<script>console.log(1)</script><img src='http://example.invalid/x.png'></body></html>")
    state = open_in_chromium(page, tmp_path / "broken.png", tmp_path)
    assert any("Content Security Policy" in p and "script" in p for p in state["problems"]), state["problems"]
    assert "http://example.invalid/x.png" in state["requests"]
    assert [i["w"] for i in state["images"]] == [0, 0]
