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
import io
import json
import logging
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from regioncap import metricspec
from regioncap.components import node_name
from regioncap.config import DEFAULT_PALETTE
from regioncap.intervals import DEFAULT_RESAMPLES
from regioncap.record_types import Record, RecordError, Region, RequestSpec
from regioncap.rundir import CAPTIONS_FILE, MANIFEST_FILE, METRICS_FILE, REPORT_FILE, VISUALIZE_FILE, run_file_at
from regioncap.stages import STAGES, CaptionStage, VisualizeStage

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


#: Metrics a sweep's plots can use (``--metric``): metrics.json paths and their labels, from the
#: metric specification (every name, unit and direction below comes from regioncap.metricspec).
PLOT_METRICS = {m.path: m.label for m in metricspec.flagged("plot")}
#: Crops shown per row in crop mode.
CROPS_PER_ROW = 24



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
    #: True when the run dir had no metrics.json and ``metrics`` was computed from its records.
    metrics_computed: bool = False
    #: What the samples show beside metrics.json: exact/wrong marks, finish reasons.
    scan: Dict[str, Any] = field(default_factory=dict)
    error_examples: Dict[str, List[Tuple[str, str]]] = field(default_factory=dict)
    samples: List[Record] = field(default_factory=list)
    #: Why the run has no records (a failed job): the last error line of its log.
    failure: Optional[str] = None
    problems: List[str] = field(default_factory=list)

    @property
    def stage(self) -> Optional[str]:
        if self.records_file is None:
            return None
        return next((s.name for s in STAGES if s.records_file == self.records_file.name), None)


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
    if run.metrics is None:
        run.metrics = _computed_metrics(run)
        run.metrics_computed = run.metrics is not None
    return run


def _computed_metrics(run: RunData) -> Optional[Dict[str, Any]]:
    """metrics.json of a run dir that has none (a killed or older run), computed from its records by
    the code that writes it (regioncap.metrics.compute_metrics); no stage timings, no METEOR."""
    from regioncap.families.base import visual_tokens_counter
    from regioncap.metrics import compute_metrics

    if run.records_file is None:
        return None
    cfg = _config(run)
    model = _dig(cfg, "model") or {}
    metrics_cfg = _dig(cfg, "metrics") or {}
    seed = _dig(cfg, "seed")
    try:
        return compute_metrics(
            _iter_records(run.records_file, []), {}, references_key=_references_key(run),
            patch_size=int(model.get("patch_size", 14)), merge_size=int(model.get("merge_size", 2)),
            bootstrap_resamples=int(metrics_cfg.get("bootstrap_resamples", DEFAULT_RESAMPLES)),
            seed=int(seed) if isinstance(seed, int) else 0, visual=visual_tokens_counter(model))
    except Exception as exc:  # noqa: BLE001 - a report shows what it can
        run.problems.append(f"metrics could not be computed from {run.records_file.name}: {exc}")
        return None


def _row_label(rec: Record) -> str:
    label = str(rec.id if rec.has("id") else rec.index if rec.has("index") else "?")
    if rec.line is not None:
        label += f" (line {rec.line})"
    return label


def _scan(run: RunData, *, max_rows: int, prefer_partial: bool) -> None:
    """Pick the sample rows and the error examples in one pass over the records, and count what
    the samples show (exact/wrong marks, finish reasons); the run's figures are metrics.json's."""
    counts: Counter = Counter()
    finish: Counter = Counter()
    first: List[Record] = []
    partial: List[Record] = []
    partial_quota = max_rows // 4 if prefer_partial else 0
    assert run.records_file is not None
    for rec in map(Record.from_dict, _iter_records(run.records_file, run.problems)):
        status = rec.status
        regions = _regions(rec)
        requests = _requests(rec)
        counts["rows"] += 1
        exact = [_exact(r) for r in regions]
        counts["regions_exact"] += sum(1 for x in exact if x is True)
        counts["regions_wrong"] += sum(1 for x in exact if x is False)
        for spec in requests:
            if spec.finish_reason:
                finish[str(spec.finish_reason)] += 1
        err = rec.error
        if isinstance(err, RecordError):
            kind = f"{err.stage if err.has('stage') else '?'}/{err.kind if err.has('kind') else '?'}"
            examples = run.error_examples.setdefault(kind, [])
            if len(examples) < EXAMPLES_PER_ERROR:
                examples.append((_row_label(rec), str(err.message if err.has("message") else "")))
        if requests and status != "error":
            if len(first) < max_rows:
                first.append(rec)
            elif (status == "partial" or False in exact) and len(partial) < partial_quota:
                partial.append(rec)
    if partial:  # rows with missing regions or wrong captions are the ones worth a look: swap a few in
        run.samples = sorted(first[: max_rows - len(partial)] + partial, key=lambda r: r.index if r.has("index") else 0)
    else:
        run.samples = first
    run.scan = {"rows": counts["rows"], "regions_exact": counts["regions_exact"],
                "regions_wrong": counts["regions_wrong"], "finish_reasons": dict(finish)}


def _exact(reg: Region) -> Optional[bool]:
    """Whether a region's caption is an exact match of one of its references (``scores.exact_match``,
    written by the caption stage for a captioned region with references); None when not scored."""
    scores = reg.scores
    value = _num(scores.get("exact_match")) if isinstance(scores, dict) else None
    return None if value is None else value >= 1.0


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


#: The figures a report's header and a sweep's table and plots read (metricspec's flags).
_KEY_METRICS = tuple(dict.fromkeys(
    ["rows", "regions", "regions_captioned"]
    + [m.path for m in metricspec.SPEC if (m.compare or m.plot or m.headline) and m.kind == "value"]))


def key_metrics(run: RunData) -> Dict[str, Optional[float]]:
    """The figures a sweep compares, by metrics.json path (``references.exact_match``...): the
    run's metrics.json, or the same computed from its records when it has none."""
    m = run.metrics or {}
    return {path: metricspec.number_at(m, path) for path in _KEY_METRICS}


def reference_scores(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The reference scores of metrics.json (``references``: exact match, attribute accuracy,
    CIDEr-D, ...) that have a value, by name, in the metric specification's order."""
    refs = metrics.get("references")
    if not isinstance(refs, dict):
        return {}
    out = {}
    for spec in _reference_specs():
        value = _num(refs.get(spec.key))
        if value is not None:
            out[spec.key] = float(value)
    return out


def _reference_specs() -> List["metricspec.Metric"]:
    """The scores of metrics.json's ``references`` (shares and caption scores), in order."""
    return [m for m in metricspec.in_group("references") if m.kind == "value" and m.unit in ("share", "score")]


def _is_share(path: str) -> bool:
    spec = metricspec.get(path)
    return spec is not None and spec.is_share


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


# ---------------------------------------------------------------- templates
#: The page's templates (``regioncap/templates/report/``): a base layout, macros, one page per kind.
TEMPLATE_DIR = "templates/report"


def _one_line(source: str) -> str:
    """A template's markup as one line: a line break and the indentation after it are layout of the
    template file, not of the page (a space the page needs is written on its line)."""
    return re.sub(r"\n[ \t]*", "", source)


def _environment() -> Any:
    """The Jinja2 environment of the report's templates (built once), with autoescape on for every
    template: whatever a value holds (captions are model output, ids and paths are user input) is
    escaped where it is printed, and no value is ever marked safe."""
    global _ENV
    if _ENV is None:
        import jinja2
        import jinja2.ext

        class OneLine(jinja2.ext.Extension):
            def preprocess(self, source: str, name: Optional[str], filename: Optional[str] = None) -> str:
                return _one_line(source) if name and name.endswith(".html.j2") else source

        env = jinja2.Environment(loader=jinja2.PackageLoader("regioncap", TEMPLATE_DIR), autoescape=True,
                                 undefined=jinja2.StrictUndefined, extensions=[OneLine],
                                 keep_trailing_newline=True)
        env.globals["METRICS_FILE"] = METRICS_FILE
        _ENV = env
    return _ENV


_ENV: Any = None


def _render(template: str, **context: Any) -> str:
    return _environment().get_template(template).render(**context)


# ---------------------------------------------------------------- data for the templates
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



def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> Dict[str, Any]:
    """A table of plain values (the template escapes them): ``header``, ``rows``, css ``cls``."""
    return {"header": list(header), "rows": [list(r) for r in rows], "cls": cls}


def _kv(key: str, value: Any, code: bool = False) -> Dict[str, Any]:
    """A row of a key/value table; ``code`` shows the value as code."""
    return {"k": key, "v": value, "code": code}


def _yaml_text(obj: Any) -> str:
    import yaml

    try:
        return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    except yaml.YAMLError:
        from regioncap.records import dumps

        return dumps(obj, indent=2)


def _badge(status: Any) -> Dict[str, str]:
    """A status as a badge: its text and the css class of its colour (``s-ok``, ``s-failed``, ...)."""
    status = str(status)
    # "over max_error_rate" -> s-over_max_error_rate, the class the CSS colours.
    return {"text": status, "cls": "s-" + re.sub(r"[^a-z_]", "", status.lower().replace(" ", "_"))}


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


def _figure(uri: Optional[str], name: Any, caption: str = "") -> Dict[str, Any]:
    """A figure for the templates: the image's data URI (None: a placeholder that names it), its
    name (alt text), a caption, and an overlay (:func:`_box_overlay`) added by :func:`_with_overlay`."""
    return {"uri": uri, "name": str(name), "caption": caption, "overlay": None}


def _image_html(run_dir: Path, image: Any, thumb_px: int, caption: str = "") -> Dict[str, Any]:
    """An embedded thumbnail of a request image, or a placeholder that names it (a :func:`_figure`)."""
    uri = None
    if isinstance(image, str) and image:
        path = Path(image)
        uri = thumbnail_uri(path if path.is_absolute() else run_dir / path, thumb_px)
    return _figure(uri, image, caption)


def _original_html(run: RunData, rec: Record, thumb_px: int) -> Dict[str, Any]:
    """The row's input image (``image_path``) as a thumbnail with every region's box and id drawn over
    it. Decoded by ``regioncap.images.load_image`` (the run's own size limits, EXIF orientation applied,
    the frame the boxes refer to), as every input image is; a placeholder when it cannot be read."""
    from PIL import Image

    from regioncap.images import ImageLoadError, load_image

    caption = "input image, boxes by region id"
    path = rec.image_path
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
    overlay = _box_overlay(_regions(rec), rec.image_size, "bbox", lambda r: str(r.id) if r.has("id") else "",
                           only_proposed=False)
    return _with_overlay(_figure(uri, path, caption), overlay)


def _palette(run: RunData) -> List[str]:
    palette = _dig(run.config, "draw", "palette")
    if isinstance(palette, list) and palette:
        return [str(c) for c in palette]
    # The run's config cannot be read: the default palette.
    return list(DEFAULT_PALETTE)


_COLOUR = re.compile(r"^(#[0-9a-fA-F]{3,8}|[a-zA-Z]{3,20})$")


def _swatch(number: Any, palette: Sequence[str], proposed: bool = False) -> Dict[str, Any]:
    """The region's number on the colour of its mark (colour ``palette[(number - 1) % len]``);
    a proposed region's number has a dashed outline."""
    colour = ""
    if isinstance(number, int) and number >= 1:
        c = palette[(number - 1) % len(palette)]
        colour = c if _COLOUR.match(c) else ""  # a colour string goes into CSS: only plain forms
    return {"number": number, "colour": colour, "proposed": proposed}


def _proposed(reg: Region) -> Optional[str]:
    """A proposed region's source (``contours``, ``vlm``, ...); None for an input box or when unsaid."""
    source = reg.source
    return str(source) if source not in (None, "", "input") else None


def _source_tag(reg: Region) -> Optional[str]:
    """The tag beside a proposed region's caption (``proposed (contours) 0.875: "label"``); None for an input box."""
    source = _proposed(reg)
    if source is None:
        return None
    score = _num(reg.score)
    extra = f" {_fmt(score)}" if score is not None else ""
    label = reg.label
    # The grounding model's own name for the object, beside the caption.
    extra += f': "{label}"' if isinstance(label, str) and label else ""
    return f"proposed ({source}){extra}"


# ---------------------------------------------------------------- sections
def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _small_flat(value: Any) -> bool:
    return isinstance(value, dict) and 0 < len(value) <= 10 and all(_is_scalar(v) for v in value.values())


def _manifest_summary(man: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Scalars and lists of scalars (``command``) under "run", each small flat dict (``git``,
    ``model``) as its own small table; empty values left out. Side by side, to keep it short."""
    groups: Dict[str, List[Dict[str, Any]]] = {"run": []}
    for key, value in man.items():
        if value is None or value == "":
            continue
        if _is_scalar(value):
            groups["run"].append(_kv(key, _fmt(value)))
        elif isinstance(value, list) and all(_is_scalar(v) for v in value):
            groups["run"].append(_kv(key, " ".join(str(v) for v in value), code=True))
        elif _small_flat(value):
            groups[key] = [_kv(k, _fmt(v)) for k, v in value.items() if v is not None and v != ""]
    return [{"title": name, "rows": rows} for name, rows in groups.items() if rows]


def _manifest_section(run: RunData) -> Dict[str, Any]:
    """Provenance: the manifest (its small parts as tables, the rest as YAML), else Hydra's files."""
    man = run.manifest
    if man:
        details = []
        for key, value in man.items():
            if _small_flat(value):
                continue
            if isinstance(value, (dict, list)) and not (
                    isinstance(value, list) and all(_is_scalar(v) for v in value)):
                details.append({"title": key, "open": key in ("hydra", "choices", "overrides"),
                                "text": _yaml_text(value)})
        return {"manifest": True, "tables": _manifest_summary(man), "details": details}
    details = []
    if run.overrides:
        details.append({"title": "overrides", "open": True, "text": "\n".join(run.overrides)})
    if run.config is not None:
        details.append({"title": "config (.hydra/config.yaml)", "open": False, "text": _yaml_text(run.config)})
    return {"manifest": False, "choices": [_kv(k, v) for k, v in (run.choices or {}).items()], "details": details}


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
    names, the engine's from the class its ``_target_`` names; else Hydra's group choices), and ``data_path``."""
    cfg, choices = _config(run), _choices(run)

    def name(group: str) -> Optional[str]:
        return _text(_dig(cfg, group, "name")) or _text(choices.get(group))

    prompt = name("prompt")
    strategy = prompt_strategy(run)
    if strategy and prompt and strategy != prompt:
        prompt = f"{prompt} ({strategy})"
    return {"model": name("model"), "prompt": prompt or strategy, "data": name("data"),
            "engine": _text(node_name(_dig(cfg, "engine"))) or _text(choices.get("engine"))
            or _text(_dig(run.manifest, "engine", "name")),
            "data_path": _text(_dig(cfg, "data", "path")) or _text(_dig(run.manifest, "data", "path"))}


def prompt_strategy(run: RunData) -> Optional[str]:
    """``marked``, ``crop``, ``coords``... (the strategy class the run's ``prompt`` names), None when unknown."""
    from regioncap.strategies import recorded_name

    return _text(recorded_name(_dig(_config(run), "prompt")))


def _identity_text(ident: Dict[str, Optional[str]]) -> str:
    return " · ".join(f"{k} {ident[k]}" for k in ("model", "prompt", "data", "engine") if ident.get(k))


def _identity_names(ident: Dict[str, Optional[str]]) -> List[Tuple[str, str]]:
    """``(group, name)`` of the groups the run names, in header order."""
    return [(k, str(ident[k])) for k in ("model", "prompt", "data", "engine") if ident.get(k)]


def _card(value: str, label: str, cls: str = "") -> Dict[str, str]:
    return {"value": value, "label": label, "cls": cls}


def _proposals_line(metrics: Dict[str, Any]) -> Optional[str]:
    """One line on the proposal stage (``proposals`` of metrics.json); None when nothing was proposed."""
    prop = _dig(metrics, "proposals")
    if not (isinstance(prop, dict) and prop.get("images")):
        return None
    q = prop.get("quality") or {}
    text = (f"proposals ({', '.join(sorted(prop.get('by_method') or {}))}): {_fmt(prop.get('regions'))} "
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
    return text


def _header(run: RunData) -> Dict[str, Any]:
    """What the run is and how it did: model, prompt, data, engine, then the headline numbers."""
    ident = run_identity(run)
    sub = [{"text": "", "code": str(run.path)}]
    if ident.get("data_path"):
        sub.append({"text": "data ", "code": ident["data_path"]})
    started = _text(_dig(run.manifest, "started"))
    if started:
        sub.append({"text": f"started {started}", "code": None})
    status = _text(_dig(run.manifest, "status"))
    head: Dict[str, Any] = {
        "name": run.name, "badge": _badge(status) if status else None, "names": _identity_names(ident),
        "sub": sub, "proposals": _proposals_line(run.metrics or {}), "cards": [],
        "random_weights": _dig(run.metrics or {}, "model_weights") == "random"
        or _dig(run.manifest or {}, "config", "model", "weights") == "random"}
    if run.records_file is None:
        return head
    km = key_metrics(run)
    big: List[Tuple[str, str]] = []
    prop_refs = _dig(run.metrics or {}, "proposals", "quality", "references") or {}
    if km.get("references.exact_match") is not None:
        for path in ("references.exact_match", "references.attribute_accuracy"):
            if km.get(path) is not None:
                big.append((_with_interval(run, path), metricspec.BY_PATH[path].label))
    elif isinstance(prop_refs, dict) and prop_refs.get("caption_exact_match") is not None:
        # Proposed regions only (propose.when=always): scored through the truth box each matched.
        big.append((_fmt(prop_refs["caption_exact_match"], "pct"), "exact match (proposals vs truth)"))
        big.append((_fmt(_dig(run.metrics or {}, "proposals", "quality", "recall"), "pct"), "proposal recall"))
    else:
        big += [(_fmt_metric("parse_success_rate", km["parse_success_rate"]), "parse success"),
                (_fmt_metric("regions_per_s", km["regions_per_s"]), "regions / s")]
    small = []
    wrong, exact = run.scan.get("regions_wrong"), run.scan.get("regions_exact")
    if wrong or exact:
        small.append((f"{_fmt(wrong)} / {_fmt((wrong or 0) + (exact or 0))}", "captions not an exact match"))
    small.append((f"{_fmt(km['regions_captioned'])} / {_fmt(km['regions'])}", "regions captioned"))
    if km.get("references.exact_match") is not None:
        small += [(_fmt(km["regions_per_s"]), "regions / s"),
                  (_fmt_metric("parse_success_rate", km["parse_success_rate"]), "parse success")]
    small += [(f"{_fmt(km['rows'])}", "rows"), (_fmt(km["error_rate"], "pct"), "error rate")]
    scene = _num(_dig(run.metrics or {}, "faithfulness", "scene_caption_rate"))
    if scene is not None:
        small.append((_fmt(scene, "pct"), "scene-like captions"))
    head["cards"] = [_card(v, k, "big") for v, k in big] + [_card(v, k) for v, k in small]
    return head


def _with_interval(run: RunData, path: str) -> str:
    """A metric of the run with its 95% interval where metrics.json has one: ``92.0% [75.5%, 100.0%]``."""
    value = metricspec.number_at(run.metrics or {}, path)
    bounds = _interval_text(run.metrics or {}, path) if value is not None else None
    return _fmt_metric(path, value) + (f" {bounds}" if bounds else "")


def _interval_text(metrics: Dict[str, Any], path: str) -> Optional[str]:
    """``[75.5%, 100.0%]``: the 95% interval of the metric at ``path``, None where it has none."""
    interval = metricspec.interval_at(metrics, path)
    if interval is None:
        return None
    return f"[{_fmt_metric(path, interval['low'])}, {_fmt_metric(path, interval.get('high'))}]"


def _value_text(value: Any, kind: str = "") -> str:
    """A metrics.json value as text: a number formatted, a dict's scalar entries as ``k: v, ...``,
    a list's items."""
    if isinstance(value, dict):
        flat = [(k, v) for k, v in value.items() if _is_scalar(v)]
        return ", ".join(f"{k}: {_fmt(v, kind)}" for k, v in flat) if flat else "–"
    if isinstance(value, list):
        return ", ".join(_value_text(v, kind) for v in value) if value else "–"
    return _fmt(value, kind)


def _metrics_section(run: RunData) -> Dict[str, Any]:
    """metrics.json as tables by the metric specification's groups (labels, units, intervals from
    regioncap.metricspec), its distributions and its stages."""
    m = run.metrics or {}
    section: Dict[str, Any] = {"counted_from": run.records_file.name if run.metrics_computed and run.records_file
                               else None}
    tables = []
    for group, title in metricspec.GROUPS.items():
        if group == "stages":
            continue
        rows = []
        for spec in metricspec.in_group(group):
            if spec.kind == "distribution" or "*" in spec.path:
                continue
            try:
                value = metricspec.value_at(m, spec.path)
            except KeyError:
                continue
            if spec.kind == "text" and value is None:
                continue
            text = _with_interval(run, spec.path) if spec.kind == "value" and not isinstance(value, dict) \
                else _value_text(value, "pct" if spec.is_share else "")
            rows.append(_kv(spec.label, text))
        if rows:
            tables.append({"title": title, "rows": rows})
    # A figure no declaration names (a newer writer, a hand-edited file) is still shown, by its path.
    other = [_kv(path, _value_text(v)) for path, v in metricspec.leaf_paths(m)
             if metricspec.get(path) is None and ".intervals." not in path and _is_scalar(v)]
    if other:
        tables.append({"title": "Other", "rows": other})
    section["tables"] = tables
    dists = [(spec.label, m[spec.path]) for spec in metricspec.SPEC
             if spec.kind == "distribution" and isinstance(m.get(spec.path), dict) and m[spec.path]]
    section["dists"] = None
    if dists:
        cols = [c for c in metricspec.DISTRIBUTION_STATS if any(c in d for _, d in dists)]
        section["dists"] = _table(["metric"] + cols, ([k] + [_fmt(d.get(c)) for c in cols] for k, d in dists), "dist")
    section["stages"] = None
    stages = m.get("stages")
    if isinstance(stages, dict) and stages:
        specs = [spec for spec in metricspec.in_group("stages") if spec.unit != "setting"]
        rows = []
        for name, st in stages.items():
            st = st if isinstance(st, dict) else {}
            rows.append([name] + [_value_text(st.get(spec.key), "pct" if spec.is_share else "") for spec in specs])
        section["stages"] = _table(["stage"] + [spec.label for spec in specs], rows)
    extra = []
    if run.scan.get("finish_reasons"):
        extra.append("finish reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(run.scan["finish_reasons"].items())))
    section["notes"] = extra
    return section


def _errors_section(run: RunData) -> List[Dict[str, Any]]:
    """Error rows by ``stage/kind``, most first, each with a few examples ``(row, message)``."""
    counts = dict((run.metrics or {}).get("errors") or {})
    for kind in run.error_examples:
        counts.setdefault(kind, len(run.error_examples[kind]))
    return [{"kind": kind, "rows": _fmt(n),
             "examples": [(label, _clip(msg, 500)) for label, msg in run.error_examples.get(kind, [])]}
            for kind, n in sorted(counts.items(), key=lambda kv: (-_count(kv[1]), kv[0]))]


def _count(value: Any) -> float:
    return _num(value) or 0


def _references(rec: Record, reg: Region, key: Optional[str] = "references") -> List[str]:
    """A region's reference captions: the row's ``data.references_key`` field (one entry per
    input box, a string or a list of strings) at the region's ``source_index``."""
    from regioncap.metrics import reference_texts

    # The metrics' reader takes the record's plain objects: its input fields and the region's index are what it reads.
    return reference_texts({**rec.extras(), "input": rec.input}, {"source_index": reg.source_index}, key)


def _references_key(run: RunData) -> Optional[str]:
    data = _dig(_config(run), "data")
    if isinstance(data, dict) and "references_key" in data:
        return data["references_key"]
    return "references"


def _caption_cell(reg: Region, stage: Optional[str]) -> Dict[str, Any]:
    """A region's caption as the templates show it: the caption (clipped) with its exact-match mark
    (``exact``: True, False, None when not scored), re-ask and faithfulness tags; else why it is
    missing (``missing``: the reason) or that only the visualize stage ran (``pending``)."""
    cell: Dict[str, Any] = {"caption": None, "exact": None, "reasked": False, "flags": [], "missing": None,
                            "pending": False, "source": _source_tag(reg)}
    caption = reg.caption
    if caption:
        cell.update(caption=_clip(str(caption)), exact=_exact(reg), reasked=reg.attempt == 2,
                    flags=list(reg.flags or []))  # faithfulness flags (regioncap.metrics.region_flags)
    elif reg.missing or stage == CaptionStage.name:
        cell["missing"] = reg.reason or ""
    else:
        cell["pending"] = True
    return cell


def _refs_text(refs: Sequence[str]) -> List[str]:
    return [_clip(r, 500) for r in refs]


def _regions(rec: Record) -> List[Region]:
    """The record's regions; anything else in the list (a hand-edited file) is left out."""
    return [r for r in rec.regions or [] if isinstance(r, Region)]


def _requests(rec: Record) -> List[RequestSpec]:
    return [s for s in rec.requests or [] if isinstance(s, RequestSpec)]


def _region_table(rec: Record, stage: Optional[str], palette: Sequence[str],
                  references_key: Optional[str] = "references") -> Dict[str, Any]:
    """A row's regions: mark swatch (and chunk image where there are several), caption, references, scores."""
    regions = _regions(rec)
    refs = [_references(rec, r, references_key) for r in regions]
    chunks = len({r.chunk for r in regions}) > 1
    rows = []
    for reg, reg_refs in zip(regions, refs):
        sc = reg.scores if isinstance(reg.scores, dict) else {}
        rows.append({"swatch": _swatch(reg.number, palette, _proposed(reg) is not None),
                     "chunk": _fmt(reg.chunk) if chunks else None, "cell": _caption_cell(reg, stage),
                     "refs": _refs_text(reg_refs), "scores": ", ".join(f"{k} {_fmt(v)}" for k, v in sc.items()),
                     "wrong": _exact(reg) is False})
    return {"rows": rows, "has_refs": any(refs), "has_scores": any(isinstance(r.scores, dict) for r in regions),
            "missing": any(r.missing for r in regions)}


def _box_overlay(regions: Sequence[Region], size: Any, key: str, label: Any,
                 only_proposed: bool) -> Optional[Dict[str, Any]]:
    """An SVG drawn over a thumbnail: each region's box (``key``: ``bbox`` on the original image,
    ``input_bbox`` on the model's), dashed for a proposed region; ``label(region)`` is its text.
    Coordinates come formatted (the SVG's attributes); None when there is nothing to draw."""
    if not (isinstance(size, list) and len(size) == 2 and all(_num(v) for v in size)):
        return None
    w, h = float(size[0]), float(size[1])
    font = max(8.0, min(w, h) / 14)
    shapes = []
    for reg in regions:
        box = getattr(reg, key)
        proposed = _proposed(reg) is not None
        if only_proposed and not proposed:
            continue
        if not (isinstance(box, list) and len(box) == 4 and all(_num(v) is not None for v in box)):
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        shapes.append({"cls": "prop" if proposed else "box", "x": f"{x1:.1f}", "y": f"{y1:.1f}",
                       "width": f"{max(0.0, x2 - x1):.1f}", "height": f"{max(0.0, y2 - y1):.1f}",
                       "text": label(reg), "tx": f"{x1 + 2:.1f}", "ty": f"{y1 + font:.1f}", "font": f"{font:.1f}"})
    if not shapes:
        return None
    return {"viewbox": f"0 0 {w:g} {h:g}", "shapes": shapes}


def _with_overlay(figure: Dict[str, Any], overlay: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``figure`` with ``overlay`` drawn over its image (a placeholder figure is left alone)."""
    if overlay and figure.get("uri"):
        figure["overlay"] = overlay
    return figure


def _row_meta(rec: Record) -> Dict[str, Any]:
    """The row's id, status, image and sizes; and notes on dropped/clipped boxes and its error."""
    size = rec.image_size
    tokens = rec.tokens
    notes = []
    for key, listed in (("dropped_boxes", rec.dropped_boxes), ("clipped_boxes", rec.clipped_boxes)):
        items = [d for d in listed or [] if isinstance(d, dict)]
        if items:
            notes.append(f"{key.replace('_', ' ')}: " + ", ".join(f"#{d.get('index')} {d.get('reason')}" for d in items))
    err = rec.error
    if isinstance(err, RecordError):
        notes.append(f"error: {err.kind}: {_clip(str(err.message), 500)}")
    return {"id": rec.id, "badge": _badge(rec.status), "image": rec.image,
            "proposed": rec.type == "without_bbox",
            "size": f"{size[0]}×{size[1]}" if isinstance(size, list) and len(size) == 2 else None,
            "tokens": f"tokens {tokens.get('prompt')} in / {tokens.get('output')} out" if isinstance(tokens, dict)
            else None, "notes": notes}


def _answer_and_prompt(rec: Record) -> Dict[str, Optional[str]]:
    """The row's raw answer and prompt (clipped), None where the record has none."""
    return {"answer": _clip(str(rec.answer), 4000) if rec.answer else None,
            "prompt": _clip(str(rec.prompt), 4000) if rec.prompt else None}


def _is_crop_row(run: RunData, rec: Record) -> bool:
    """A row whose requests are one crop per region (``prompt=crop``; without a config:
    every request holds one region)."""
    from regioncap.strategies import recorded_strategy

    cls = recorded_strategy(_dig(_config(run), "prompt"))
    if cls is not None:
        return cls.one_region_per_image
    requests = _requests(rec)
    return bool(requests) and all(len(s.region_ids or []) == 1 for s in requests) and len(requests) > 1


def _request_figures(run: RunData, rec: Record, thumb_px: int, caption: str = "") -> List[Dict[str, Any]]:
    """The row's request images (at most :data:`IMAGES_PER_ROW`): the marked images the model saw,
    each named by its request key when there are several (``caption`` before it), proposed boxes
    drawn dashed over a whole image."""
    requests = _requests(rec)
    regions = _regions(rec)
    figures = []
    for spec in requests[:IMAGES_PER_ROW]:
        label = str(spec.key if spec.has("key") else "") if len(requests) > 1 else ""
        label = ": ".join(t for t in (caption, label) if t)
        fig = _image_html(run.path, spec.image or rec.image_with_bbox, thumb_px, label)
        if spec.image_size == rec.input_size:  # the whole image: proposed boxes drawn dashed over it
            ids = set(spec.region_ids or [])
            fig = _with_overlay(fig, _box_overlay([r for r in regions if r.id in ids], spec.image_size,
                                                  "input_bbox", lambda r: "", only_proposed=True))
        figures.append(fig)
    return figures


def _sample_card(run: RunData, rec: Record, thumb_px: int) -> Dict[str, Any]:
    """One row: its marked image(s) beside the region table (marked mode)."""
    return {"crop": False, "images": _request_figures(run, rec, thumb_px),
            "more": max(0, len(_requests(rec)) - IMAGES_PER_ROW), "meta": _row_meta(rec),
            "regions": _region_table(rec, run.stage, _palette(run), _references_key(run)),
            "raw": _answer_and_prompt(rec)}


def _crop_card(run: RunData, rec: Record, thumb_px: int) -> Dict[str, Any]:
    """One row in crop mode: the input image with every region's box and id, then a grid of the
    crops, each under its own region id with its caption (marked against its references)."""
    regions = _regions(rec)
    by_region: Dict[Any, RequestSpec] = {}
    for spec in _requests(rec):
        for rid in spec.region_ids or []:
            by_region.setdefault(rid, spec)  # the first request of a region (a re-ask reuses its crop)
    key = _references_key(run)
    crops = []
    for reg in regions[:CROPS_PER_ROW]:
        spec = by_region.get(reg.id) or RequestSpec()
        classes = ["crop"] + (["wrong"] if _exact(reg) is False else []) + (["prop"] if _proposed(reg) else [])
        crops.append({"cls": " ".join(classes), "image": _image_html(run.path, spec.image, max(64, thumb_px // 2)),
                      "id": reg.id, "cell": _caption_cell(reg, run.stage),
                      "refs": _refs_text(_references(rec, reg, key))})
    return {"crop": True, "original": _original_html(run, rec, thumb_px), "crops": crops,
            "more": max(0, len(regions) - CROPS_PER_ROW), "meta": _row_meta(rec), "raw": _answer_and_prompt(rec)}


def _samples_section(run: RunData, thumb_px: int) -> Dict[str, Any]:
    """The sample rows as cards (marked or crop mode), with a line on what they show."""
    crop = [_is_crop_row(run, rec) for rec in run.samples]
    wrong, exact = run.scan.get("regions_wrong", 0), run.scan.get("regions_exact", 0)
    return {"shown": len(run.samples), "total": run.scan.get("rows", 0), "crop": bool(crop) and all(crop),
            "scored": _fmt(wrong + exact) if wrong or exact else None, "wrong": _fmt(wrong),
            "cards": [(_crop_card if c else _sample_card)(run, rec, thumb_px) for rec, c in zip(run.samples, crop)]}


def _run_context(run: RunData, thumb_px: int) -> Dict[str, Any]:
    """What the run page shows, section by section; a section is None where the run has nothing for it."""
    has_records = run.records_file is not None
    return {"header": _header(run), "failure": run.failure, "problems": run.problems,
            "samples": _samples_section(run, thumb_px) if has_records else None,
            "shards": _shards_section(run),
            "metrics": _metrics_section(run) if has_records or run.metrics else None,
            "errors": _errors_section(run) if has_records else None,
            "provenance": _manifest_section(run)}


def _shards_section(run: RunData) -> Optional[Dict[str, Any]]:
    """A merged dir's shards (``manifest.json`` ``shards``, written by ``regioncap.merge``); None for a run."""
    shards = _dig(run.manifest, "shards")
    if not isinstance(shards, list) or not shards:
        return None
    return _table(["shard", "rows", "error rows", "seconds", "run dir"],
                  [[_fmt(s.get("shard_index")), _fmt(s.get("rows")), _fmt(s.get("error_rows")),
                    _fmt(s.get("wall_s")), s.get("dir")] for s in shards if isinstance(s, dict)])


def render_run(run: RunData, *, thumb_px: int = DEFAULT_THUMB_PX) -> str:
    """The HTML page of one run: header with the results, samples, metrics and errors, provenance."""
    ident = _identity_text(run_identity(run))
    title = f"regioncap: {ident} ({run.path.name})" if ident else f"regioncap report: {run.path.name}"
    return _render("run.html.j2", title=title, **_run_context(run, thumb_px))


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
    if job.stage == VisualizeStage.name:
        return "visualize only"
    rate, limit = _num((job.metrics or {}).get("error_rate")), _num(_dig(_config(job), "max_error_rate"))
    if rate is not None and limit is not None and rate > limit:
        return "over max_error_rate"
    if _dig(job.manifest, "status") == "failed":  # records written, then the job raised
        return "failed"
    if job.metrics is None:
        return "incomplete"
    return "ok"


#: What :func:`_job_status` calls a job that did not finish as it should.
FAILED_STATUSES = ("failed", "over max_error_rate")


def _job_failure(job: RunData) -> Optional[str]:
    """Why a job failed: the last error of its log (no records), else the error its manifest names."""
    return job.failure or _text(_dig(job.manifest, "error"))


def default_metric(jobs: Sequence[RunData]) -> str:
    """Exact match where a job has references, else regions/s."""
    return "references.exact_match" if any(key_metrics(j).get("references.exact_match") is not None
                                           for j in jobs) else "regions_per_s"


def metric_name(metric: str) -> str:
    """A ``--metric`` as a metrics.json path of :data:`PLOT_METRICS`: the path itself, or its last
    part where that names one metric (``exact_match``, ``cider``); ``stages.caption.regions_per_s``
    is the caption stage's rate, ``regions_per_s``. Raises :class:`ReportError` naming the choices."""
    name = metric.strip()
    if name.startswith("stages.caption."):
        name = name[len("stages.caption."):]
    if name in PLOT_METRICS:
        return name
    found = [path for path in PLOT_METRICS if path.rsplit(".", 1)[-1] == name]
    if len(found) == 1:
        return found[0]
    raise ReportError(f"--metric {metric!r} is not a metric the report plots; pick one of: "
                      + ", ".join(PLOT_METRICS))


def _fmt_metric(key: str, value: Optional[float]) -> str:
    """A value of the metric at ``key`` (a metrics.json path), a share as a percentage."""
    return _fmt(value, "pct" if _is_share(key) else "")


def _region_values(job: RunData, metric: str) -> Optional[Dict[Tuple[Any, ...], List[float]]]:
    """Each row's per-region values of ``metric`` (``regions[].scores``, as the caption stage
    writes exact match and attribute accuracy), keyed by the row's ``(digest, index, id)``
    so two jobs pair up only on the same input rows; ``None`` when no region has one."""
    if job.records_file is None or job.stage != CaptionStage.name:
        return None
    name = metric.rsplit(".", 1)[-1]  # references.exact_match is regions[].scores.exact_match
    out: Dict[Tuple[Any, ...], List[float]] = {}
    found = False
    for rec in map(Record.from_dict, _iter_records(job.records_file, [])):
        values = []
        for reg in _regions(rec):
            scores = reg.scores
            value = _num(scores.get(name)) if isinstance(scores, dict) else None
            if value is not None:
                values.append(value)
        found = found or bool(values)
        out[(rec.digest, rec.index, rec.id)] = values
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

    failed = {i for i, job in enumerate(jobs) if _job_status(job) in FAILED_STATUSES}
    best = _best(kms, metric, skip=failed)
    out: Dict[str, Any] = {"best": best, "separated": None, "diffs": {}}
    if best is None:
        return out
    base = _region_values(jobs[best], metric)
    if base is None:
        return out
    separated = True
    for i, (job, km) in enumerate(zip(jobs, kms)):
        if i == best or i in failed or km.get(metric) is None:
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
    pct = _is_share(key)
    f = (lambda v: f"{100 * v:+.1f}") if pct else (lambda v: f"{v:+.3f}")  # noqa: E731
    if diff.get("low") is None:
        return f"{f(diff['difference'])}{' pts' if pct else ''} (one row in common: no interval)"
    return f"{f(diff['difference'])}{' pts' if pct else ''} [{f(diff['low'])}, {f(diff['high'])}]"


def _best(kms: Sequence[Dict[str, Optional[float]]], key: str, skip: Iterable[int] = ()) -> Optional[int]:
    """The index of the job with the best value of ``key`` (its direction: regioncap.metricspec;
    first on a tie), leaving out the jobs in ``skip`` (failed ones); None when none has one."""
    skip = set(skip)
    values = [(km.get(key), i) for i, km in enumerate(kms) if km.get(key) is not None and i not in skip]
    if not values:
        return None
    spec = metricspec.get(key)
    low = spec is not None and spec.better == "lower"
    return min(values, key=lambda vi: ((vi[0] if low else -vi[0]), vi[1]))[1]


def _comparison_table(jobs: Sequence[RunData], varying: Sequence[str], metric: Optional[str] = None,
                      paired: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One row per job. The first column (sticky when the table scrolls) names the job by its swept
    overrides; exact match and attribute accuracy lead the metric columns, with their 95% intervals
    where metrics.json has them. The plotted metric's best job is marked only when it is
    distinguishable from every other job (``paired``: :func:`paired_comparison`); the other jobs show
    their paired difference from it, flagged "not distinguishable" when its interval includes zero.
    Each cell: ``text``, its ``interval`` text, and the title of a ``best`` or ``highest`` mark or
    the paired difference from the best (``diff``), each None where it has none."""
    kms = [key_metrics(j) for j in jobs]
    if paired is None and metric:
        paired = paired_comparison(jobs, kms, metric)
    paired = paired or {"best": None, "separated": None, "diffs": {}}
    compared = [m for m in metricspec.flagged("compare") if any(km.get(m.path) is not None for km in kms)]
    # Shares of the references first (on short captions BLEU says little), then cost and answers, then scores.
    lead = [m.path for m in compared if m.group == "references" and m.is_share]
    scores = [m.path for m in compared if m.group in ("references", "densecap", "proposals") and m.path not in lead]
    columns = lead + [m.path for m in compared if m.path not in lead and m.path not in scores] + scores
    header = ["job", "status"] + [metricspec.BY_PATH[k].label for k in columns]
    best = paired["best"]
    rows = []
    for i, (job, km) in enumerate(zip(jobs, kms)):
        d = dict(split_override(o) for o in job.overrides)
        link = job.path.name + "/" + REPORT_FILE if (job.path / REPORT_FILE).is_file() else None
        failure = _job_failure(job)
        cells = []
        for key in columns:
            value = km.get(key)
            interval = None
            if key == "regions_captioned" and value is not None:
                text = f"{_fmt(value)} / {_fmt(km.get('regions'))}"
            else:
                text = _fmt_metric(key, value)
                if value is not None:
                    interval = _interval_text(job.metrics or {}, key)
            name = metricspec.BY_PATH[key].label
            cell: Dict[str, Any] = {"text": text, "interval": interval, "best": None, "highest": None, "diff": None}
            if key == metric and i == best:
                if paired["separated"] is False:
                    cell["highest"] = f"highest {name}; not distinguishable from at least one other job at 95%"
                else:
                    cell["best"] = f"best {name}"
            elif key == metric and i in paired["diffs"]:
                diff = paired["diffs"][i]
                verdict = " not distinguishable" if diff["includes_zero"] else ""
                cell["diff"] = f"vs best {_diff_text(key, diff)}{verdict}"
            cells.append(cell)
        rows.append({"name": job.name, "link": link, "params": [(k, d.get(k, "–")) for k in varying],
                     "badge": _badge(_job_status(job)), "why": _clip(failure, 300) if failure else None,
                     "cells": cells})
    return {"header": header, "rows": rows}


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
    if _is_share(key):
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

    metric = metric_name(metric)
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
            if not _is_share(key):  # room for the value labels above the bars
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

    metric = metric_name(metric)
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


def _side_by_side(jobs: Sequence[RunData], varying: Sequence[str], thumb_px: int) -> List[Dict[str, Any]]:
    """The same rows' captions from every job, each marked against its references, beside each job's
    own marked images (a job with other ``max_boxes`` drew other marks); in crop mode the first
    job's input image with the boxes by region id."""
    jobs = [j for j in jobs if j.records_file is not None]  # a failed job has nothing to compare
    base = next((j for j in jobs if j.samples), None)
    if base is None:
        return []
    by_job = [{str(r.id): r for r in j.samples} for j in jobs]
    blocks = []
    for rec in base.samples[:SWEEP_ROWS]:
        rid = str(rec.id)
        crop = _is_crop_row(base, rec)
        if crop:
            images = [_original_html(base, rec, thumb_px)]
        else:
            images = []
            for j, lookup in zip(jobs, by_job):
                own = lookup.get(rid)
                if own is not None:
                    images += _request_figures(j, own, thumb_px, f"job {j.name}: {job_label(j, varying)}")
        key = _references_key(base)
        rows = []
        for reg in _regions(rec):
            cells = []
            for j, lookup in zip(jobs, by_job):
                other = lookup.get(rid)
                match = next((r for r in (_regions(other) if other is not None else []) if r.id == reg.id), None)
                if match is None:
                    cells.append(None)
                    continue
                # The job's own mark where it numbered the region otherwise (another max_boxes, other chunks).
                own = None if crop or match.number == reg.number else _swatch(
                    match.number, _palette(j), _proposed(match) is not None)
                cells.append({"swatch": own, "caption": _caption_cell(match, j.stage)})
            rows.append({"id": reg.id, "crop": crop,
                         "swatch": _swatch(reg.number, _palette(base), _proposed(reg) is not None),
                         "cells": cells, "refs": _refs_text(_references(rec, reg, key))})
        blocks.append({"id": rid, "image": rec.image, "images": images, "per_job": not crop,
                       "layout": "wide" if len(jobs) <= 2 else "stack",  # many jobs: the table gets the page's width
                       "jobs": [job_label(j, varying) for j in jobs], "has_refs": any(r["refs"] for r in rows),
                       "rows": rows})
    return blocks


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
    kms = [key_metrics(j) for j in jobs]
    # A job stopped by max_error_rate wrote its records: it failed all the same.
    failed = sum(1 for j in jobs if _job_status(j) in FAILED_STATUSES)
    cards = [_card(str(len(jobs)), "jobs"), _card(str(failed), "failed")]
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
    info = []
    if isinstance(task, list):
        info.append(_kv("sweep overrides", " ".join(str(t) for t in task), code=True))
    if common:
        info.append(_kv("common overrides", " ".join(f"{k}={v}" for k, v in common.items()), code=True))
    details = []
    for job in jobs:
        has_records = job.records_file is not None
        details.append({
            "name": job.name, "label": job_label(job, varying), "badge": _badge(_job_status(job)),
            "problems": job.problems, "failure": _job_failure(job), "overrides": "\n".join(job.overrides),
            "metrics": _metrics_section(job) if has_records or job.metrics else None,
            "errors": _errors_section(job) if has_records else None,
            "manifest": _yaml_text(job.manifest) if job.manifest else None,
            "config": _yaml_text(job.config) if not job.manifest and job.config is not None else None})
    return _render("sweep.html.j2", title=title, sweep=sweep_dir.name, path=str(sweep_dir), swept=swept,
                   names=list(same.items()), cards=cards, problems=problems, info=info,
                   compare=_comparison_table(jobs, varying, metric, paired), metric=metric, metric_label=PLOT_METRICS[metric],
                   plots=sweep_plots(jobs, varying, metric), side=_side_by_side(jobs, varying, thumb_px),
                   jobs=details)


# ---------------------------------------------------------------- entry points
def write_report(run_dir: Path, out: Optional[Path] = None, *, max_rows: int = DEFAULT_ROWS,
                 thumb_px: int = DEFAULT_THUMB_PX, metric: Optional[str] = None) -> Path:
    """Write the HTML report of a run dir or a multirun dir; return its path (default ``run_dir/report.html``).

    ``metric``: what a sweep's plots show (a metrics.json path of :data:`PLOT_METRICS` such as
    ``references.exact_match``, or its last part; default exact match where the jobs have references,
    else regions/s).

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
                        + " (or the last part of one, such as exact_match; default references.exact_match "
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


if __name__ == "__main__":
    sys.exit(main())
