"""Experiment loggers: one narrow interface, W&B behind it, nothing when ``logger=none``.

``build_logger(cfg.logger)`` returns the :class:`RunLogger` that ``logger._target_`` names. The job calls
``start`` before the stages, ``log_run`` after them and ``finish`` in a
``finally``. A logger never fails or stalls a run: whatever goes wrong inside it
(W&B not installed, unreachable, misconfigured, an init timeout, a bad record)
is logged as one warning and the run goes on without it.

What the W&B logger records, all from files the run already wrote:

- the composed config (``wandb.init(config=...)``; the job passes it with secrets masked);
- the numeric scalars of ``metrics.json``, flattened (``stages/caption/seconds``),
  in ``run.summary`` and in one ``run.log`` call;
- ``samples/00``, ``samples/01``...: the first ``log_images`` request images,
  each region a native W&B box (pixel domain, at the image's own resolution:
  ``input_bbox``) labelled ``"<number>: <caption>"``, one key per image since
  W&B draws a list of differently sized images wrongly. ``prompt=crop``
  requests are crops of the region plus a margin whose offset the records do
  not keep, so those images are logged without boxes: the whole crop is the region;
- ``region_table``: a ``wandb.Table`` with one row per region (capped at
  ``table_rows``): row id, region, mark number, image path, a thumbnail of the
  region (written to ``RUN_DIR/thumbnails/``, W&B copies it from there), boxes, caption, reference and per-region reference scores when the
  data has references, missing flag and reason;
- the caption records and ``metrics.json`` as a ``dataset`` artifact;
- while a stage runs, after each commit (:meth:`RunLogger.log_progress`):
  ``progress/<stage>/rows``, ``regions``, ``errors``, ``rows_per_s``,
  ``regions_per_s`` against ``progress/<stage>/seconds``, so a long run can be watched.

Only the standard library is imported here; ``wandb``, Pillow and the scorers
are imported when the W&B logger needs them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from regioncap.components import Component, class_of, check, whole
from regioncap.record_types import Record, Region, RequestSpec
from regioncap.records import cut_text, dumps, read_jsonl

from regioncap.rundir import CAPTIONS_FILE, METRICS_FILE, VISUALIZE_FILE
from regioncap.stages import CaptionStage

log = logging.getLogger("regioncap")
#: Metadata keys W&B allows on an artifact.
ARTIFACT_METADATA_MAX = 100

#: Metrics file and record files written by the run (see ``regioncap.run``).
#: Longest side of a region thumbnail in the table, in pixels.
THUMBNAIL_PX = 128
#: The table's thumbnails, as files in the run dir (``RUN_DIR/thumbnails/000000.jpg``, one per table row).
THUMBNAIL_DIR = "thumbnails"
#: Box labels and image captions are cut to this many characters (W&B shows them inline).
_BOX_CAPTION_CHARS = 80
_IMAGE_CAPTION_CHARS = 600


class RunLogger(Component):
    """Interface of an experiment logger; this base class logs nothing. Built as ``cls(cfg.logger)``."""

    #: In a multirun, the sweep dir (set by the job before :meth:`start`): a tracker that keeps
    #: local runs may keep the sweep's together there, so one command handles them all. None in a single run.
    sweep_dir: Optional[Path] = None

    def __init__(self, cfg: Optional[RunLogger.Config] = None) -> None:
        self.cfg = cfg

    def start(self, *, config: Dict[str, Any], run_dir: Path, name: str, group: Optional[str],
              job_type: str = CaptionStage.name) -> None:
        """Open the tracking run for one job (before the stages)."""

    def log_progress(self, stage: str, rows: int, regions: int, errors: int, seconds: float) -> None:
        """Progress of ``stage`` while it runs: totals since the stage started (rows
        committed, regions in them, error rows) after ``seconds``. Called after each
        commit; cheap, never raises."""

    def log_run(self, *, metrics: Dict[str, Any], run_dir: Path) -> None:
        """Record what the stages wrote to ``run_dir`` (after the stages)."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the tracking run; safe to call at any time, also when ``start`` failed."""


class NoneLogger(RunLogger):
    """``logger=none``: the run dir (records, metrics.json, the log) is the record."""

    name = "none"


def build_logger(logger_cfg: Optional[RunLogger.Config]) -> RunLogger:
    """The logger ``logger_cfg._target_`` names, built with its settings; no node: :class:`NoneLogger`."""
    if logger_cfg is None:
        return NoneLogger()
    return class_of(logger_cfg, RunLogger, "logger")(logger_cfg)


# --------------------------------------------------------------------------- mode


def api_key_configured() -> bool:
    """Whether W&B credentials are configured on this machine, without any network call.

    ``WANDB_API_KEY`` (or an identity token file), a netrc entry for the W&B
    host, or an ``api_key`` in wandb's settings files. ``wandb.login(prompt=False)``
    would also answer this, but it contacts the server to print who is logged
    in and rewrites wandb's settings file, so this reads what it reads instead.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:  # wandb's own reader (honours $NETRC, the settings files and their base_url)
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings
        return bool(wbauth.read_netrc_auth(host=settings.base_url) or settings.api_key)
    except Exception:  # noqa: BLE001 - wandb internals move between versions: read netrc directly
        return _netrc_has_entry(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")


def _netrc_has_entry(base_url: str) -> bool:
    import netrc
    from urllib.parse import urlsplit

    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    host = urlsplit(base_url).netloc
    try:
        creds = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(creds and creds[2])


def resolve_mode(mode: Optional[str]) -> str:
    """``logger.mode`` if set, else ``$WANDB_MODE``, else ``online`` with credentials, else ``offline``."""
    if mode:
        return mode
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode:
        return env_mode
    return "online" if api_key_configured() else "offline"


# --------------------------------------------------------------------------- W&B


class WandbLogger(RunLogger):
    """One W&B run per Hydra job, written under ``run_dir/wandb/``."""

    @dataclass
    class Config(RunLogger.Config):
        project: str = "regioncap"
        entity: Optional[str] = None
        #: ``online``, ``offline`` or ``disabled``; null: ``$WANDB_MODE`` if set, else
        #: online when an API key is configured, else offline.
        mode: Optional[str] = None
        #: W&B group; null: the sweep dir's name in a multirun, none in a single run.
        group: Optional[str] = None
        tags: List[str] = field(default_factory=list)
        #: Marked images logged with native box overlays (0 = none).
        log_images: int = field(default=8, metadata=check(whole(0)))
        #: A table of every region (image, box, caption, reference, scores), capped at ``table_rows``.
        log_table: bool = True
        table_rows: int = 2000
        #: The caption records as a W&B artifact.
        log_artifact: bool = True
        #: Seconds to wait for W&B to start before going on without it.
        init_timeout_s: float = 60.0
        #: Most seconds ``finish`` waits for uploads (online); what is left stays on disk
        #: for ``wandb sync``. null waits until everything is uploaded.
        finish_timeout_s: Optional[float] = 600.0

    name = "wandb"
    requires = ("wandb",)
    extra = "wandb"

    def __init__(self, cfg: WandbLogger.Config) -> None:
        self.cfg = cfg
        self._wandb: Any = None
        self._run: Any = None
        self._config: Dict[str, Any] = {}
        self._warned = False
        self._progress_stages: set = set()

    # The one place errors are swallowed: every public method goes through it.
    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - W&B must never fail the run
            if not self._warned:
                self._warned = True
                hint = (" (logger.mode=offline logs without a server; `wandb sync` uploads later)"
                        if what == "start" else "")
                log.warning("W&B %s failed, the run goes on without it: %s: %s%s", what, type(exc).__name__,
                            (str(exc).strip().splitlines() or [""])[0], hint)
            log.debug("W&B %s failed", what, exc_info=True)
            return None

    def start(self, *, config: Dict[str, Any], run_dir: Path, name: str, group: Optional[str],
              job_type: str = CaptionStage.name) -> None:
        self._config = config
        self._guard("start", self._start, config=config, run_dir=Path(run_dir), name=name, group=group,
                    job_type=job_type)

    def _start(self, *, config: Dict[str, Any], run_dir: Path, name: str, group: Optional[str],
               job_type: str) -> None:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("wandb is not installed (pip install 'regioncap[wandb]')") from None
        self._wandb = wandb
        cfg = self.cfg
        mode = resolve_mode(cfg.mode)
        if mode == "disabled":
            log.info("W&B: mode disabled, nothing logged")
            return
        # A sweep's offline runs go together under SWEEP_DIR/wandb/, so one `wandb sync` uploads them all.
        root = Path(self.sweep_dir) if self.sweep_dir is not None else run_dir
        root.mkdir(parents=True, exist_ok=True)
        settings = _settings(wandb, {
            "init_timeout": cfg.init_timeout_s,
            # Not 0 (wait forever): a network that drops mid-run must not hold the job at
            # finish; what was not uploaded stays on disk for `wandb sync`.
            "finish_timeout": cfg.finish_timeout_s or None,
            # Quiet also skips wandb's "logged in as" look-up, which otherwise retries an
            # unreachable server for 2 x 5 s on top of init_timeout; regioncap logs the run itself.
            "quiet": True,
            # A job whose finish failed must not hand its run to the next job of a sweep.
            "reinit": "finish_previous",
        })
        # W&B records the command line in the run's metadata (and uploads it):
        # hand it one with secret-named override values masked.
        from regioncap.manifest import redact_override

        argv = sys.argv
        sys.argv = [argv[0], *(redact_override(a) for a in argv[1:])]
        try:
            self._run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=group, name=name, job_type=job_type,
                tags=list(cfg.tags) or None, config=config, dir=str(root), mode=mode, settings=settings,
            )
        finally:
            sys.argv = argv
        where = getattr(self._run.settings, "sync_dir", None) or root / "wandb"
        in_group = f" in group {group}" if group else ""
        if mode == "offline":
            if self.sweep_dir is not None:
                log.info("W&B offline run %s%s: %s (upload every run of the sweep with `wandb sync %s`)",
                         name, in_group, where, root / "wandb")
            else:
                log.info("W&B offline run %s%s: %s (upload it with `wandb sync %s`)", name, in_group, where, where)
        else:
            log.info("W&B run %s%s: %s", name, in_group, getattr(self._run, "url", None) or where)

    def log_progress(self, stage: str, rows: int, regions: int, errors: int, seconds: float) -> None:
        if self._run is not None:
            self._guard("log_progress", self._log_progress, stage, rows, regions, errors, seconds)

    def _log_progress(self, stage: str, rows: int, regions: int, errors: int, seconds: float) -> None:
        prefix = f"progress/{stage}"
        if stage not in self._progress_stages:
            # Each stage's progress charts run against its own clock, not W&B's step counter.
            self._progress_stages.add(stage)
            self._run.define_metric(f"{prefix}/seconds")
            self._run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/seconds")
        seconds = float(seconds)
        self._run.log({
            f"{prefix}/seconds": round(seconds, 3), f"{prefix}/rows": int(rows),
            f"{prefix}/regions": int(regions), f"{prefix}/errors": int(errors),
            f"{prefix}/rows_per_s": round(rows / seconds, 4) if seconds > 0 else None,
            f"{prefix}/regions_per_s": round(regions / seconds, 4) if seconds > 0 else None,
        })

    def log_run(self, *, metrics: Dict[str, Any], run_dir: Path) -> None:
        if self._run is not None:
            self._guard("log_run", self._log_run, metrics=metrics, run_dir=Path(run_dir))

    def _log_run(self, *, metrics: Dict[str, Any], run_dir: Path) -> None:
        wandb, run, cfg = self._wandb, self._run, self.cfg
        start = time.perf_counter()
        flat = flatten_metrics(metrics)
        run.summary.update(flat)
        payload: Dict[str, Any] = dict(flat)
        table = None
        records_file = records_file_of(metrics, run_dir)
        if records_file is not None and (cfg.log_images > 0 or cfg.log_table):
            samples, table = collect(
                records_file, run_dir, n_images=max(0, cfg.log_images),
                table_rows=max(0, cfg.table_rows) if cfg.log_table else 0,
                references_key=(self._config.get("data") or {}).get("references_key"),
                crops=one_region_per_image(self._config.get("prompt")))
            # One key per image: W&B draws a list of images of different sizes wrongly.
            for i, image in enumerate(_wandb_images(wandb, samples)):
                payload[f"samples/{i:02d}"] = image
            if table is not None:
                payload["region_table"] = _wandb_table(wandb, table)
        with _staging_in(getattr(run.settings, "sync_dir", None)):
            run.log(payload)
        if cfg.log_artifact:
            files = [p for p in (records_file, run_dir / METRICS_FILE) if p is not None and p.is_file()]
            if files:
                # Immutable: referenced where they are, not copied to wandb's staging dir in the
                # home dir (records can be GBs); regioncap never rewrites them after a job.
                # W&B allows 100 metadata keys: the figures the metric specification marks as key ones
                # (every figure is in the metrics.json the artifact holds).
                meta = dict(list(key_figures(flat).items())[:ARTIFACT_METADATA_MAX])
                art = wandb.Artifact(f"captions-{run.id}", type="dataset",
                                     description=f"regioncap records of {run.name}", metadata=meta)
                for path in files:
                    art.add_file(str(path), name=path.name, policy="immutable")
                run.log_artifact(art)
        log.info("W&B: logged %d metrics, %d sample images, %s%s in %.1f s", len(flat),
                 sum(1 for k in payload if k.startswith("samples/")),
                 f"a table of {len(table['rows'])} regions" if table is not None else "no table",
                 ", the records as an artifact" if cfg.log_artifact else "", time.perf_counter() - start)

    def finish(self, exit_code: int = 0) -> None:
        run, self._run = self._run, None
        if run is not None:
            start = time.perf_counter()
            self._guard("finish", run.finish, exit_code=int(exit_code))
            log.info("W&B: run finished (exit code %d) in %.1f s", exit_code, time.perf_counter() - start)


@contextlib.contextmanager
def _staging_in(sync_dir: Optional[str]) -> Iterator[None]:
    """W&B copies a logged table and its images into a ``run_table`` artifact staged under
    ``$WANDB_DATA_DIR`` (a folder in the home dir), and an offline run's ``wandb sync`` reads
    them from there later. Stage them inside the W&B run's own folder instead
    (``.../offline-run-*/data/``), so the folder holds everything its sync needs."""
    if not sync_dir:
        yield
        return
    before = os.environ.get("WANDB_DATA_DIR")
    os.environ["WANDB_DATA_DIR"] = str(Path(sync_dir) / "data")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WANDB_DATA_DIR", None)
        else:
            os.environ["WANDB_DATA_DIR"] = before


def _settings(wandb: Any, values: Dict[str, Any]) -> Any:
    """``wandb.Settings`` with the fields this wandb version knows (older ones lack some,
    or take other types: ``reinit`` was a bool before 0.19.10)."""
    known = getattr(wandb.Settings, "model_fields", None)
    kwargs = {k: v for k, v in values.items() if v is not None and (known is None or k in known)}
    try:
        return wandb.Settings(**kwargs)
    except Exception:  # noqa: BLE001 - keep the one setting that bounds the start
        return wandb.Settings(init_timeout=values["init_timeout"])


# ------------------------------------------------------------------ from records


def flatten_metrics(metrics: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """The numeric scalars of ``metrics``, nested keys joined with ``/`` (bools and nulls left out)."""
    flat: Dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def key_figures(flat: Dict[str, float]) -> Dict[str, float]:
    """The entries of :func:`flatten_metrics` that regioncap.metricspec marks as headline, compared or
    plotted figures (with their intervals): what a W&B artifact's metadata carries."""
    from regioncap import metricspec

    keys = {m.path for m in metricspec.SPEC if m.headline or m.compare or m.plot}
    out = {}
    for name, value in flat.items():
        path = name.replace("/", ".")
        head, _, leaf = path.rpartition(".intervals.")
        base = f"{head}.{leaf.split('.')[0]}" if head else path
        if path in keys or (head and base in keys):
            out[name] = value
    return out


def records_file_of(metrics: Dict[str, Any], run_dir: Path) -> Optional[Path]:
    """The final record file of the run: captions when the caption stage ran, else visualize."""
    stages = metrics.get("stages") or {}
    order = [CAPTIONS_FILE, VISUALIZE_FILE] if CaptionStage.name in stages or not stages else [VISUALIZE_FILE]
    for name in order:
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def _references(rec: Record, region: Region, references_key: Optional[str]) -> List[str]:
    from regioncap.metrics import region_reference_texts

    return region_reference_texts(rec, region, references_key)


def _scores(region: Region) -> Dict[str, float]:
    scores = region.scores
    if not isinstance(scores, dict):
        return {}
    return {str(k): v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


_cut = cut_text


def collect(records_file: Path, run_dir: Path, *, n_images: int, table_rows: int, references_key: Optional[str],
            crops: bool = False) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """Stream the records once: the first ``n_images`` request images and up to ``table_rows`` regions.

    Returns plain data (no wandb objects): ``samples``, each ``{path, caption,
    boxes: [(number, xyxy, label)] or None}``, and ``table``, ``{columns, rows}``
    or None when no table is asked for. ``crops``: the request images are
    crops of one region each (``prompt=crop``), logged without boxes.
    """
    samples: List[Dict[str, Any]] = []
    rows: List[Dict[str, Any]] = []
    thumbs = _Thumbnailer(run_dir / THUMBNAIL_DIR if table_rows > 0 else None)
    for rec in map(Record.from_dict, read_jsonl(records_file)):
        if len(samples) >= n_images and len(rows) >= table_rows:
            break
        regions = rec.regions or []
        by_id = {r.id: r for r in regions}
        requests = rec.requests or []
        region_image = {}
        for spec in requests:
            for rid in spec.region_ids or []:
                region_image[rid] = spec.image
            if len(samples) < n_images and spec.image and (run_dir / spec.image).is_file():
                samples.append(_sample(rec, spec, [by_id[i] for i in spec.region_ids or [] if i in by_id],
                                       run_dir, crops))
        for reg in regions:
            if len(rows) >= table_rows:
                break
            image = region_image.get(reg.id)
            rows.append({
                "row_id": rec.id, "region": reg.id, "number": reg.number,
                "chunk": reg.chunk, "status": rec.status, "image": image,
                "thumbnail": thumbs(run_dir / image, None if crops else reg.input_bbox, len(rows))
                if image else None,
                "bbox": reg.bbox, "input_bbox": reg.input_bbox, "caption": reg.caption,
                "references": _references(rec, reg, references_key), "missing": bool(reg.missing),
                "reason": reg.reason, "scores": _scores(reg),
                "flags": ", ".join(map(str, reg.flags or [])) or None,
            })
    table = None
    if table_rows > 0:
        columns = ["row_id", "region", "number", "chunk", "status", "image", "thumbnail", "bbox", "input_bbox",
                   "caption"]
        if any(r["references"] for r in rows):
            columns.append("reference")
            try:
                _score_rows(rows)
            except Exception as exc:  # noqa: BLE001 - scores are extra: the table goes on without them
                log.info("W&B table: no reference scores (%s: %s)", type(exc).__name__, exc)
        for r in rows:
            r["reference"] = " | ".join(r.pop("references")) or None
        columns += ["missing", "reason", "flags"]
        score_names = sorted({k for r in rows for k in r["scores"]})
        columns += [f"score/{k}" for k in score_names]
        table = {"columns": columns, "rows": [
            [r.get(c) if not c.startswith("score/") else r["scores"].get(c[6:]) for c in columns] for r in rows]}
    return samples, table


def _score_rows(rows: List[Dict[str, Any]]) -> None:
    """Add reference scores (BLEU-4, ROUGE-L, CIDEr) to rows that have references and no scores.

    Scored among the table's rows only: CIDEr weighs n-grams by their rarity in
    the corpus it is given, so these can differ from the run's per-region
    scores over all rows. Without the scorers (the ``metrics`` extra) nothing is added.
    """
    from regioncap.metrics import score_regions

    # Records carry exact_match/attribute_accuracy per region already; the n-gram scores are added here.
    todo = [r for r in rows if r["references"] and r["caption"] and "bleu4" not in r["scores"]]
    if not todo:
        return
    per = score_regions([(r["caption"], r["references"]) for r in todo])
    for r, scores in zip(todo, per):
        r["scores"] = {**r["scores"], **{k: v for k, v in scores.items() if isinstance(v, (int, float))}}


def _sample(rec: Record, spec: RequestSpec, regions: List[Region], run_dir: Path,
            crop: bool) -> Dict[str, Any]:
    lines = []
    boxes = None if crop else []
    for reg in regions:
        number = int(reg.number or reg.id or 0)
        caption = reg.caption
        if caption:
            label = f"{number}: {caption}"
        elif rec.status == "pending":  # visualize stage only: not asked yet
            label = str(number)
        else:
            label = f"{number}: (missing: {reg.reason or 'no caption'})"
        source = str(reg.source or "input")
        if source != "input":  # a proposed region: its own box layer in W&B, tagged
            label = f"{label} [proposed: {source}]"
        lines.append(label)
        if boxes is not None and reg.input_bbox:
            boxes.append((number, [int(v) for v in reg.input_bbox], _cut(label, _BOX_CAPTION_CHARS), source))
    caption = _cut(f"{spec.key or rec.id}\n" + "\n".join(lines), _IMAGE_CAPTION_CHARS)
    return {"path": str(run_dir / spec.image), "caption": caption, "boxes": boxes}


class _Thumbnailer:
    """Region crops of request images, written as JPEG files to ``folder`` (in the run dir, so
    W&B copies them from there rather than staging them in a temporary folder of its own);
    keeps the last image open (a row's regions share it). No folder: no thumbnails."""

    def __init__(self, folder: Optional[Path]) -> None:
        self.folder = folder
        self._path: Optional[Path] = None
        self._image: Any = None

    def __call__(self, path: Path, box: Optional[List[int]], n: int) -> Optional[Path]:
        """The ``n``-th table row's thumbnail file (``THUMBNAIL_DIR/000000.jpg``), or None."""
        if self.folder is None:
            return None
        image = self._crop(path, box)
        if image is None:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        out = self.folder / f"{n:06d}.jpg"
        image.save(out, "JPEG", quality=90)
        return out

    def _crop(self, path: Path, box: Optional[List[int]]) -> Any:
        from PIL import Image

        if path != self._path:
            self._path, self._image = path, None
            try:
                with Image.open(path) as im:
                    self._image = im.convert("RGB")
            except (OSError, ValueError):  # gone or unreadable: the row keeps its path, no thumbnail
                pass
        if self._image is None:
            return None
        image = self._image
        if box:
            w, h = image.size
            x1, y1 = min(max(int(box[0]), 0), w - 1), min(max(int(box[1]), 0), h - 1)
            # At least 1 px: a small box can round to zero width at the model's resolution.
            image = image.crop((x1, y1, max(x1 + 1, min(int(box[2]), w)), max(y1 + 1, min(int(box[3]), h))))
        else:
            image = image.copy()
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        return image


def _wandb_images(wandb: Any, samples: List[Dict[str, Any]]) -> List[Any]:
    images = []
    for s in samples:
        if s["boxes"]:
            # Given boxes under "regions", proposed ones under "proposals": two layers the W&B UI
            # shows in their own colours and toggles apart.
            layers: Dict[str, Any] = {}
            for n, (x1, y1, x2, y2), label, source in s["boxes"]:
                layer = layers.setdefault("regions" if source == "input" else "proposals",
                                          {"box_data": [], "class_labels": {}})
                layer["class_labels"][int(n)] = f"box {n}" if source == "input" else f"proposed {n} ({source})"
                layer["box_data"].append({"position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2},
                                          "domain": "pixel", "class_id": int(n), "box_caption": label})
            images.append(wandb.Image(s["path"], caption=s["caption"], boxes=layers))
        else:
            images.append(wandb.Image(s["path"], caption=s["caption"]))
    return images


def _wandb_table(wandb: Any, table: Dict[str, Any]) -> Any:
    columns = table["columns"]
    thumb = columns.index("thumbnail")
    data = []
    for row in table["rows"]:
        row = list(row)
        row[thumb] = wandb.Image(str(row[thumb])) if row[thumb] is not None else None
        # Boxes as text: W&B tables type a column from its first value, and null boxes would clash with lists.
        for c in ("bbox", "input_bbox"):
            i = columns.index(c)
            row[i] = dumps(row[i]) if row[i] is not None else None
        data.append(row)
    return wandb.Table(columns=columns, data=data)



def one_region_per_image(prompt: Any) -> bool:
    """Whether the strategy a recorded ``prompt`` section names sends one crop per region (its
    images are shown without a box)."""
    from regioncap.strategies import recorded_strategy

    cls = recorded_strategy(prompt)
    return bool(cls and cls.one_region_per_image)
