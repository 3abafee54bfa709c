"""A self-contained static HTML report of a run dir or a multirun (sweep) dir.

``python -m regioncap.report PATH [--out FILE] [--metric NAME]`` writes ``PATH/report.html``:

- run dir: results first. A header names the model, prompt, data and engine
  and gives the headline numbers (exact match and attribute accuracy when the
  data has references, else parse success and regions/s); then sample rows
  (the marked images, or in crop mode a grid of the crops, each region's
  caption marked right or wrong against its references); then the metrics and
  errors by kind; then provenance (manifest, config);
- multirun dir (``0/``, ``1/``, ... beside ``multirun.yaml``): a comparison
  table of the jobs (swept overrides in a sticky first column, exact match and
  the other key metrics), plots of one metric (``--metric``; default exact
  match where the jobs have references, else regions/s) against the swept
  parameters (bars for categorical values) and against cost, the captions of
  the same rows side by side, and each job's metrics.

It reads only what regioncap writes (docs/formats.md): the records typed
below, ``metrics.json`` as ``regioncap.metrics.compute_metrics`` builds it,
``manifest.json`` and Hydra's ``.hydra/``. Regions may carry ``source`` and
``score`` (proposed regions, not input boxes): those are drawn dashed and
tagged "proposed (<source>)".

The page makes no request of its own: CSS is inline, images are base64 data
URIs (thumbnails re-encoded as small JPEGs), there is no script, and a
Content-Security-Policy forbids anything else. Every string taken from the data
(captions are model output, paths are user input) is HTML-escaped.

Every input is optional: a job that failed before writing ``captions.jsonl``
shows up as failed, a truncated JSONL line is counted and skipped, a missing
image is a placeholder, never a broken ``<img>``. The report of the same
inputs is the same bytes (no timestamps of its own).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypedDict

from regioncap.rundir import CAPTIONS_FILE, MANIFEST_FILE, METRICS_FILE, REPORT_FILE, VISUALIZE_FILE, run_file_at

log = logging.getLogger("regioncap")


#: Rows shown in a run report's sample grid; request images shown per row.
DEFAULT_ROWS = 12
IMAGES_PER_ROW = 4
#: Longest side of an embedded thumbnail, in pixels.
DEFAULT_THUMB_PX = 384
#: Rows compared side by side across the jobs of a sweep.
SWEEP_ROWS = 4
EXAMPLES_PER_ERROR = 3
MAX_TEXT = 2000

#: Mark colours when the run's config cannot be read (``draw.palette`` of conf/draw/default.yaml).
DEFAULT_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
                   "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990"]

#: Reference scores of metrics.json's ``references`` (regioncap.metrics.compute_metrics), in the order shown.
#: Exact match and attribute accuracy first: on short captions BLEU-4 says little.
REFERENCE_SCORES = ("exact_match", "attribute_accuracy", "cider", "rouge_l", "meteor", "bleu4")
#: Shares among them (shown as percentages).
SHARE_SCORES = ("exact_match", "attribute_accuracy")
#: Metrics a sweep's plots can use (``--metric``): key_metrics names and labels.
PLOT_METRICS = {
    "exact_match": "exact match", "attribute_accuracy": "attribute accuracy", "cider": "CIDEr",
    "rouge_l": "ROUGE-L", "meteor": "METEOR", "bleu4": "BLEU-4", "regions_per_s": "regions / s",
    "parse_success_rate": "parse success", "error_rate": "error rate", "captioned_share": "regions captioned (share)",
    "output_tokens_per_region": "output tokens / region", "prompt_tokens_per_region": "prompt tokens / region",
    "latency_p50_s": "latency p50 (s)",
}
#: Shown as percentages wherever they appear.
PCT_METRICS = {"exact_match", "attribute_accuracy", "parse_success_rate", "error_rate", "captioned_share"}
#: Crops shown per row in crop mode.
CROPS_PER_ROW = 24


from regioncap.record_types import CaptionRecord, RecordError, Region, RequestSpec  # noqa: E402,F401



class ReportError(ValueError):
    """PATH is neither a run dir nor a multirun dir."""


# ---------------------------------------------------------------- reading
@dataclass
class RunData:
    """What the report knows about one run dir; every part may be missing."""

    path: Path
    name: str
    overrides: List[str] = field(default_factory=list)
    config: Optional[Dict[str, Any]] = None
    choices: Optional[Dict[str, Any]] = None
    manifest: Optional[Dict[str, Any]] = None
    metrics: Optional[Dict[str, Any]] = None
    records_file: Optional[Path] = None
    #: Counts and derived figures computed from the records themselves.
    scan: Dict[str, Any] = field(default_factory=dict)
    error_examples: Dict[str, List[Tuple[str, str]]] = field(default_factory=dict)
    samples: List[Dict[str, Any]] = field(default_factory=list)
    #: Why the run has no records (a failed job): the last error line of its log.
    failure: Optional[str] = None
    problems: List[str] = field(default_factory=list)

    @property
    def stage(self) -> Optional[str]:
        if self.records_file is None:
            return None
        return "caption" if self.records_file.name == CAPTIONS_FILE else "visualize"


def _read_json(path: Path, problems: List[str]) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} could not be read: {exc}")
        return None
    return value if isinstance(value, dict) else None


def _read_yaml(path: Path, problems: List[str]) -> Any:
    if not path.is_file():
        return None
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        problems.append(f"{path.parent.name}/{path.name} could not be read: {exc}")
        return None


def _iter_records(path: Path, problems: List[str]) -> Iterator[Dict[str, Any]]:
    """The records of a JSONL file; a line that is not a JSON object (a job killed mid-write) is skipped."""
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict):
                yield rec
            else:
                bad += 1
    if bad:
        problems.append(f"{path.name}: {bad} line(s) are not JSON records and were skipped")


def _log_failure(run_dir: Path) -> Optional[str]:
    """The last ERROR line of the job's log (Hydra's ``[time][logger][ERROR] - msg``)."""
    for log_file in sorted(run_dir.glob("*.log")):
        try:
            lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        errors = [ln for ln in lines if "[ERROR]" in ln or ln.startswith("Error") or "Traceback" in ln]
        if errors:
            return errors[-1].split("[ERROR] - ", 1)[-1].strip()
    return None


def load_run(run_dir: Path, *, max_rows: int = DEFAULT_ROWS, prefer_partial: bool = True,
             name: Optional[str] = None) -> RunData:
    """Read everything a report shows of one run dir, streaming its records once."""
    run_dir = Path(run_dir)
    run = RunData(path=run_dir, name=name or run_dir.name)
    hydra_dir = run_dir / ".hydra"
    overrides = _read_yaml(hydra_dir / "overrides.yaml", run.problems)
    if isinstance(overrides, list):
        run.overrides = [str(o) for o in overrides]
    config = _read_yaml(hydra_dir / "config.yaml", run.problems)
    run.config = config if isinstance(config, dict) else None
    run.manifest = _read_json(run_dir / MANIFEST_FILE, run.problems)
    if run.manifest is None:
        hydra_cfg = _read_yaml(hydra_dir / "hydra.yaml", run.problems)
        choices = _dig(hydra_cfg, "hydra", "runtime", "choices")
        if isinstance(choices, dict):
            run.choices = {k: v for k, v in choices.items() if not str(k).startswith("hydra/")}
    run.metrics = _read_json(run_dir / METRICS_FILE, run.problems)
    for fname in (CAPTIONS_FILE, VISUALIZE_FILE):
        if (run_dir / fname).is_file():
            run.records_file = run_dir / fname
            break
    if run.records_file is None:
        run.failure = _log_failure(run_dir) or f"no {CAPTIONS_FILE} or {VISUALIZE_FILE} in the run dir"
        return run
    _scan(run, max_rows=max_rows, prefer_partial=prefer_partial)
    return run


def _row_label(rec: Dict[str, Any]) -> str:
    label = str(rec.get("id", rec.get("index", "?")))
    if rec.get("line") is not None:
        label += f" (line {rec['line']})"
    return label


def _scan(run: RunData, *, max_rows: int, prefer_partial: bool) -> None:
    """Count, derive and pick samples in one pass over the records."""
    counts: Counter = Counter()
    errors: Counter = Counter()
    dropped: Counter = Counter()
    finish: Counter = Counter()
    latencies: List[float] = []
    first: List[Dict[str, Any]] = []
    partial: List[Dict[str, Any]] = []
    partial_quota = max_rows // 4 if prefer_partial else 0
    assert run.records_file is not None
    for rec in _iter_records(run.records_file, run.problems):
        status = rec.get("status")
        regions = [r for r in rec.get("regions") or [] if isinstance(r, dict)]
        requests = [s for s in rec.get("requests") or [] if isinstance(s, dict)]
        counts["rows"] += 1
        counts[f"status_{status}"] += 1
        counts["regions"] += len(regions)
        counts["regions_captioned"] += sum(1 for r in regions if r.get("caption"))
        counts["regions_missing"] += sum(1 for r in regions if r.get("missing"))
        exact = [_exact(r) for r in regions]
        counts["regions_exact"] += sum(1 for x in exact if x is True)
        counts["regions_wrong"] += sum(1 for x in exact if x is False)
        counts["requests"] += len(requests)
        tokens = rec.get("tokens") or {}
        if isinstance(tokens, dict):
            counts["prompt_tokens"] += _num(tokens.get("prompt")) or 0
            counts["output_tokens"] += _num(tokens.get("output")) or 0
        for d in rec.get("dropped_boxes") or []:
            if isinstance(d, dict):
                dropped[str(d.get("reason"))] += 1
        for spec in requests:
            if "format_ok" in spec and not spec.get("error"):
                counts["answered"] += 1
                counts["format_ok"] += bool(spec.get("format_ok"))
            if spec.get("finish_reason"):
                finish[str(spec["finish_reason"])] += 1
            lat = _num(spec.get("latency_s"))
            if lat is not None:
                latencies.append(lat)
        err = rec.get("error")
        if isinstance(err, dict):
            kind = f"{err.get('stage', '?')}/{err.get('kind', '?')}"
            errors[kind] += 1
            examples = run.error_examples.setdefault(kind, [])
            if len(examples) < EXAMPLES_PER_ERROR:
                examples.append((_row_label(rec), str(err.get("message", ""))))
        if requests and status != "error":
            if len(first) < max_rows:
                first.append(rec)
            elif (status == "partial" or False in exact) and len(partial) < partial_quota:
                partial.append(rec)
    if partial:  # rows with missing regions or wrong captions are the ones worth a look: swap a few in
        run.samples = sorted(first[: max_rows - len(partial)] + partial, key=lambda r: r.get("index", 0))
    else:
        run.samples = first
    scan: Dict[str, Any] = {k: counts[k] for k in (
        "rows", "regions", "regions_captioned", "regions_missing", "regions_exact", "regions_wrong", "requests",
        "prompt_tokens", "output_tokens")}
    scan.update({"rows_ok": counts["status_ok"], "rows_partial": counts["status_partial"],
                 "rows_no_regions": counts["status_no_regions"], "error_rows": counts["status_error"],
                 "errors": dict(errors), "dropped_reasons": dict(dropped), "finish_reasons": dict(finish)})
    scan["error_rate"] = counts["status_error"] / counts["rows"] if counts["rows"] else None
    if counts["answered"]:
        scan["parse_success_rate"] = counts["format_ok"] / counts["answered"]
    if latencies:
        latencies.sort()
        scan["latency_p50_s"] = _quantile(latencies, 0.5)
        scan["latency_p90_s"] = _quantile(latencies, 0.9)
    run.scan = scan


def _exact(reg: Region) -> Optional[bool]:
    """Whether a region's caption is an exact match of one of its references (``scores.exact_match``,
    written by the caption stage for a captioned region with references); None when not scored."""
    scores = reg.get("scores")
    value = _num(scores.get("exact_match")) if isinstance(scores, dict) else None
    return None if value is None else value >= 1.0


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def key_metrics(run: RunData) -> Dict[str, Optional[float]]:
    """The figures a sweep compares: metrics.json where it has them, else counted from the records."""
    m = run.metrics or {}
    s = run.scan

    def pick(key: str) -> Optional[float]:
        value = _num(m.get(key))
        return value if value is not None else _num(s.get(key))

    regions, captioned = pick("regions"), pick("regions_captioned")
    out: Dict[str, Optional[float]] = {
        "rows": pick("rows"), "error_rate": pick("error_rate"), "regions": regions,
        "regions_captioned": captioned,
        "captioned_share": captioned / regions if regions and captioned is not None else None,
        "regions_per_s": _num(m.get("regions_per_s")),
        "parse_success_rate": pick("parse_success_rate"),
        "output_tokens_per_region": None, "prompt_tokens_per_region": None,
        "latency_p50_s": _num(_dig(m, "latency_s", "p50")) or _num(s.get("latency_p50_s")),
    }
    for kind in ("output", "prompt"):
        # Per region of the run, as metrics.json counts it (regioncap/metrics.py).
        tokens, per = pick(f"{kind}_tokens"), _num(m.get(f"{kind}_tokens_per_region"))
        out[f"{kind}_tokens_per_region"] = per if per is not None else (
            tokens / regions if tokens is not None and regions else None)
    out.update(reference_scores(m))
    return out


def reference_scores(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The reference scores of metrics.json (``references``: exact match, attribute accuracy, CIDEr, ...)
    that have a value, in :data:`REFERENCE_SCORES` order."""
    refs = metrics.get("references")
    if not isinstance(refs, dict):
        return {}
    return {name: float(refs[name]) for name in REFERENCE_SCORES if _num(refs.get(name)) is not None}


def is_multirun_dir(path: Path) -> bool:
    """A Hydra sweep dir: ``multirun.yaml``, or no run files of its own but job subdirs."""
    path = Path(path)
    if (path / "multirun.yaml").is_file():
        return True
    if any((path / f).exists() for f in (CAPTIONS_FILE, VISUALIZE_FILE, METRICS_FILE, ".hydra")):
        return False
    return bool(job_dirs(path))


def job_dirs(sweep_dir: Path) -> List[Path]:
    """The job dirs of a sweep, in job order (``0, 1, ..., 10``, not ``0, 1, 10``)."""
    dirs = [d for d in Path(sweep_dir).iterdir() if d.is_dir() and any(
        (d / f).exists() for f in (".hydra", CAPTIONS_FILE, VISUALIZE_FILE, METRICS_FILE))]
    return sorted(dirs, key=lambda d: (0, int(d.name), "") if d.name.isascii() and d.name.isdigit() else (1, 0, d.name))


# ---------------------------------------------------------------- html helpers
def e(value: Any) -> str:
    """HTML-escape anything for text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def _clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit} more characters)"


def _fmt(value: Any, kind: str = "") -> str:
    """A number as a person reads it: ``1,405``, ``5.5``, ``0.0002``, ``20.0%`` (``kind="pct"``)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and kind == "pct":
        return f"{value:.1%}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        if abs(value) >= 100:
            return f"{value:,.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.2f}"
        return f"{value:.2g}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "",
           row_classes: Optional[Sequence[str]] = None) -> str:
    """A table whose header is text to escape and whose cells are HTML already."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        rc = row_classes[i] if row_classes and i < len(row_classes) and row_classes[i] else ""
        body.append((f'<tr class="{e(rc)}">' if rc else "<tr>") + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f'<table class="{e(cls)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _kv_table(pairs: Iterable[Tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _yaml_text(obj: Any) -> str:
    import yaml

    try:
        return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    except yaml.YAMLError:
        from regioncap.records import dumps

        return dumps(obj, indent=2)


def _pre(text: str) -> str:
    return f"<pre>{e(text)}</pre>"


def _badge(status: Any) -> str:
    status = str(status)
    return f'<span class="badge s-{e(re.sub(r"[^a-z_]", "", status.lower()))}">{e(status)}</span>'


def thumbnail_uri(path: Path, max_px: int = DEFAULT_THUMB_PX) -> Optional[str]:
    """A small JPEG of the image as a data URI, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (max_px, max_px))  # JPEG: decode at reduced scale
            im = im.convert("RGB")
            im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80, optimize=True)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _image_html(run_dir: Path, image: Any, thumb_px: int, caption: str = "") -> str:
    """An embedded thumbnail of a request image, or a placeholder that names it."""
    uri = None
    if isinstance(image, str) and image:
        path = Path(image)
        uri = thumbnail_uri(path if path.is_absolute() else run_dir / path, thumb_px)
    cap = f"<figcaption>{e(caption)}</figcaption>" if caption else ""
    if uri is None:
        return f'<figure><div class="noimg">image not available<br><code>{e(image)}</code></div>{cap}</figure>'
    return f'<figure><img src="{uri}" alt="{e(image)}" loading="eager">{cap}</figure>'


def _original_html(run: RunData, rec: CaptionRecord, thumb_px: int) -> str:
    """The row's input image (``image_path``) as a thumbnail with every region's box and id drawn over
    it. Decoded by ``regioncap.images.load_image`` (the run's own size limits, EXIF orientation applied,
    the frame the boxes refer to), as every input image is; a placeholder when it cannot be read."""
    from PIL import Image

    from regioncap.images import ImageLoadError, load_image

    caption = "input image, boxes by region id"
    path = rec.get("image_path")
    uri = None
    if isinstance(path, str) and path and Path(path).is_absolute():
        limits = _dig(_config(run), "limits") or {}
        kwargs = {k: int(v) for k, v in limits.items()
                  if k in ("max_image_pixels", "max_file_bytes") and isinstance(v, int) and v > 0}
        try:
            im = load_image(path, draft_target=(thumb_px, thumb_px), **kwargs).image
            im.thumbnail((thumb_px, thumb_px), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80, optimize=True)
            uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        except (ImageLoadError, OSError, ValueError):
            uri = None
    if uri is None:
        return (f'<figure><div class="noimg">image not available<br><code>{e(path)}</code></div>'
                f"<figcaption>{e(caption)}</figcaption></figure>")
    overlay = _box_overlay(_regions(rec), rec.get("image_size"), "bbox", lambda r: str(r.get("id", "")),
                           only_proposed=False)
    return _with_overlay(f'<figure><img src="{uri}" alt="{e(path)}" loading="eager">'
                         f"<figcaption>{e(caption)}</figcaption></figure>", overlay)


def _palette(run: RunData) -> List[str]:
    palette = _dig(run.config, "draw", "palette")
    if isinstance(palette, list) and palette:
        return [str(c) for c in palette]
    return DEFAULT_PALETTE


_COLOUR = re.compile(r"^(#[0-9a-fA-F]{3,8}|[a-zA-Z]{3,20})$")


def _swatch(number: Any, palette: Sequence[str], proposed: bool = False) -> str:
    """The region's number on the colour of its mark (colour ``palette[(number - 1) % len]``);
    a proposed region's number has a dashed outline."""
    colour = ""
    if isinstance(number, int) and number >= 1:
        c = palette[(number - 1) % len(palette)]
        colour = c if _COLOUR.match(c) else ""  # a colour string goes into CSS: only plain forms
    style = f' style="background:{e(colour)}"' if colour else ""
    cls = "num prop" if proposed else "num"
    return f'<span class="{cls}"{style}>{e(number)}</span>'


def _proposed(reg: Region) -> Optional[str]:
    """A proposed region's source (``contours``, ``vlm``, ...); None for an input box or when unsaid."""
    source = reg.get("source")
    return str(source) if source not in (None, "", "input") else None


def _source_tag(reg: Region) -> str:
    source = _proposed(reg)
    if source is None:
        return ""
    score = _num(reg.get("score"))
    extra = f" {_fmt(score)}" if score is not None else ""
    label = reg.get("label")
    # The grounding model's own name for the object, beside the caption.
    extra += f': "{label}"' if isinstance(label, str) and label else ""
    return f' <span class="tag prop">proposed ({e(source)}){e(extra)}</span>'


# ---------------------------------------------------------------- sections
def _head(title: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        # No script, no request: inline styles and data: images only.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
    )


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _small_flat(value: Any) -> bool:
    return isinstance(value, dict) and 0 < len(value) <= 10 and all(_is_scalar(v) for v in value.values())


def _manifest_summary(man: Dict[str, Any]) -> str:
    """Scalars and lists of scalars (``command``) under "run", each small flat dict (``git``,
    ``model``) as its own small table; empty values left out. Side by side, to keep it short."""
    groups: Dict[str, List[Tuple[str, str]]] = {"run": []}
    for key, value in man.items():
        if value is None or value == "":
            continue
        if _is_scalar(value):
            groups["run"].append((key, e(_fmt(value))))
        elif isinstance(value, list) and all(_is_scalar(v) for v in value):
            groups["run"].append((key, "<code>" + e(" ".join(str(v) for v in value)) + "</code>"))
        elif _small_flat(value):
            groups[key] = [(k, e(_fmt(v))) for k, v in value.items() if v is not None and v != ""]
    tables = [f"<div><h3>{e(name)}</h3>{_kv_table(rows)}</div>" for name, rows in groups.items() if rows]
    return f'<div class="tables manifest">{"".join(tables)}</div>' if tables else ""


def _manifest_section(run: RunData) -> str:
    parts = []
    man = run.manifest
    if man:
        parts.append(_manifest_summary(man))
        for key, value in man.items():
            if _small_flat(value):
                continue
            if isinstance(value, (dict, list)) and not (
                    isinstance(value, list) and all(_is_scalar(v) for v in value)):
                opened = " open" if key in ("hydra", "choices", "overrides") else ""
                parts.append(f"<details{opened}><summary>{e(key)}</summary>{_pre(_yaml_text(value))}</details>")
    else:
        parts.append('<p class="note">no manifest.json in this run dir; the config and overrides are '
                     "Hydra's (<code>.hydra/</code>).</p>")
        if run.choices:
            parts.append(_kv_table((k, e(v)) for k, v in run.choices.items()))
        if run.overrides:
            parts.append(f"<details open><summary>overrides</summary>{_pre(chr(10).join(run.overrides))}</details>")
        if run.config is not None:
            parts.append(f"<details><summary>config (.hydra/config.yaml)</summary>{_pre(_yaml_text(run.config))}"
                         "</details>")
    return ('<details class="section provenance" open><summary><h2>Provenance</h2></summary>'
            f'<p class="note">how this run was made: manifest.json (host, git, versions, data fingerprint) '
            f'and the resolved config.</p>{"".join(parts)}</details>')


def _config(run: RunData) -> Dict[str, Any]:
    cfg = run.config if isinstance(run.config, dict) else _dig(run.manifest, "config")
    return cfg if isinstance(cfg, dict) else {}


def _choices(run: RunData) -> Dict[str, Any]:
    choices = _dig(run.manifest, "hydra", "choices")
    if isinstance(choices, dict):
        return choices
    return run.choices or {}


def _text(value: Any) -> Optional[str]:
    return str(value) if value not in (None, "") and _is_scalar(value) else None


def run_identity(run: RunData) -> Dict[str, Optional[str]]:
    """What the run is, as a person names it: ``model``, ``prompt``, ``data``, ``engine`` (the config's
    names, else Hydra's group choices), and ``data_path``."""
    cfg, choices = _config(run), _choices(run)

    def name(group: str) -> Optional[str]:
        return _text(_dig(cfg, group, "name")) or _text(choices.get(group))

    prompt = name("prompt")
    strategy = _text(_dig(cfg, "prompt", "strategy"))
    if strategy and prompt and strategy != prompt:
        prompt = f"{prompt} ({strategy})"
    return {"model": name("model"), "prompt": prompt or strategy, "data": name("data"),
            "engine": name("engine") or _text(_dig(run.manifest, "engine", "name")),
            "data_path": _text(_dig(cfg, "data", "path")) or _text(_dig(run.manifest, "data", "path"))}


def prompt_strategy(run: RunData) -> Optional[str]:
    """``marked`` or ``crop`` (``prompt.strategy`` of the run's config), None when unknown."""
    return _text(_dig(_config(run), "prompt", "strategy"))


def _identity_text(ident: Dict[str, Optional[str]]) -> str:
    return " · ".join(f"{k} {ident[k]}" for k in ("model", "prompt", "data", "engine") if ident.get(k))


def _card(value: str, label: str, cls: str = "") -> str:
    return f'<div class="card {cls}"><div class="v">{e(value)}</div><div class="k">{e(label)}</div></div>'


def _header(run: RunData) -> str:
    """What the run is and how it did: model, prompt, data, engine, then the headline numbers."""
    ident = run_identity(run)
    names = "".join(f'<span class="id"><span class="k">{k}</span> <b>{e(ident[k])}</b></span>'
                    for k in ("model", "prompt", "data", "engine") if ident.get(k))
    sub = [f"<code>{e(run.path)}</code>"]
    if ident.get("data_path"):
        sub.append(f'data <code>{e(ident["data_path"])}</code>')
    started = _text(_dig(run.manifest, "started"))
    if started:
        sub.append(f"started {e(started)}")
    status = _text(_dig(run.manifest, "status"))
    head = (f'<header class="top"><div class="kicker">regioncap run report · <b>{e(run.name)}</b>'
            f'{" " + _badge(status) if status else ""}</div>'
            f'<h1>{names or e(run.name)}</h1><p class="path">{" · ".join(sub)}</p>')
    if _dig(run.metrics or {}, "model_weights") == "random" or \
            _dig(run.manifest or {}, "config", "model", "weights") == "random":
        head += ('<p class="warn" style="background:#b00020;color:#fff;padding:6px 10px;font-weight:bold">'
                 "RANDOM WEIGHTS: the model was built from its architecture's config with random weights "
                 "(model.weights=random). Its captions are noise; only speed, tokens and memory mean something.</p>")
    prop = _dig(run.metrics or {}, "proposals")
    if isinstance(prop, dict) and prop.get("images"):
        q = prop.get("quality") or {}
        text = (f"proposals ({e(', '.join(sorted(prop.get('by_method') or {})))}): {_fmt(prop.get('regions'))} "
                f"region(s) on {_fmt(prop.get('images'))} image(s)")
        if q:
            text += (f"; against the given boxes at IoU {_fmt(q.get('iou_threshold'))}: recall "
                     f"{_fmt(q.get('recall'), 'pct')}, precision {_fmt(q.get('precision'), 'pct')}, "
                     f"mean best IoU {_fmt(q.get('mean_best_iou'))}")
            qr = q.get("references") or {}
            if qr:
                text += (f"; captions of the matched proposals: exact match "
                         f"{_fmt(qr.get('caption_exact_match'), 'pct')} of the truth boxes")
                if qr.get("labels"):
                    text += f", labels {_fmt(qr.get('label_exact_match'), 'pct')}"
        head += f'<p class="path">{text}</p>'
    if run.records_file is None:
        return head + "</header>"
    km = key_metrics(run)
    big: List[Tuple[str, str]] = []
    prop_refs = _dig(run.metrics or {}, "proposals", "quality", "references") or {}
    if km.get("exact_match") is not None:
        big.append((_fmt(km["exact_match"], "pct"), "exact match"))
        if km.get("attribute_accuracy") is not None:
            big.append((_fmt(km["attribute_accuracy"], "pct"), "attribute accuracy"))
    elif isinstance(prop_refs, dict) and prop_refs.get("caption_exact_match") is not None:
        # Proposed regions only (propose.when=always): scored through the truth box each matched.
        big.append((_fmt(prop_refs["caption_exact_match"], "pct"), "exact match (proposals vs truth)"))
        big.append((_fmt(_dig(run.metrics or {}, "proposals", "quality", "recall"), "pct"), "proposal recall"))
    else:
        big += [(_fmt(km["parse_success_rate"], "pct"), "parse success"), (_fmt(km["regions_per_s"]), "regions / s")]
    small = []
    wrong, exact = run.scan.get("regions_wrong"), run.scan.get("regions_exact")
    if wrong or exact:
        small.append((f"{_fmt(wrong)} / {_fmt((wrong or 0) + (exact or 0))}", "captions not an exact match"))
    small.append((f"{_fmt(km['regions_captioned'])} / {_fmt(km['regions'])}", "regions captioned"))
    if km.get("exact_match") is not None:
        small += [(_fmt(km["regions_per_s"]), "regions / s"), (_fmt(km["parse_success_rate"], "pct"), "parse success")]
    small += [(f"{_fmt(km['rows'])}", "rows"), (_fmt(km["error_rate"], "pct"), "error rate")]
    scene = _num(_dig(run.metrics or {}, "faithfulness", "scene_caption_rate"))
    if scene is not None:
        small.append((_fmt(scene, "pct"), "scene-like captions"))
    cards = "".join(_card(v, k, "big") for v, k in big) + "".join(_card(v, k) for v, k in small)
    return head + f'<div class="cards">{cards}</div></header>'


#: metrics.json keys by topic (regioncap/metrics.py); ``pct`` is a share shown as a percentage.
_METRIC_GROUPS = [
    ("Rows", [("rows", ""), ("rows_ok", ""), ("rows_partial", ""), ("rows_no_regions", ""), ("rows_pending", ""),
              ("error_rows", ""), ("error_rate", "pct"), ("error_rows_by_stage", "")]),
    ("Regions", [("regions", ""), ("regions_captioned", ""), ("regions_missing", ""),
                 ("regions_missing_by_reason", ""), ("regions_from_reask", ""), ("boxes_dropped", ""),
                 ("boxes_dropped_by_reason", ""), ("boxes_clipped", ""), ("images", ""), ("chunks", "")]),
    ("Cost and speed", [("wall_s", ""), ("regions_per_s", ""), ("images_per_s", ""),
                        ("requests", ""), ("reasks", ""), ("prompt_tokens", ""), ("output_tokens", ""),
                        ("visual_tokens", ""), ("prompt_tokens_per_region", ""),
                        ("visual_tokens_per_region", ""), ("output_tokens_per_region", ""),
                        ("visual_tokens_per_request", "")]),
    ("Answers", [("requests_answered", ""), ("requests_failed", ""), ("requests_format_ok", ""),
                 ("parse_success_rate", "pct"), ("captions_empty", ""), ("captions_duplicated", ""),
                 ("captions_repeat_prompt", "")]),
]
_SHOWN = {k for _, keys in _METRIC_GROUPS for k, _ in keys} | {"stages", "errors", "references", "faithfulness"}
#: A metrics.json dict with only these keys is a distribution (``latency_s``, ``caption_words``).
_DIST_KEYS = {"n", "mean", "min", "p50", "p95", "max"}


def _value_html(value: Any, kind: str = "") -> str:
    if isinstance(value, dict):
        flat = [(k, v) for k, v in value.items() if _is_scalar(v)]
        return e(", ".join(f"{k}: {_fmt(v, kind)}" for k, v in flat)) if flat else "–"
    return e(_fmt(value, kind))


def _metrics_section(run: RunData) -> str:
    """metrics.json as tables by topic; what it lacks (no metrics.json, an older run) counted from the records."""
    m = run.metrics
    s = run.scan
    parts = []
    if m is None:
        parts.append(f'<p class="note">no {METRICS_FILE}: the figures below are counted from '
                     f"{e(run.records_file.name if run.records_file else 'nothing')}.</p>")
        m = {k: v for k, v in s.items() if k in _SHOWN}
    tables = []
    for title, keys in _METRIC_GROUPS:
        rows = [(k, _value_html(m.get(k), kind)) for k, kind in keys if k in m]
        if rows:
            tables.append(f"<div><h3>{e(title)}</h3>{_kv_table(rows)}</div>")
    refs = m.get("references")
    if isinstance(refs, dict) and refs:
        rows = [(k, _value_html(v)) for k, v in refs.items() if _is_scalar(v) or isinstance(v, dict)]
        tables.append(f"<div><h3>References</h3>{_kv_table(rows)}</div>")
    faith = m.get("faithfulness")
    if isinstance(faith, dict) and faith:
        # Captions that read like a description of the whole scene (regioncap.metrics.region_flags).
        rows = [(k, _value_html(v, "pct" if k == "scene_caption_rate" else ""))
                for k, v in faith.items() if _is_scalar(v) or isinstance(v, dict)]
        tables.append(f"<div><h3>Faithfulness</h3>{_kv_table(rows)}</div>")
    km = key_metrics(run)
    counted = [("parse_success_rate", "parse success rate", "pct", s.get("parse_success_rate")),
               ("latency_s", "latency p50 (s)", "", s.get("latency_p50_s")),
               ("latency_s", "latency p90 (s)", "", s.get("latency_p90_s")),
               ("output_tokens_per_region", "output tokens / region", "", km["output_tokens_per_region"]),
               ("prompt_tokens_per_region", "prompt tokens / region", "", km["prompt_tokens_per_region"])]
    counted = [(label, e(_fmt(v, kind))) for key, label, kind, v in counted if key not in m and v is not None]
    if counted:
        tables.append(f"<div><h3>Counted from the records</h3>{_kv_table(counted)}</div>")
    other: List[Tuple[str, str]] = []
    dists: List[Tuple[str, Dict[str, Any]]] = []
    for k, v in (run.metrics or {}).items():
        if k in _SHOWN:
            continue
        if isinstance(v, dict) and v and set(v) <= _DIST_KEYS:
            dists.append((k, v))
        elif _is_scalar(v) or isinstance(v, dict):
            other.append((k, _value_html(v)))
    if other:
        tables.append(f"<div><h3>Other</h3>{_kv_table(other)}</div>")
    parts.append(f'<div class="tables">{"".join(tables)}</div>')
    if dists:
        cols = [c for c in ("n", "mean", "min", "p50", "p95", "max")
                if any(c in d for _, d in dists)]
        parts.append("<h3>Distributions</h3>" + _table(
            ["metric"] + cols, ([e(k)] + [e(_fmt(d.get(c))) for c in cols] for k, d in dists), "dist"))
    stages = m.get("stages")
    if isinstance(stages, dict) and stages:
        rows = []
        for name, st in stages.items():
            st = st if isinstance(st, dict) else {}
            errs = st.get("errors") or {}
            rows.append([e(name), e(_fmt(st.get("rows"))), e(_fmt(st.get("seconds"))),
                         e(_fmt(st.get("rows_per_s"))),
                         e(", ".join(f"{k}: {v}" for k, v in errs.items()) if isinstance(errs, dict) else errs)])
        parts.append("<h3>Stages</h3>" + _table(["stage", "rows", "seconds", "rows / s", "errors"], rows))
    extra = []
    if s.get("finish_reasons"):
        extra.append("finish reasons: " + ", ".join(f"{e(k)} {v}" for k, v in sorted(s["finish_reasons"].items())))
    if s.get("dropped_reasons"):
        extra.append("dropped boxes: " + ", ".join(f"{e(k)} {v}" for k, v in sorted(s["dropped_reasons"].items())))
    if extra:
        parts.append('<p class="note">' + "<br>".join(extra) + "</p>")
    return '<section><h2>Metrics</h2>' + "".join(parts) + "</section>"


def _errors_section(run: RunData) -> str:
    counts = dict((run.metrics or {}).get("errors") or run.scan.get("errors") or {})
    for kind in run.error_examples:
        counts.setdefault(kind, len(run.error_examples[kind]))
    if not counts:
        return '<section><h2>Errors</h2><p class="ok">no error rows.</p></section>'
    rows = []
    for kind, n in sorted(counts.items(), key=lambda kv: (-_count(kv[1]), kv[0])):
        examples = "".join(f"<li><span class=\"rowid\">{e(label)}</span> {e(_clip(msg, 500))}</li>"
                           for label, msg in run.error_examples.get(kind, []))
        rows.append([f"<code>{e(kind)}</code>", e(_fmt(n)), f"<ul class=\"ex\">{examples}</ul>" if examples else "–"])
    return "<section><h2>Errors by kind</h2>" + _table(["stage/kind", "rows", "examples"], rows, "errors") + "</section>"


def _count(value: Any) -> float:
    return _num(value) or 0


def _references(rec: CaptionRecord, reg: Region, key: Optional[str] = "references") -> List[str]:
    """A region's reference captions: the row's ``data.references_key`` field (one entry per
    input box, a string or a list of strings) at the region's ``source_index``."""
    from regioncap.metrics import reference_texts

    return reference_texts(rec, reg, key)


def _references_key(run: RunData) -> Optional[str]:
    data = _dig(_config(run), "data")
    if isinstance(data, dict) and "references_key" in data:
        return data["references_key"]
    return "references"


def _mark(exact: Optional[bool]) -> str:
    """A check for a caption that is an exact match of a reference, a cross for one that is not."""
    if exact is None:
        return ""
    if exact:
        return '<span class="mk right" title="exact match of a reference">✓</span> '
    return '<span class="mk wrong" title="not an exact match of any reference">✗</span> '


def _caption_cell(reg: Region, stage: Optional[str]) -> str:
    caption = reg.get("caption")
    if caption:
        exact = _exact(reg)
        cls = "cap bad" if exact is False else "cap"
        html_ = f'{_mark(exact)}<span class="{cls}">{e(_clip(str(caption)))}</span>'
        if reg.get("attempt") == 2:
            html_ += ' <span class="tag">re-asked</span>'
        for flag in reg.get("flags") or []:  # faithfulness flags (regioncap.metrics.region_flags)
            html_ += f' <span class="tag flag">{e(flag)}</span>'
        return html_ + _source_tag(reg)
    if reg.get("missing") or stage == "caption":
        return (f'<span class="missing">missing</span> <span class="why">{e(reg.get("reason") or "")}</span>'
                + _source_tag(reg))
    return '<span class="why">not captioned yet (visualize stage only)</span>' + _source_tag(reg)


def _refs_html(refs: Sequence[str]) -> str:
    return "<br>".join(f'<span class="ref">{e(_clip(r, 500))}</span>' for r in refs) or '<span class="why">–</span>'


def _regions(rec: CaptionRecord) -> List[Region]:
    return [r for r in rec.get("regions") or [] if isinstance(r, dict)]


def _requests(rec: CaptionRecord) -> List[RequestSpec]:
    return [s for s in rec.get("requests") or [] if isinstance(s, dict)]


def _region_table(rec: CaptionRecord, stage: Optional[str], palette: Sequence[str],
                  references_key: Optional[str] = "references") -> str:
    regions = _regions(rec)
    refs = [_references(rec, r, references_key) for r in regions]
    has_refs = any(refs)
    has_scores = any(isinstance(r.get("scores"), dict) for r in regions)
    chunks = len({r.get("chunk") for r in regions}) > 1
    header = ["#", "caption"] + (["reference"] if has_refs else []) + (["scores"] if has_scores else [])
    rows, classes = [], []
    for reg, reg_refs in zip(regions, refs):
        num = _swatch(reg.get("number"), palette, _proposed(reg) is not None)
        if chunks:
            num += f'<span class="why">img {e(_fmt(reg.get("chunk")))}</span>'
        cells = [num, _caption_cell(reg, stage)]
        if has_refs:
            cells.append(_refs_html(reg_refs))
        if has_scores:
            sc = reg.get("scores") if isinstance(reg.get("scores"), dict) else {}
            cells.append(e(", ".join(f"{k} {_fmt(v)}" for k, v in sc.items())))
        rows.append(cells)
        classes.append("wrong" if _exact(reg) is False else "")
    cls = "regions" + (" missing-row" if any(r.get("missing") for r in regions) else "")
    return _table(header, rows, cls, classes)


def _box_overlay(regions: Sequence[Region], size: Any, key: str, label: Any, only_proposed: bool) -> str:
    """An SVG drawn over a thumbnail: each region's box (``key``: ``bbox`` on the original image,
    ``input_bbox`` on the model's), dashed for a proposed region; ``label(region)`` is its text."""
    if not (isinstance(size, list) and len(size) == 2 and all(_num(v) for v in size)):
        return ""
    w, h = float(size[0]), float(size[1])
    font = max(8.0, min(w, h) / 14)
    shapes = []
    for reg in regions:
        box = reg.get(key)
        proposed = _proposed(reg) is not None
        if only_proposed and not proposed:
            continue
        if not (isinstance(box, list) and len(box) == 4 and all(_num(v) is not None for v in box)):
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        cls = "prop" if proposed else "box"
        shapes.append(f'<rect class="{cls}" x="{x1:.1f}" y="{y1:.1f}" width="{max(0.0, x2 - x1):.1f}" '
                      f'height="{max(0.0, y2 - y1):.1f}"/>')
        text = label(reg)
        if text:
            shapes.append(f'<text x="{x1 + 2:.1f}" y="{y1 + font:.1f}" font-size="{font:.1f}">{e(text)}</text>')
    if not shapes:
        return ""
    return (f'<svg class="overlay" viewBox="0 0 {w:g} {h:g}" preserveAspectRatio="none" aria-hidden="true">'
            f'{"".join(shapes)}</svg>')


def _with_overlay(figure: str, overlay: str) -> str:
    """Put ``overlay`` over the ``<img>`` of ``figure`` (a placeholder figure is left alone)."""
    if not overlay or "<img " not in figure:
        return figure
    start = figure.index("<img ")
    end = figure.index(">", start) + 1
    return figure[:start] + f'<div class="ov">{figure[start:end]}{overlay}</div>' + figure[end:]


def _row_meta(rec: CaptionRecord) -> Tuple[str, str]:
    """The row's id, status, image and sizes; and notes on dropped/clipped boxes and its error."""
    meta = [f'<span class="rowid">{e(rec.get("id"))}</span>', _badge(rec.get("status")),
            f'<code class="path">{e(rec.get("image"))}</code>']
    if rec.get("type") == "without_bbox":
        meta.append('<span class="tag prop">no input boxes: regions proposed</span>')
    size = rec.get("image_size")
    if isinstance(size, list) and len(size) == 2:
        meta.append(f'<span class="why">{e(size[0])}×{e(size[1])}</span>')
    tokens = rec.get("tokens")
    if isinstance(tokens, dict):
        meta.append(f'<span class="why">tokens {e(tokens.get("prompt"))} in / {e(tokens.get("output"))} out</span>')
    notes = []
    for key in ("dropped_boxes", "clipped_boxes"):
        items = [d for d in rec.get(key) or [] if isinstance(d, dict)]
        if items:
            notes.append(f"{key.replace('_', ' ')}: " + ", ".join(
                f"#{e(d.get('index'))} {e(d.get('reason'))}" for d in items))
    err = rec.get("error")
    if isinstance(err, dict):
        notes.append(f"error: {e(err.get('kind'))}: {e(_clip(str(err.get('message')), 500))}")
    notes_html = f'<p class="why">{"<br>".join(notes)}</p>' if notes else ""
    return f'<div class="meta">{" ".join(meta)}</div>', notes_html


def _answer_and_prompt(rec: CaptionRecord) -> str:
    out = ""
    if rec.get("answer"):
        out += f"<details><summary>raw answer</summary>{_pre(_clip(str(rec['answer']), 4000))}</details>"
    if rec.get("prompt"):
        out += f"<details><summary>prompt</summary>{_pre(_clip(str(rec['prompt']), 4000))}</details>"
    return out


def _is_crop_row(run: RunData, rec: CaptionRecord) -> bool:
    """A row whose requests are one crop per region (``prompt.strategy=crop``; without a config:
    every request holds one region)."""
    strategy = prompt_strategy(run)
    if strategy is not None:
        from regioncap.strategies import STRATEGIES

        cls = STRATEGIES.get(str(strategy))
        return bool(cls and cls.one_region_per_image)
    requests = _requests(rec)
    return bool(requests) and all(len(s.get("region_ids") or []) == 1 for s in requests) and len(requests) > 1


def _sample_card(run: RunData, rec: CaptionRecord, thumb_px: int) -> str:
    """One row: its marked image(s) beside the region table (marked mode)."""
    requests = _requests(rec)
    regions = _regions(rec)
    images = []
    for spec in requests[:IMAGES_PER_ROW]:
        label = str(spec.get("key", "")) if len(requests) > 1 else ""
        fig = _image_html(run.path, spec.get("image") or rec.get("image_with_bbox"), thumb_px, label)
        if spec.get("image_size") == rec.get("input_size"):  # the whole image: proposed boxes drawn dashed over it
            ids = set(spec.get("region_ids") or [])
            fig = _with_overlay(fig, _box_overlay([r for r in regions if r.get("id") in ids], spec.get("image_size"),
                                                  "input_bbox", lambda r: "", only_proposed=True))
        images.append(fig)
    if len(requests) > IMAGES_PER_ROW:
        images.append(f'<p class="why">+{len(requests) - IMAGES_PER_ROW} more request images</p>')
    meta, notes = _row_meta(rec)
    return (f'<div class="sample"><div class="imgs">{"".join(images)}</div><div class="caps">{meta}{notes}'
            f"{_region_table(rec, run.stage, _palette(run), _references_key(run))}"
            f"{_answer_and_prompt(rec)}</div></div>")


def _crop_card(run: RunData, rec: CaptionRecord, thumb_px: int) -> str:
    """One row in crop mode: the input image with every region's box and id, then a grid of the
    crops, each under its own region id with its caption (marked against its references)."""
    regions = _regions(rec)
    by_region: Dict[Any, RequestSpec] = {}
    for spec in _requests(rec):
        for rid in spec.get("region_ids") or []:
            by_region.setdefault(rid, spec)  # the first request of a region (a re-ask reuses its crop)
    key = _references_key(run)
    original = _original_html(run, rec, thumb_px)
    crops = []
    for reg in regions[:CROPS_PER_ROW]:
        spec = by_region.get(reg.get("id"), {})
        classes = ["crop"] + (["wrong"] if _exact(reg) is False else []) + (["prop"] if _proposed(reg) else [])
        refs = _references(rec, reg, key)
        image = _image_html(run.path, spec.get("image"), max(64, thumb_px // 2))
        crops.append(f'<div class="{" ".join(classes)}">{image}<div class="cc">'
                     f'<span class="num rid">{e(reg.get("id"))}</span> {_caption_cell(reg, run.stage)}'
                     + (f'<div class="crref">ref: {_refs_html(refs)}</div>' if refs else "") + "</div></div>")
    if len(regions) > CROPS_PER_ROW:
        crops.append(f'<p class="why">+{len(regions) - CROPS_PER_ROW} more regions</p>')
    meta, notes = _row_meta(rec)
    return (f'<div class="sample cropmode"><div class="imgs">{original}</div><div class="caps">{meta}{notes}'
            f'<div class="cropgrid">{"".join(crops)}</div>{_answer_and_prompt(rec)}</div></div>')


def _samples_section(run: RunData, thumb_px: int) -> str:
    if not run.samples:
        return '<section><h2>Samples</h2><p class="note">no row with an image to show.</p></section>'
    total = run.scan.get("rows", 0)
    crop = [_is_crop_row(run, rec) for rec in run.samples]
    cards = "".join((_crop_card if c else _sample_card)(run, rec, thumb_px) for rec, c in zip(run.samples, crop))
    what = ("each region's crop as the model saw it, under its region id" if all(crop) else
            "the marked images the model saw (thumbnails) and each region's caption; the number is on its "
            "mark's colour")
    marks = ""
    wrong, exact = run.scan.get("regions_wrong", 0), run.scan.get("regions_exact", 0)
    if wrong or exact:
        marks = (f' <span class="mk right">✓</span> an exact match of a reference, <span class="mk wrong">✗</span> '
                 f"not ({_fmt(wrong)} of {_fmt(wrong + exact)} scored regions in the run).")
    return (f"<section><h2>Samples</h2><p class=\"note\">{len(run.samples)} of {total} rows: {what}.{marks}</p>"
            f"{cards}</section>")


def _problems(run: RunData) -> str:
    if not run.problems:
        return ""
    return '<div class="warn">' + "<br>".join(e(p) for p in run.problems) + "</div>"


def _shards_section(run: RunData) -> str:
    """A merged dir's shards (``manifest.json`` ``shards``, written by ``regioncap.merge``); "" for a run."""
    shards = _dig(run.manifest, "shards")
    if not isinstance(shards, list) or not shards:
        return ""
    rows = [[e(_fmt(s.get("shard_index"))), e(_fmt(s.get("rows"))), e(_fmt(s.get("error_rows"))),
             e(_fmt(s.get("wall_s"))), f'<code>{e(s.get("dir"))}</code>']
            for s in shards if isinstance(s, dict)]
    return (f'<section><h2>Shards</h2><p class="note">this dir merges {len(rows)} shard run(s) '
            f"(<code>python -m regioncap.merge</code>); seconds are each shard's wall time.</p>"
            f'{_table(["shard", "rows", "error rows", "seconds", "run dir"], rows)}</section>')


def render_run(run: RunData, *, thumb_px: int = DEFAULT_THUMB_PX) -> str:
    """The HTML page of one run: header with the results, samples, metrics and errors, provenance."""
    ident = _identity_text(run_identity(run))
    title = f"regioncap: {ident} ({run.path.name})" if ident else f"regioncap report: {run.path.name}"
    body = [_header(run)]
    if run.failure:
        body.append(f'<div class="warn">this run has no records: {e(run.failure)}</div>')
    body.append(_problems(run))
    if run.records_file is not None:
        body.append(_samples_section(run, thumb_px))
    body.append(_shards_section(run))
    if run.records_file is not None or run.metrics:
        body.append(_metrics_section(run))
    if run.records_file is not None:
        body.append(_errors_section(run))
    body.append(_manifest_section(run))
    return _head(title) + "".join(body) + "</body></html>\n"


# ---------------------------------------------------------------- sweeps
def split_override(override: str) -> Tuple[str, str]:
    """``key=value`` (with Hydra's ``+``/``++``/``~`` prefixes kept on the key)."""
    key, sep, value = override.partition("=")
    return (key, value) if sep else (override, "")


def _varying(jobs: Sequence[RunData]) -> Tuple[List[str], Dict[str, str]]:
    """Override keys whose value differs across jobs (in first-seen order), and the common ones."""
    keys: List[str] = []
    values: Dict[str, set] = {}
    for job in jobs:
        for o in job.overrides:
            k, v = split_override(o)
            if k not in values:
                keys.append(k)
                values[k] = set()
            values[k].add(v)
    per_job = [dict(split_override(o) for o in job.overrides) for job in jobs]
    varying = [k for k in keys if len(values[k]) > 1 or any(k not in d for d in per_job)]
    common = {k: next(iter(values[k])) for k in keys if k not in varying}
    return varying, common


def job_label(job: RunData, varying: Sequence[str]) -> str:
    """A job by the values of the swept overrides (``max_boxes=2, prompt=crop``), else its number."""
    d = dict(split_override(o) for o in job.overrides)
    parts = [f"{k}={d[k]}" for k in varying if k in d]
    return ", ".join(parts) if parts else f"job {job.name}"


def _job_status(job: RunData) -> str:
    if job.records_file is None:
        return "failed"
    if job.stage == "visualize":
        return "visualize only"
    rate, limit = _num((job.metrics or {}).get("error_rate")), _num(_dig(job.config, "max_error_rate"))
    if rate is not None and limit is not None and rate > limit:
        return "over max_error_rate"
    if job.metrics is None:
        return "incomplete"
    return "ok"


_COMPARE = ["regions_per_s", "error_rate", "regions_captioned", "parse_success_rate", "output_tokens_per_region",
            "prompt_tokens_per_region", "latency_p50_s"]
#: Metrics where less is better (everything else: more is better).
LOWER_IS_BETTER = {"error_rate", "output_tokens_per_region", "prompt_tokens_per_region", "latency_p50_s"}


def default_metric(jobs: Sequence[RunData]) -> str:
    """Exact match where a job has references, else regions/s."""
    return "exact_match" if any(key_metrics(j).get("exact_match") is not None for j in jobs) else "regions_per_s"


def metric_name(metric: str) -> str:
    """A ``--metric`` as a key of :data:`PLOT_METRICS`; metrics.json paths (``references.exact_match``,
    ``stages.caption.regions_per_s``) are taken too. Raises :class:`ReportError` naming the choices."""
    name = metric.strip()
    for prefix in ("references.", "stages.caption."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if name not in PLOT_METRICS:
        raise ReportError(f"--metric {metric!r} is not a metric the report plots; pick one of: "
                          + ", ".join(PLOT_METRICS))
    return name


def _fmt_metric(key: str, value: Optional[float]) -> str:
    return _fmt(value, "pct" if key in PCT_METRICS else "")


def _region_values(job: RunData, metric: str) -> Optional[Dict[Tuple[Any, ...], List[float]]]:
    """Each row's per-region values of ``metric`` (``regions[].scores``, as the caption stage
    writes exact match and attribute accuracy), keyed by the row's ``(digest, index, id)``
    so two jobs pair up only on the same input rows; ``None`` when no region has one."""
    if job.records_file is None or job.stage != "caption":
        return None
    out: Dict[Tuple[Any, ...], List[float]] = {}
    found = False
    for rec in _iter_records(job.records_file, []):
        values = []
        for reg in rec.get("regions") or []:
            scores = reg.get("scores") if isinstance(reg, dict) else None
            value = _num(scores.get(metric)) if isinstance(scores, dict) else None
            if value is not None:
                values.append(value)
        found = found or bool(values)
        out[(rec.get("digest"), rec.get("index"), rec.get("id"))] = values
    return out if found else None


def paired_comparison(jobs: Sequence[RunData], kms: Sequence[Dict[str, Optional[float]]], metric: str
                      ) -> Dict[str, Any]:
    """The job with the best ``metric`` and, where the jobs carry per-region values of it,
    each other job's paired difference from it (``regioncap.intervals.paired_difference``:
    the same resampled rows for both jobs, 95%, a fixed seed).

    Returns ``{best, separated, diffs}``: ``best`` the index of the best point estimate
    (:func:`_best`), ``diffs`` ``{job index: paired_difference(job, best)}``, and
    ``separated`` True when every other job's difference excludes zero, False when one
    does not (or has no per-region values or no rows in common to compare), None when
    the metric has no per-region values (throughput, error rate: a point estimate only).
    """
    from regioncap.intervals import paired_difference

    best = _best(kms, metric)
    out: Dict[str, Any] = {"best": best, "separated": None, "diffs": {}}
    if best is None:
        return out
    base = _region_values(jobs[best], metric)
    if base is None:
        return out
    separated = True
    for i, (job, km) in enumerate(zip(jobs, kms)):
        if i == best or km.get(metric) is None:
            continue
        values = _region_values(job, metric)
        if values is None:
            separated = False
            continue
        diff = paired_difference(values, base)
        out["diffs"][i] = diff
        separated = separated and diff["n_clusters"] > 0 and not diff["includes_zero"]
    out["separated"] = separated
    return out


def _diff_text(key: str, diff: Dict[str, Any]) -> str:
    """``−4.0 pts [−12.0, 4.0]`` (shares) or ``−0.040 [−0.120, 0.040]``: a paired difference."""
    if diff.get("difference") is None:
        return "no rows in common" if not diff.get("n_clusters") else "no values to compare"
    pct = key in PCT_METRICS
    f = (lambda v: f"{100 * v:+.1f}") if pct else (lambda v: f"{v:+.3f}")  # noqa: E731
    return f"{f(diff['difference'])}{' pts' if pct else ''} [{f(diff['low'])}, {f(diff['high'])}]"


def _best(kms: Sequence[Dict[str, Optional[float]]], key: str) -> Optional[int]:
    """The index of the job with the best value of ``key`` (first on a tie), None when none has one."""
    values = [(km.get(key), i) for i, km in enumerate(kms) if km.get(key) is not None]
    if not values:
        return None
    low = key in LOWER_IS_BETTER
    return min(values, key=lambda vi: ((vi[0] if low else -vi[0]), vi[1]))[1]


def _comparison_table(jobs: Sequence[RunData], varying: Sequence[str], metric: Optional[str] = None,
                      paired: Optional[Dict[str, Any]] = None) -> str:
    """One row per job. The first column (sticky when the table scrolls) names the job by its swept
    overrides; exact match and attribute accuracy lead the metric columns, with their 95% intervals
    where metrics.json has them. The plotted metric's best job is marked only when it is
    distinguishable from every other job (``paired``: :func:`paired_comparison`); the other jobs show
    their paired difference from it, flagged "not distinguishable" when its interval includes zero."""
    kms = [key_metrics(j) for j in jobs]
    if paired is None and metric:
        paired = paired_comparison(jobs, kms, metric)
    paired = paired or {"best": None, "separated": None, "diffs": {}}
    score_names = _score_names(jobs)
    lead = [n for n in SHARE_SCORES if n in score_names]
    columns = lead + _COMPARE + [n for n in score_names if n not in lead]
    header = ["job", "status"] + [PLOT_METRICS.get(k, k) if k != "regions_captioned" else "regions captioned"
                                  for k in columns]
    best = paired["best"]
    rows = []
    for i, (job, km) in enumerate(zip(jobs, kms)):
        d = dict(split_override(o) for o in job.overrides)
        link = ""
        if (job.path / REPORT_FILE).is_file():
            link = f' <a href="{e(job.path.name + "/" + REPORT_FILE)}">report</a>'
        params = "".join(f'<div class="kv"><span class="k">{e(k)}=</span><code>{e(d.get(k, "–"))}</code></div>'
                         for k in varying)
        status_html = _badge(_job_status(job))
        if job.failure:
            status_html += f'<div class="why">{e(_clip(job.failure, 300))}</div>'
        cells = [f"<code>{e(job.name)}</code>{link}{params}", status_html]
        for key in columns:
            value = km.get(key)
            if key == "regions_captioned" and value is not None:
                cell = f"{e(_fmt(value))} / {e(_fmt(km.get('regions')))}"
            else:
                cell = e(_fmt_metric(key, value))
                interval = _dig(job.metrics, "references", "intervals", key)
                if value is not None and isinstance(interval, dict) and _num(interval.get("low")) is not None:
                    cell += (f'<div class="note">[{e(_fmt_metric(key, interval["low"]))}, '
                             f'{e(_fmt_metric(key, interval.get("high")))}]</div>')
            name = e(PLOT_METRICS.get(key, key))
            if key == metric and i == best:
                if paired["separated"] is False:
                    cell = (f'<span title="highest {name}; not distinguishable from at least one other job at 95%">'
                            f'{cell}</span><div class="note">highest, not distinguishable from all others</div>')
                else:
                    cell = f'<b class="best" title="best {name}">{cell}</b>'
            elif key == metric and i in paired["diffs"]:
                diff = paired["diffs"][i]
                verdict = " not distinguishable" if diff["includes_zero"] else ""
                cell += f'<div class="note" title="paired difference from the best job, 95%">vs best ' \
                        f'{e(_diff_text(key, diff))}{verdict}</div>'
            cells.append(cell)
        rows.append(cells)
    return _table(header, rows, "compare")


def _score_names(jobs: Sequence[RunData]) -> List[str]:
    """The reference scores any job has, in :data:`REFERENCE_SCORES` order."""
    have = set()
    for job in jobs:
        have.update(reference_scores(job.metrics or {}))
    return [n for n in REFERENCE_SCORES if n in have]


def _plot_label(text: str) -> str:
    # matplotlib reads $...$ as mathtext; an override value is plain text.
    return text.replace("$", r"\$")


def _save(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No Software/date metadata: the same sweep gives the same bytes.
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    return _png_uri(buf.getvalue())


def _y_axis(ax: Any, key: str) -> None:
    if key in PCT_METRICS:
        from matplotlib.ticker import PercentFormatter

        ax.set_ylim(0, 1.08)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def param_values(jobs: Sequence[RunData], param: str) -> Tuple[List[Optional[str]], List[str], bool]:
    """Each job's value of a swept override, the distinct values in plot order, and whether they are numbers."""
    values = [dict(split_override(o) for o in j.overrides).get(param) for j in jobs]
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    numeric = bool(distinct) and all(_is_number(v) for v in distinct)
    return values, (sorted(distinct, key=float) if numeric else distinct), numeric


def param_figure(jobs: Sequence[RunData], varying: Sequence[str], param: str, metric: str) -> Optional[Any]:
    """``metric`` (and regions/s, its cost) against one swept parameter: bars for categorical values
    (grouped by the other swept overrides), lines for numbers. None when fewer than two values of the
    parameter have the metric."""
    from matplotlib.figure import Figure

    kms = [key_metrics(j) for j in jobs]
    values, order, numeric = param_values(jobs, param)
    others = [k for k in varying if k != param]
    panels = [metric] + (["regions_per_s"] if metric != "regions_per_s" else [])
    have = [k for k in panels if len({v for v, km in zip(values, kms) if v is not None and km.get(k) is not None}) >= 2]
    if metric not in have:  # the cost panel alone would be titled after a metric it does not show
        return None
    width_each = max(3.4, 0.85 * len(order) + 2.2)
    fig = Figure(figsize=(width_each * len(have), 3.3))
    for p, key in enumerate(have):
        ax = fig.add_subplot(1, len(have), p + 1)
        groups: Dict[str, Dict[str, float]] = {}
        for job, km, v in zip(jobs, kms, values):
            if v is None or km.get(key) is None:
                continue
            groups.setdefault(_plot_label(job_label(job, others)) if others else "", {})[v] = float(km[key])  # type: ignore[arg-type]
        if numeric:
            for gname, pts in groups.items():
                xs = sorted(pts, key=float)
                ax.plot([float(x) for x in xs], [pts[x] for x in xs], marker="o", label=gname or None)
        else:
            bar_w = 0.8 / max(1, len(groups))
            # The bars of one value side by side, centred on it (a value some groups lack leaves no gap).
            present = {v: [g for g in groups if v in groups[g]] for v in order}
            for g, (gname, pts) in enumerate(groups.items()):
                xs = [order.index(v) + (present[v].index(gname) - (len(present[v]) - 1) / 2) * bar_w for v in pts]
                ys = list(pts.values())
                bars = ax.bar(xs, ys, bar_w * 0.92, label=gname or None, color=f"C{g % 10}", zorder=3)
                ax.bar_label(bars, labels=[_fmt_metric(key, y) for y in ys], fontsize=7, padding=2)
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels([_plot_label(str(o)) for o in order], rotation=15 if len(order) > 3 else 0, fontsize=8)
            ax.set_xlim(-0.6, len(order) - 0.4)
            if key not in PCT_METRICS:  # room for the value labels above the bars
                ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
        _y_axis(ax, key)
        ax.set_xlabel(_plot_label(param))
        ax.set_title(PLOT_METRICS[key], fontsize=9)
        ax.grid(alpha=0.3, axis="y" if not numeric else "both", zorder=0)
        if others and p == 0 and groups:
            ax.legend(fontsize=6)
    fig.suptitle(f"{PLOT_METRICS[metric]} by {_plot_label(param)}", fontsize=10)
    fig.tight_layout()
    return fig


def _cost_figure(jobs: Sequence[RunData], varying: Sequence[str], metric: str) -> Optional[Any]:
    """``metric`` against regions/s, one point per job; None when the metric is regions/s or no job has both."""
    from matplotlib.figure import Figure

    if metric == "regions_per_s":
        return None
    kms = [key_metrics(j) for j in jobs]
    pts = [(i, km["regions_per_s"], km[metric]) for i, km in enumerate(kms)
           if km.get("regions_per_s") is not None and km.get(metric) is not None]
    if not pts:
        return None
    markers = "osD^vP*X<>"
    fig = Figure(figsize=(7.4, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    for i, x, y in pts:
        # One colour and marker per job; the job number beside the point, the overrides in the legend.
        ax.scatter([x], [y], s=44, zorder=3, color=f"C{i % 10}", marker=markers[i % len(markers)],
                   label=f"{_plot_label(jobs[i].name)}: {_plot_label(job_label(jobs[i], varying))}")
        ax.annotate(_plot_label(jobs[i].name), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("regions / s (higher is cheaper)")
    ax.set_ylabel(PLOT_METRICS[metric])
    _y_axis(ax, metric)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    fig.suptitle(f"{PLOT_METRICS[metric]} vs cost, one point per job", fontsize=10)
    fig.tight_layout()
    return fig


def sweep_plots(jobs: Sequence[RunData], varying: Sequence[str], metric: Optional[str] = None
                ) -> List[Tuple[str, str]]:
    """Plots of one metric (default :func:`default_metric`) against each swept parameter and against
    cost, as ``(title, PNG data URI)``; matplotlib's Agg, no pyplot. A plot that fails is left out."""
    metric = metric_name(metric) if metric else default_metric(jobs)
    plots: List[Tuple[str, str]] = []
    label = PLOT_METRICS[metric]
    for param in list(varying)[:3]:
        try:
            fig = param_figure(jobs, varying, param, metric)
            if fig is not None:
                kind = "line chart" if param_values(jobs, param)[2] else "bar chart"
                plots.append((f"{label} by {param} ({kind})", _save(fig)))
        except Exception as exc:  # a plot is a nicety; never fail the report for it
            log.warning("report: plot of %s by %s failed: %s", metric, param, exc)
    try:
        fig = _cost_figure(jobs, varying, metric)
        if fig is not None:
            plots.append((f"{label} vs cost (scatter)", _save(fig)))
    except Exception as exc:
        log.warning("report: plot of %s vs cost failed: %s", metric, exc)
    return plots


def _is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _side_by_side(jobs: Sequence[RunData], varying: Sequence[str], thumb_px: int) -> str:
    """The same rows' captions from every job, on the first job's image, each marked against its references."""
    jobs = [j for j in jobs if j.records_file is not None]  # a failed job has nothing to compare
    base = next((j for j in jobs if j.samples), None)
    if base is None:
        return ""
    by_job = [{str(r.get("id")): r for r in j.samples} for j in jobs]
    blocks = []
    for rec in base.samples[:SWEEP_ROWS]:
        rid = str(rec.get("id"))
        crop = _is_crop_row(base, rec)
        if crop:
            image = _original_html(base, rec, thumb_px)
        else:
            spec = next(iter(_requests(rec)), {})
            image = _image_html(base.path, spec.get("image"), thumb_px, f"marks as drawn in job {base.name}")
        key = _references_key(base)
        header = ["region"] + [job_label(j, varying) for j in jobs] + ["reference"]
        rows, has_refs = [], False
        for reg in _regions(rec):
            label = (f'<span class="num rid">{e(reg.get("id"))}</span>' if crop else
                     f'{_swatch(reg.get("number"), _palette(base), _proposed(reg) is not None)}'
                     f'<span class="why">id {e(reg.get("id"))}</span>')
            cells = [label]
            for j, lookup in zip(jobs, by_job):
                other = lookup.get(rid)
                match = next((r for r in _regions(other or {}) if r.get("id") == reg.get("id")), None)
                cells.append(_caption_cell(match, j.stage) if match else '<span class="why">–</span>')
            refs = _references(rec, reg, key)
            has_refs = has_refs or bool(refs)
            cells.append(_refs_html(refs))
            rows.append(cells)
        if not has_refs:
            header = header[:-1]
            rows = [r[:-1] for r in rows]
        layout = "wide" if len(jobs) <= 2 else "stack"  # many jobs: the table gets the page's width
        blocks.append(f'<div class="sample {layout}"><div class="imgs">{image}</div><div class="caps">'
                      f'<div class="meta"><span class="rowid">{e(rid)}</span> <code class="path">'
                      f'{e(rec.get("image"))}</code></div><div class="scroll">{_table(header, rows, "regions side")}'
                      "</div></div></div>")
    return ("<section><h2>Captions side by side</h2><p class=\"note\">the same rows in every job; regions by id "
            "(the row's kept boxes in input order; mark numbers restart on each chunk image); "
            '<span class="mk right">✓</span> an exact match of a reference, <span class="mk wrong">✗</span> not.</p>'
            + "".join(blocks) + "</section>")


def render_sweep(sweep_dir: Path, jobs: Sequence[RunData], *, thumb_px: int = DEFAULT_THUMB_PX,
                 metric: Optional[str] = None) -> str:
    """The HTML page of a multirun: comparison, plots, side-by-side captions, per-job details."""
    problems: List[str] = []
    multirun = _read_yaml(sweep_dir / "multirun.yaml", problems)
    task = _dig(multirun, "hydra", "overrides", "task")
    varying, common = _varying(jobs)
    metric = metric_name(metric) if metric else default_metric(jobs)
    idents = [run_identity(j) for j in jobs if j.config or j.manifest]
    same = {k: idents[0][k] for k in ("model", "prompt", "data", "engine")
            if idents and idents[0].get(k) and all(i.get(k) == idents[0][k] for i in idents)}
    swept = ", ".join(varying)
    title = f"regioncap sweep: {swept or sweep_dir.name}" + (f" · {_identity_text(same)}" if same else "")
    names = "".join(f'<span class="id"><span class="k">{k}</span> <b>{e(v)}</b></span>' for k, v in same.items())
    body = [f'<header class="top"><div class="kicker">regioncap sweep report · <b>{e(sweep_dir.name)}</b></div>'
            f'<h1><span class="id"><span class="k">swept</span> <b>{e(swept or "–")}</b></span>{names}</h1>'
            f'<p class="path"><code>{e(sweep_dir)}</code></p>']
    kms = [key_metrics(j) for j in jobs]
    cards = [_card(str(len(jobs)), "jobs"), _card(str(sum(1 for j in jobs if j.records_file is None)), "failed")]
    paired = paired_comparison(jobs, kms, metric)
    best = paired["best"]
    if best is not None and paired["separated"] is False:
        cards.insert(0, _card(_fmt_metric(metric, kms[best][metric]),
                              f"no job is better than the others at 95% ({PLOT_METRICS[metric]}; highest: job "
                              f"{jobs[best].name}, {job_label(jobs[best], varying)})", "big"))
    elif best is not None:
        cards.insert(0, _card(_fmt_metric(metric, kms[best][metric]),
                              f"best {PLOT_METRICS[metric]}: job {jobs[best].name} ({job_label(jobs[best], varying)})",
                              "big"))
    body.append(f'<div class="cards">{"".join(cards)}</div></header>')
    if problems:
        body.append('<div class="warn">' + "<br>".join(e(p) for p in problems) + "</div>")
    info = []
    if isinstance(task, list):
        info.append(("sweep overrides", "<code>" + e(" ".join(str(t) for t in task)) + "</code>"))
    if common:
        info.append(("common overrides", "<code>" + e(" ".join(f"{k}={v}" for k, v in common.items())) + "</code>"))
    body.append('<section><h2>Jobs</h2>' + (_kv_table(info) if info else "")
                + '<div class="scroll">' + _comparison_table(jobs, varying, metric, paired) + "</div></section>")
    plots = sweep_plots(jobs, varying, metric)
    if plots:
        figs = "".join(f'<figure class="plot"><img src="{uri}" alt="{e(t)}"><figcaption>{e(t)}</figcaption></figure>'
                       for t, uri in plots)
        body.append(f'<section><h2>{e(PLOT_METRICS[metric])} across the sweep</h2><p class="note">the metric is '
                    f'<code>--metric {e(metric)}</code> of <code>python -m regioncap.report</code>.</p>{figs}</section>')
    body.append(_side_by_side(jobs, varying, thumb_px))
    details = []
    for job in jobs:
        inner = [_problems(job)]
        if job.failure:
            inner.append(f'<div class="warn">failed: {e(job.failure)}</div>')
        if job.overrides:
            inner.append(_pre("\n".join(job.overrides)))
        if job.records_file is not None or job.metrics:
            inner.append(_metrics_section(job))
        if job.records_file is not None:
            inner.append(_errors_section(job))
        if job.manifest:
            inner.append(f"<details><summary>manifest</summary>{_pre(_yaml_text(job.manifest))}</details>")
        elif job.config is not None:
            inner.append(f"<details><summary>config</summary>{_pre(_yaml_text(job.config))}</details>")
        details.append(f'<details class="job"><summary>job {e(job.name)}: {e(job_label(job, varying))} '
                       f'{_badge(_job_status(job))}</summary>{"".join(inner)}</details>')
    body.append("<section><h2>Each job</h2>" + "".join(details) + "</section>")
    return _head(title) + "".join(body) + "</body></html>\n"


# ---------------------------------------------------------------- entry points
def write_report(run_dir: Path, out: Optional[Path] = None, *, max_rows: int = DEFAULT_ROWS,
                 thumb_px: int = DEFAULT_THUMB_PX, metric: Optional[str] = None) -> Path:
    """Write the HTML report of a run dir or a multirun dir; return its path (default ``run_dir/report.html``).

    ``metric``: what a sweep's plots show (a :data:`PLOT_METRICS` name or a metrics.json path such
    as ``references.exact_match``; default exact match where the jobs have references, else regions/s).

    Raises :class:`ReportError` when ``run_dir`` is neither, or ``metric`` is not a metric the report
    plots; a failed or partial run is reported, not raised.
    """
    if metric is not None:
        metric = metric_name(metric)  # a bad name fails before anything is read
    owned = run_file_at(Path(out), allow=(REPORT_FILE,)) if out is not None else None
    if owned is not None:
        raise ReportError(f"--out {out} would write over {owned}, which a run wrote; give the report a path of its own")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory; give a run dir (with {CAPTIONS_FILE}) or a multirun dir")
    if is_multirun_dir(run_dir):
        jobs = [load_run(d, max_rows=SWEEP_ROWS, prefer_partial=False) for d in job_dirs(run_dir)]
        page = render_sweep(run_dir, jobs, thumb_px=thumb_px, metric=metric)
    else:
        run = load_run(run_dir, max_rows=max_rows)
        if run.records_file is None and run.metrics is None and not (run_dir / ".hydra").is_dir():
            raise ReportError(
                f"{run_dir} is neither a run dir (no {CAPTIONS_FILE}, {VISUALIZE_FILE}, {METRICS_FILE} or .hydra/) "
                "nor a multirun dir (no multirun.yaml, no job subdirs)")
        page = render_run(run, thumb_px=thumb_px)
    out = Path(out) if out is not None else run_dir / REPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # a reader never sees half a report
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m regioncap.report PATH [--out FILE]``."""
    parser = argparse.ArgumentParser(
        prog="python -m regioncap.report",
        description="Write a self-contained HTML report of a regioncap run dir or multirun (sweep) dir.")
    parser.add_argument("path", type=Path, help="a run dir (captions.jsonl, metrics.json) or a multirun dir")
    parser.add_argument("--out", type=Path, default=None, help="output file (default: PATH/report.html)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="sample rows shown (default %(default)s)")
    parser.add_argument("--thumb", type=int, default=DEFAULT_THUMB_PX,
                        help="longest side of embedded thumbnails in px (default %(default)s)")
    parser.add_argument("--metric", default=None,
                        help="the metric a sweep's plots show: " + ", ".join(PLOT_METRICS)
                        + " (metrics.json paths such as references.exact_match work too; default exact_match "
                        "where the jobs have references, else regions_per_s)")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.path, args.out, max_rows=max(0, args.rows), thumb_px=max(16, args.thumb),
                           metric=args.metric)
    except (ReportError, OSError) as exc:
        print(f"regioncap.report: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


CSS = """
:root{--fg:#1d1f23;--mute:#6b7280;--line:#e3e5e8;--bg:#fff;--soft:#f6f7f9;--accent:#4363d8;--bad:#b42318;--warn:#b54708}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);background:var(--bg);
max-width:1280px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:22px;margin:0 0 2px}h2{font-size:17px;margin:28px 0 10px;display:inline-block}h3{font-size:13px;margin:10px 0 6px;color:var(--mute);
text-transform:uppercase;letter-spacing:.04em}
header{border-bottom:1px solid var(--line);padding-bottom:10px;margin-bottom:14px}
code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,"DejaVu Sans Mono",monospace}
pre{background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:10px;overflow:auto;max-height:480px;white-space:pre-wrap;word-break:break-word}
.path{color:var(--mute);margin:0;word-break:break-all}
section{margin-top:8px}
details>summary{cursor:pointer}
details.section>summary{list-style-position:outside}
details.section>summary h2{margin-top:20px}
details details{margin:6px 0}
table{border-collapse:collapse;margin:4px 0 10px;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:var(--soft);font-weight:600;white-space:nowrap}
table.kv th{font-weight:500;color:var(--mute);white-space:nowrap}
table.kv td{font-variant-numeric:tabular-nums;word-break:break-word}
table.compare td{font-variant-numeric:tabular-nums}
.tables{display:flex;flex-wrap:wrap;gap:8px 28px}
.manifest table.kv td{max-width:420px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0 4px}
.card{border:1px solid var(--line);border-radius:8px;padding:8px 14px;min-width:110px;background:var(--soft)}
.card .v{font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}.card .k{font-size:12px;color:var(--mute)}
.note,.why{color:var(--mute);font-size:12px}
.why{margin-left:4px}
.ok{color:#067647}
.warn{background:#fffaeb;border:1px solid #fedf89;color:var(--warn);border-radius:6px;padding:8px 12px;margin:8px 0;word-break:break-word}
.sample{display:grid;grid-template-columns:minmax(0,320px) minmax(0,1fr);gap:16px;border-top:1px solid var(--line);padding:14px 0}
.imgs{display:flex;flex-direction:column;gap:8px}
figure{margin:0}
figure img{max-width:100%;height:auto;display:block;border-radius:4px;border:1px solid var(--line)}
.imgs figure img{width:100%}
figcaption{font-size:11px;color:var(--mute)}
.noimg{border:1px dashed var(--line);border-radius:4px;padding:24px 10px;text-align:center;color:var(--mute);font-size:12px;word-break:break-all}
.meta{display:flex;flex-wrap:wrap;gap:6px;align-items:center;margin-bottom:4px}
.rowid{font-weight:600}
.path,code.path{word-break:break-all}
table.regions{width:100%}
table.regions td:first-child{width:1%;white-space:nowrap}
.num{display:inline-block;min-width:22px;padding:1px 6px;border-radius:4px;background:#888;color:#fff;font-weight:700;text-align:center;
text-shadow:0 0 2px #000,0 0 1px #000}
.cap{white-space:pre-wrap;word-break:break-word}
.missing{display:inline-block;background:#fef3f2;color:var(--bad);border:1px solid #fecdca;border-radius:4px;padding:0 6px;font-weight:600;font-size:12px}
.ref{color:#344054;font-style:italic;white-space:pre-wrap}
.tag{font-size:11px;background:#eef4ff;color:#3538cd;border-radius:4px;padding:0 5px}
.tag.flag{background:#fff4e5;color:#b54708}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;font-weight:600;background:#f2f4f7;color:#344054}
.s-ok{background:#ecfdf3;color:#067647}.s-partial,.s-over_max_error_rate,.s-incomplete{background:#fffaeb;color:var(--warn)}
.s-error,.s-failed{background:#fef3f2;color:var(--bad)}
ul.ex{margin:0;padding-left:16px}ul.ex li{word-break:break-word}
table.errors td:last-child{max-width:760px}
figure.plot{margin:8px 0 18px}figure.plot img{max-width:100%;border:none}
details.job{border-top:1px solid var(--line);padding:6px 0}
details.job>summary{font-weight:500}
a{color:var(--accent)}
.scroll{overflow-x:auto;max-width:100%}
.sample.wide{grid-template-columns:minmax(0,260px) minmax(0,1fr)}
.sample.stack{grid-template-columns:1fr}.sample.stack .imgs{max-width:320px}
table.side td{min-width:120px}
table.compare{font-size:12.5px}table.compare th,table.compare td{padding:4px 6px}
table.compare thead th{white-space:normal;min-width:58px;max-width:110px;vertical-align:bottom}
table.compare td:first-child,table.compare th:first-child{position:sticky;left:0;z-index:1;background:var(--bg);
box-shadow:inset -1px 0 0 var(--line);min-width:150px;max-width:300px;word-break:break-word}
table.compare thead th:first-child{background:var(--soft)}
table.compare .kv{font-size:12px;margin-top:2px}table.compare .kv .k{color:var(--mute)}
table.compare .why{display:block;margin:2px 0 0;min-width:120px;max-width:220px}
b.best{color:#067647}
header.top{border-bottom:1px solid var(--line);padding-bottom:12px;margin-bottom:10px}
.kicker{color:var(--mute);font-size:12px;margin-bottom:2px}
h1 .id{display:inline-block;margin-right:18px;font-weight:400}h1 .id .k{color:var(--mute);font-size:13px;font-weight:500;
text-transform:uppercase;letter-spacing:.04em}h1 .id b{font-weight:650}
.card.big{background:#fff;border-color:#c7d7fe;min-width:170px}.card.big .v{font-size:28px;color:#1f2a6b}
.mk{display:inline-block;width:18px;height:18px;line-height:18px;border-radius:9px;text-align:center;font-weight:700;font-size:12px}
.mk.right{background:#ecfdf3;color:#067647}.mk.wrong{background:var(--bad);color:#fff}
tr.wrong td{background:#fef3f2}tr.wrong td:first-child{box-shadow:inset 3px 0 0 var(--bad)}
.cap.bad{color:var(--bad);font-weight:600}
.num.prop{outline:2px dashed #444;outline-offset:1px}
.tag.prop{background:#f4f3ff;color:#5925dc;border:1px dashed #9e77ed}
.ov{position:relative;line-height:0}.ov img{width:100%}
svg.overlay{position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none}
svg.overlay rect{fill:none;stroke-width:2;vector-effect:non-scaling-stroke}
svg.overlay rect.box{stroke:#ffd400}svg.overlay rect.prop{stroke:#fff;stroke-dasharray:5 3}
svg.overlay text{fill:#ffd400;font-weight:700;paint-order:stroke;stroke:#000;stroke-width:2px;font-family:sans-serif}
.sample.cropmode{grid-template-columns:minmax(0,240px) minmax(0,1fr)}
.cropgrid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px;margin:6px 0}
.crop{border:1px solid var(--line);border-radius:6px;padding:6px;background:var(--soft)}
.crop figure img{width:100%;height:128px;object-fit:contain;background:#fff}
.crop.wrong{border-color:var(--bad);box-shadow:inset 0 0 0 1px var(--bad);background:#fef3f2}
.crop.prop{border-style:dashed;border-color:#5925dc}
.crop .cc{margin-top:5px;font-size:13px;line-height:1.35}
.crop .crref{font-size:12px;color:var(--mute);margin-top:2px}
.num.rid{background:#344054}
@media (max-width:800px){.sample{grid-template-columns:1fr}}
"""


if __name__ == "__main__":
    sys.exit(main())
