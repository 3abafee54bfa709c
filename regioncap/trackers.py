"""The trackers beside W&B: ``logger=csv``, ``logger=tensorboard``, ``logger=mlflow``, and ``logger=many`` for several at once.

Each is a :class:`~regioncap.loggers.RunLogger` (built as ``cls(cfg.logger)``,
never failing the run) and records the same things, from what the run hands it
and the files it already wrote:

- the composed config (secrets masked by the job): ``csv/config.csv``; TensorBoard
  hyperparameters (the HPARAMS tab, scalars of the flattened config) and the whole
  config as text; MLflow params (flattened, ``model.max_pixels``) and ``config.json``;
- progress after every commit of a stage, the figures the W&B logger logs
  (``progress/<stage>/rows``, ``regions``, ``errors``, ``rows_per_s``,
  ``regions_per_s``, ``seconds``), at step = the stage's commit count:
  ``csv/progress.csv``, TensorBoard scalars, MLflow metric histories;
- the numeric scalars of ``metrics.json`` once at the end
  (:func:`regioncap.loggers.flatten_metrics`, ``stages/caption/seconds``):
  ``csv/metrics.csv`` (one row), TensorBoard scalars, MLflow metrics;
- the first ``log_images`` request images with their boxes and captions drawn on
  them (:func:`annotated_sample`): TensorBoard images, MLflow artifacts ``samples/NN.png``;
- the records and ``metrics.json`` as MLflow artifacts (``records/``); CSV writes a
  table of the regions instead (``csv/regions.csv``).

Sweeps group their jobs: CSV adds one row per job to ``SWEEP_DIR/metrics.csv``;
TensorBoard writes each job's events in its own run dir, all under the sweep dir
(``tensorboard --logdir SWEEP_DIR``); MLflow makes one parent run per sweep in the
experiment and each job a child run of it, in one store (by default
``SWEEP_DIR/mlflow.db``). The formats: docs/formats.md, "Trackers".

Only the standard library is imported at module level; ``tensorboard``, ``mlflow``
and Pillow are imported when a tracker that needs them starts.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from regioncap.components import check, optional, real, whole
from regioncap.loggers import RunLogger, WandbLogger, build_logger, collect, flatten_metrics
from regioncap.loggers import one_region_per_image, records_file_of as records_file
from regioncap.rundir import METRICS_FILE
from regioncap.stages import CaptionStage

log = logging.getLogger("regioncap")

#: The folder of a run dir that the CSV logger writes into.
CSV_DIR = "csv"
#: The folder of a run dir that the TensorBoard logger writes into (when ``logger.dir`` is null).
TENSORBOARD_DIR = "tensorboard"
#: The sweep's table of jobs (CSV logger), in the sweep dir.
SWEEP_TABLE = "metrics.csv"
#: The MLflow store made when no tracking URI is given, in the sweep dir (multirun) or the run dir.
MLFLOW_DB = "mlflow.db"
#: Artifacts of a store made here go beside it.
MLFLOW_ARTIFACTS = "mlartifacts"
#: Lines of an image's caption strip, and characters per line at most.
_STRIP_LINES = 12
_STRIP_CHARS = 100


# --------------------------------------------------------------------------- shared


def progress_values(stage: str, rows: int, regions: int, errors: int, seconds: float) -> Dict[str, Optional[float]]:
    """The progress figures of ``stage`` after a commit, named as every tracker logs them
    (``progress/<stage>/rows``...); a rate is None until a stage's clock has moved."""
    prefix = f"progress/{stage}"
    seconds = float(seconds)
    return {
        f"{prefix}/seconds": round(seconds, 3), f"{prefix}/rows": int(rows),
        f"{prefix}/regions": int(regions), f"{prefix}/errors": int(errors),
        f"{prefix}/rows_per_s": round(rows / seconds, 4) if seconds > 0 else None,
        f"{prefix}/regions_per_s": round(regions / seconds, 4) if seconds > 0 else None,
    }


def flatten_config(config: Any, prefix: str = "") -> Dict[str, Any]:
    """``config`` as ``{dotted.key: scalar}``: nested sections joined with ``.``, a list as its JSON
    text, an empty section as ``{}`` (so every key of the config is a row, a param or an hparam)."""
    flat: Dict[str, Any] = {}
    if isinstance(config, dict):
        if not config and prefix:
            flat[prefix.rstrip(".")] = "{}"
        for key, value in config.items():
            flat.update(flatten_config(value, f"{prefix}{key}."))
        return flat
    name = prefix.rstrip(".")
    if isinstance(config, (list, tuple)):
        flat[name] = json.dumps(config, default=str)
    else:
        flat[name] = config
    return flat


def annotated_sample(sample: Dict[str, Any], config: Dict[str, Any]) -> Any:
    """A sample of :func:`regioncap.loggers.collect` as one PIL image: the request image with its
    regions' boxes drawn in the run's own ``draw`` style (over a marked image they land on its
    marks) and a strip below with the sample's caption (``"<number>: <caption>"`` per region).

    For the tools that show plain images (TensorBoard, MLflow): W&B draws the boxes itself.
    """
    from PIL import Image, ImageDraw, ImageFont

    from regioncap.draw import DrawStyle, draw_marks

    with Image.open(sample["path"]) as im:
        image = im.convert("RGB")
    if sample.get("boxes"):
        try:
            style = DrawStyle.from_config(config.get("draw") or {})
        except (TypeError, ValueError, KeyError):  # a recorded draw section of another version
            style = DrawStyle()
        boxes = [xyxy for _, xyxy, _, _ in sample["boxes"]]
        labels = [_label(style.label_format, n) for n, _, _, _ in sample["boxes"]]
        image = draw_marks(image, boxes, labels, style)
    font = ImageFont.load_default()
    chars = max(20, min(_STRIP_CHARS, image.width // 6))
    lines: List[str] = []
    for line in str(sample.get("caption") or "").splitlines():
        lines += textwrap.wrap(line, chars) or [""]
    lines = lines[:_STRIP_LINES]
    line_px = 13
    out = Image.new("RGB", (image.width, image.height + line_px * len(lines) + 6), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((3, image.height + 3 + i * line_px), line, fill="black", font=font)
    return out


def _label(label_format: str, number: int) -> str:
    try:
        return label_format.format(n=number)
    except (KeyError, IndexError, ValueError):
        return str(number)


def samples_of(metrics: Dict[str, Any], run_dir: Path, config: Dict[str, Any], n_images: int) -> List[Dict[str, Any]]:
    """The first ``n_images`` request images of the run's final records, as :func:`collect` gives them."""
    path = records_file(metrics, run_dir)
    if path is None or n_images <= 0:
        return []
    samples, _ = collect(path, run_dir, n_images=n_images, table_rows=0,
                         references_key=(config.get("data") or {}).get("references_key"),
                         crops=one_region_per_image(config.get("prompt")))
    return samples


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (jobs of a sweep may run in parallel); no lock off POSIX."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class ToolLogger(RunLogger):
    """What the trackers here share: their settings, the one place their errors are swallowed
    (one warning per tracker, the run goes on), and what ``start`` keeps for later calls.

    A subclass implements ``_open`` (start), and any of ``_progress``, ``_run``, ``_close``.
    """

    @dataclass
    class Config(RunLogger.Config):
        #: The group of the jobs (MLflow parent run, the sweep table's column); null: the sweep dir's
        #: name in a multirun, none in a single run.
        group: Optional[str] = None

    def __init__(self, cfg: Optional[ToolLogger.Config] = None) -> None:
        super().__init__(cfg if cfg is not None else self.Config())
        self.opened = False
        self.config: Dict[str, Any] = {}
        self.run_dir = Path(".")
        self.run_name = ""
        self.group: Optional[str] = None
        self.steps: Dict[str, int] = {}
        #: What failed (``start``, ``log_progress``...): a progress call that failed once is not
        #: tried again, so a tool that has gone away does not hold every commit of the run.
        self.failed: set = set()
        self._warned = False

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with self._calls():
                return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a tracker must never fail the run
            self.failed.add(what)
            if not self._warned:
                self._warned = True
                log.warning("%s %s failed, the run goes on without it: %s: %s", type(self).name, what,
                            type(exc).__name__, (str(exc).strip().splitlines() or [""])[0])
            log.debug("%s %s failed", type(self).name, what, exc_info=True)
            return None

    def start(self, *, config: Dict[str, Any], run_dir: Path, name: str, group: Optional[str],
              job_type: str = CaptionStage.name) -> None:
        self.config, self.run_dir, self.run_name, self.group = config, Path(run_dir), name, group
        self.job_type = job_type
        self._guard("start", self._open)
        self.opened = not self._warned  # a tracker that could not start logs nothing more

    def log_progress(self, stage: str, rows: int, regions: int, errors: int, seconds: float) -> None:
        if self.opened and "log_progress" not in self.failed:
            self.steps[stage] = step = self.steps.get(stage, 0) + 1
            self._guard("log_progress", self._progress, stage, step,
                        progress_values(stage, rows, regions, errors, seconds))

    def log_run(self, *, metrics: Dict[str, Any], run_dir: Path) -> None:
        if self.opened:
            self._guard("log_run", self._run, metrics, Path(run_dir))

    def finish(self, exit_code: int = 0) -> None:
        opened, self.opened = self.opened, False
        if opened:
            self._guard("finish", self._close, int(exit_code))

    # What each tracker does; the defaults do nothing.
    def _calls(self) -> Any:
        """A context every call into the tool runs in (MLflow: its HTTP retry settings)."""
        return _nothing()

    def _open(self) -> Any:
        return None

    def _progress(self, stage: str, step: int, values: Dict[str, Optional[float]]) -> None:
        return None

    def _run(self, metrics: Dict[str, Any], run_dir: Path) -> None:
        return None

    def _close(self, exit_code: int) -> None:
        return None


# --------------------------------------------------------------------------- CSV


class CsvLogger(ToolLogger):
    """``logger=csv``: plain CSV files in ``RUN_DIR/csv/``, and one row per job in the sweep's table."""

    @dataclass
    class Config(ToolLogger.Config):
        #: ``regions.csv``: one row per region (caption, boxes, references, scores).
        log_table: bool = True
        #: Regions in ``regions.csv`` at most; null: every region.
        table_rows: Optional[int] = field(default=None, metadata=check(optional(whole(0))))
        #: Add this job's row to ``SWEEP_DIR/metrics.csv`` in a multirun.
        sweep_table: bool = True

    name = "csv"

    def _open(self) -> None:
        self.dir = self.run_dir / CSV_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics: Dict[str, Any] = {}
        _write_rows(self.dir / "config.csv", ["key", "value"],
                    [[k, _cell(v)] for k, v in flatten_config(self.config).items()])
        log.info("CSV: %s", self.dir)

    def _progress(self, stage: str, step: int, values: Dict[str, Optional[float]]) -> None:
        path = self.dir / "progress.csv"
        row = {"stage": stage, "step": step, **{k.rsplit("/", 1)[1]: v for k, v in values.items()}}
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow({k: _cell(v) for k, v in row.items()})

    def _run(self, metrics: Dict[str, Any], run_dir: Path) -> None:
        self.metrics = flatten_metrics(metrics)
        path = records_file(metrics, run_dir)
        if path is not None and self.cfg.log_table:
            write_regions(path, self.dir / "regions.csv", references_key=(self.config.get("data") or {}).get(
                "references_key"), limit=self.cfg.table_rows)

    def _close(self, exit_code: int) -> None:
        row = {"name": self.run_name, "group": self.group or "", "exit_code": exit_code,
               **{k: _cell(v) for k, v in self.metrics.items()}}
        _write_rows(self.dir / "metrics.csv", list(row), [list(row.values())])
        if self.sweep_dir is not None and self.cfg.sweep_table:
            table = Path(self.sweep_dir) / SWEEP_TABLE
            try:
                job = str(self.run_dir.resolve().relative_to(Path(self.sweep_dir).resolve()))
            except ValueError:
                job = str(self.run_dir)
            add_sweep_row(table, {"job": job, **row})
            log.info("CSV: %s (this job's row in %s)", self.dir / "metrics.csv", table)


#: The columns of ``regions.csv``.
REGION_COLUMNS = ("row_id", "region", "number", "chunk", "status", "image", "bbox", "input_bbox", "caption",
                  "reference", "missing", "reason", "flags", "scores")


def write_regions(records: Path, out: Path, *, references_key: Optional[str], limit: Optional[int] = None) -> int:
    """One CSV row per region of ``records`` (at most ``limit``), streamed: memory stays flat with the
    rows. The scores are those the records hold (``scores`` as JSON text). Returns the rows written."""
    from regioncap.metrics import region_reference_texts
    from regioncap.record_types import Record, Region, RequestSpec
    from regioncap.records import read_jsonl

    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(REGION_COLUMNS)
        for raw in read_jsonl(records):
            rec = Record.from_dict(raw)
            image_of = {rid: spec.image for spec in rec.requests or [] if isinstance(spec, RequestSpec)
                        for rid in spec.region_ids or []}
            for reg in rec.iter_regions():
                if limit is not None and n >= limit:
                    break
                if not isinstance(reg, Region):
                    continue  # a hand-edited file: not a region object
                refs = region_reference_texts(rec, reg, references_key)
                writer.writerow([_cell(v) for v in (
                    rec.id, reg.id, reg.number, reg.chunk, rec.status,
                    image_of.get(reg.id), reg.bbox, reg.input_bbox, reg.caption,
                    " | ".join(refs) or None, bool(reg.missing), reg.reason,
                    ", ".join(map(str, reg.flags or [])) or None, reg.scores)])
                n += 1
            if limit is not None and n >= limit:
                break
    os.replace(tmp, out)
    return n


def _cell(value: Any) -> Any:
    """A CSV cell: lists and dicts as JSON text, None as empty."""
    if value is None:
        return ""
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, default=str)
    return value


def _write_rows(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    os.replace(tmp, path)


def add_sweep_row(table: Path, row: Dict[str, Any]) -> None:
    """Put ``row`` in the sweep's CSV ``table`` (keyed by ``job``: a job run again replaces its row),
    under a lock; the columns are the union of every job's, in first-seen order."""
    with _locked(table.with_name("." + table.name + ".lock")):
        rows: List[Dict[str, Any]] = []
        if table.exists():
            with open(table, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("job") != str(row["job"])]
        rows.append({k: v for k, v in row.items()})
        columns: List[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        rows.sort(key=lambda r: _job_order(str(r.get("job"))))
        _write_rows(table, columns, [[r.get(c, "") for c in columns] for r in rows])


def _job_order(job: str) -> Tuple[int, Any]:
    return (0, int(job)) if job.isdigit() else (1, job)


# --------------------------------------------------------------------------- TensorBoard


class TensorBoardLogger(ToolLogger):
    """``logger=tensorboard``: an event file in ``RUN_DIR/tensorboard/`` (or ``logger.dir/GROUP/NAME``)."""

    @dataclass
    class Config(ToolLogger.Config):
        #: Root of the event dirs; null: each job's own ``RUN_DIR/tensorboard`` (a sweep's jobs
        #: then sit under the sweep dir: ``tensorboard --logdir SWEEP_DIR``). Set: ``DIR/GROUP/NAME``.
        dir: Optional[str] = None
        #: Request images logged with their boxes and captions drawn on them (0 = none).
        log_images: int = field(default=8, metadata=check(whole(0)))
        #: The composed config in the HPARAMS tab (scalars of the flattened config) and as text.
        log_hparams: bool = True

    name = "tensorboard"
    requires = ("tensorboard",)
    extra = "trackers"

    def _open(self) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.events_dir = tensorboard_dir(self.cfg.dir, self.run_dir, self.group, self.run_name)
        self.writer = EventFileWriter(str(self.events_dir))
        if self.cfg.log_hparams:
            from tensorboard.plugins.hparams import summary_v2 as hp

            hparams = {k: v for k, v in flatten_config(self.config).items()
                       if isinstance(v, (bool, int, float, str)) and not k.startswith("hydra.")}
            self._event(0, hp.hparams_pb(hparams, trial_id=self.run_name))
            text = "```json\n" + json.dumps(self.config, indent=2, default=str) + "\n```"
            self._event(0, _text_summary("config", text))
        where = self.sweep_dir if self.sweep_dir is not None and self.cfg.dir is None else self.events_dir
        log.info("TensorBoard: %s (view: tensorboard --logdir %s)", self.events_dir, where)

    def _event(self, step: int, summary: Any) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.writer.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def _scalars(self, step: int, values: Dict[str, Any]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._event(step, Summary(value=[Summary.Value(tag=k, simple_value=float(v))
                                         for k, v in values.items() if v is not None]))

    def _progress(self, stage: str, step: int, values: Dict[str, Optional[float]]) -> None:
        self._scalars(step, values)
        self.writer.flush()  # so a running TensorBoard shows it

    def _run(self, metrics: Dict[str, Any], run_dir: Path) -> None:
        import io

        from tensorboard.compat.proto.summary_pb2 import Summary

        self._scalars(0, flatten_metrics(metrics))
        for i, sample in enumerate(samples_of(metrics, run_dir, self.config, self.cfg.log_images)):
            image = annotated_sample(sample, self.config)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            self._event(0, Summary(value=[Summary.Value(tag=f"samples/{i:02d}", image=Summary.Image(
                height=image.height, width=image.width, colorspace=3, encoded_image_string=buf.getvalue()))]))
            self._event(0, _text_summary(f"samples/{i:02d}/caption", "    " + sample["caption"].replace(
                "\n", "\n    ")))
        self.writer.flush()

    def _close(self, exit_code: int) -> None:
        self._scalars(0, {"exit_code": exit_code})
        self.writer.close()


def tensorboard_dir(root: Optional[str], run_dir: Path, group: Optional[str], name: str) -> Path:
    """Where a job's events go: ``RUN_DIR/tensorboard`` with no ``root``; else ``ROOT/GROUP/NAME``
    (``ROOT/NAME`` outside a group; a ``/`` in a name becomes ``_``)."""
    if not root:
        return Path(run_dir) / TENSORBOARD_DIR
    parts = [p.replace("/", "_").replace(os.sep, "_") for p in (group, name) if p]
    return Path(root).expanduser().joinpath(*parts)


def _text_summary(tag: str, text: str) -> Any:
    """A TensorBoard text summary (the TEXT tab renders markdown), made without TensorFlow."""
    from tensorboard.compat.proto import types_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text import metadata

    tensor = TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
                         tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(tag, ""), tensor=tensor)])


# --------------------------------------------------------------------------- MLflow


class MlflowLogger(ToolLogger):
    """``logger=mlflow``: one MLflow run per job; the jobs of a sweep are children of one parent run."""

    @dataclass
    class Config(ToolLogger.Config):
        #: The tracking store: ``sqlite:///PATH``, ``http://host:5000``, ``databricks``...; null:
        #: ``$MLFLOW_TRACKING_URI`` if set, else a SQLite store ``mlflow.db`` in the sweep dir
        #: (multirun) or the run dir.
        tracking_uri: Optional[str] = None
        experiment: str = "regioncap"
        #: Where a new experiment keeps its artifacts; null: ``mlartifacts/`` beside a SQLite
        #: store, else the server's default.
        artifact_location: Optional[str] = None
        tags: Dict[str, str] = field(default_factory=dict)
        #: Request images logged with their boxes and captions drawn on them (0 = none).
        log_images: int = field(default=8, metadata=check(whole(0)))
        #: The records and metrics.json as artifacts (``records/``; copied into the store).
        log_artifact: bool = True
        #: With a tracking server: seconds each request may take, and tries after a failed one.
        #: MLflow's own defaults (120 s, 7 tries with a doubling back-off) hold a run for minutes
        #: when the server is down; these give up in seconds and the run goes on without it.
        http_timeout_s: float = field(default=10.0, metadata=check(real(0, above=True)))
        http_retries: int = field(default=2, metadata=check(whole(0)))

    name = "mlflow"
    requires = ("mlflow",)
    extra = "trackers"

    def _open(self) -> None:
        from mlflow.tracking import MlflowClient

        root = Path(self.sweep_dir) if self.sweep_dir is not None else self.run_dir
        uri = self.cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve() / MLFLOW_DB}"
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.uri = uri
        client = self.client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(self.cfg.experiment)
        if experiment is not None:
            exp_id = experiment.experiment_id
        else:
            location = self.cfg.artifact_location or _artifacts_beside(uri)
            exp_id = _create_experiment(client, self.cfg.experiment, location)
        tags = {"regioncap.run_dir": str(self.run_dir), "regioncap.job_type": self.job_type,
                **{str(k): str(v) for k, v in (self.cfg.tags or {}).items()}}
        self.parent_id = None
        if self.group:
            tags["regioncap.group"] = self.group
            self.parent_id = self._parent(exp_id)
            tags["mlflow.parentRunId"] = self.parent_id
        self.run_id = client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k[:250], str(_cell(v))[:6000]) for k, v in flatten_config(self.config).items()]
        for i in range(0, len(params), 100):  # the store takes 100 params per batch
            client.log_batch(self.run_id, params=params[i:i + 100])
        client.log_dict(self.run_id, self.config, "config.json")
        ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith(("http", "databricks")) else uri
        log.info("MLflow run %s%s in experiment %s: %s (view: %s)", self.run_name,
                 f" (parent run {self.group})" if self.group else "", self.cfg.experiment, self.run_id, ui)

    @contextmanager
    def _calls(self) -> Iterator[None]:
        # MLflow reads these at each request; set only around regioncap's own calls, and put back.
        values = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(self.cfg.http_timeout_s))),
                  "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.cfg.http_retries)}
        before = {k: os.environ.get(k) for k in values}
        os.environ.update({k: v for k, v in values.items() if before[k] is None})  # the user's own win
        try:
            yield
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)

    def _parent(self, exp_id: str) -> str:
        """The sweep's parent run (tagged ``regioncap.sweep``), made by the first job that gets here."""
        client = self.client
        lock = Path(self.sweep_dir) / ".mlflow-parent.lock" if self.sweep_dir is not None else None
        with _locked(lock) if lock is not None else _nothing():
            found = client.search_runs([exp_id], filter_string=f"tags.`regioncap.sweep` = '{_quote(self.group)}'",
                                       max_results=1)
            if found:
                return found[0].info.run_id
            tags = {"regioncap.sweep": str(self.group)}
            if self.sweep_dir is not None:
                tags["regioncap.sweep_dir"] = str(self.sweep_dir)
            return client.create_run(exp_id, run_name=str(self.group), tags=tags).info.run_id

    def _metrics(self, step: int, values: Dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for k, v in values.items() if v is not None]
        for i in range(0, len(metrics), 1000):  # the store takes 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _progress(self, stage: str, step: int, values: Dict[str, Optional[float]]) -> None:
        self._metrics(step, values)

    def _run(self, metrics: Dict[str, Any], run_dir: Path) -> None:
        self._metrics(0, flatten_metrics(metrics))
        for i, sample in enumerate(samples_of(metrics, run_dir, self.config, self.cfg.log_images)):
            self.client.log_image(self.run_id, annotated_sample(sample, self.config), f"samples/{i:02d}.png")
        if self.cfg.log_artifact:
            for path in (records_file(metrics, run_dir), run_dir / METRICS_FILE):
                if path is not None and path.is_file():
                    self.client.log_artifact(self.run_id, str(path), "records")

    def _close(self, exit_code: int) -> None:
        status = "FINISHED" if exit_code == 0 else "FAILED"
        self.client.set_terminated(self.run_id, status)
        if self.parent_id is not None:
            # The parent ends with the last job that ends; a job that starts later reopens nothing:
            # its run is a child all the same.
            self.client.set_terminated(self.parent_id, "FINISHED")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _quote(text: Optional[str]) -> str:
    return str(text).replace("'", "\\'")


def _artifacts_beside(uri: str) -> Optional[str]:
    """``mlartifacts/`` beside a SQLite store, as a file URI; None (the server's default) otherwise.

    MLflow's own default for a SQLite store is ``./mlruns`` in the working directory: a run must
    not depend on where it was started from.
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / MLFLOW_ARTIFACTS).as_uri()


def _create_experiment(client: Any, name: str, location: Optional[str]) -> str:
    """Create ``name``; when a parallel job created it first, use theirs."""
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - RESOURCE_ALREADY_EXISTS from a job that got there first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# --------------------------------------------------------------------------- several


#: The trackers ``logger=many`` can use, by the key of their settings.
MANY = ("csv", "tensorboard", "mlflow", "wandb")


def _settings_of(cls: type) -> Any:
    """The default settings of tracker ``cls``, naming it (``_target_``), as its option file has them."""
    return cls.Config(_target_=f"{cls.__module__}.{cls.__qualname__}")


def _known_trackers(value: Any) -> bool:
    try:
        names = [str(v) for v in value]
    except TypeError:
        return False
    return len(names) == len(set(names)) and all(n in MANY for n in names)


class ManyLoggers(RunLogger):
    """``logger=many``: the trackers ``logger.use`` names, each with its own settings
    (``logger.csv``, ``logger.tensorboard``, ``logger.mlflow``, ``logger.wandb``), fed the same calls.

    One failing tracker warns and leaves the others running.
    """

    @dataclass
    class Config(RunLogger.Config):
        #: The trackers used, in order.
        use: List[str] = field(default_factory=lambda: ["csv", "tensorboard"], metadata=check(
            (_known_trackers, f"a list of distinct names out of {', '.join(MANY)}")))
        #: The group of every tracker used (W&B group, MLflow parent run, the CSV sweep table's column);
        #: null: the sweep dir's name in a multirun, none in a single run.
        group: Optional[str] = None
        #: Each tracker's settings, as ``logger=<name>`` has them.
        csv: CsvLogger.Config = field(default_factory=lambda: _settings_of(CsvLogger))
        tensorboard: TensorBoardLogger.Config = field(default_factory=lambda: _settings_of(TensorBoardLogger))
        mlflow: MlflowLogger.Config = field(default_factory=lambda: _settings_of(MlflowLogger))
        wandb: WandbLogger.Config = field(default_factory=lambda: _settings_of(WandbLogger))

    name = "many"

    def __init__(self, cfg: ManyLoggers.Config) -> None:
        super().__init__(cfg)
        self.loggers = [build_logger(getattr(cfg, key)) for key in cfg.use]

    @classmethod
    def parts(cls, node: Any) -> List[Tuple[str, Any]]:
        return [(f"logger.{key}", getattr(node, key)) for key in node.use or () if hasattr(node, key)]

    def start(self, *, config: Dict[str, Any], run_dir: Path, name: str, group: Optional[str],
              job_type: str = CaptionStage.name) -> None:
        for tracker in self.loggers:
            tracker.sweep_dir = self.sweep_dir
            tracker.start(config=config, run_dir=run_dir, name=name, group=group, job_type=job_type)

    def log_progress(self, stage: str, rows: int, regions: int, errors: int, seconds: float) -> None:
        for tracker in self.loggers:
            tracker.log_progress(stage, rows, regions, errors, seconds)

    def log_run(self, *, metrics: Dict[str, Any], run_dir: Path) -> None:
        for tracker in self.loggers:
            tracker.log_run(metrics=metrics, run_dir=run_dir)

    def finish(self, exit_code: int = 0) -> None:
        for tracker in self.loggers:
            try:
                tracker.finish(exit_code)
            except Exception as exc:  # noqa: BLE001 - one tracker's finish must not skip the others'
                log.warning("%s finish failed: %s: %s", type(tracker).name, type(exc).__name__, exc)
