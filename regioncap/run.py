"""The run object: built once from the composed config, it runs the stages.

``build_run`` is the one place where objects are built from the config (data
source, draw style, prompt settings; the engine when the caption stage starts).
The stages stream: rows are read, processed and written one at a time
(visualize) or one engine batch at a time (caption), so memory does not grow
with the data set.

Outputs, all under ``output_dir``:
  visualize.jsonl   one record per input row: boxes, marked images, prompts
  captions.jsonl    the same rows with answers, parsed regions and errors
  images/           the marked images (or crops) sent to the model
  metrics.json      counts, timings, throughput, tokens
  run_key.json      the settings that decide the answers (a resume must match them)

Both records files are append-only and written in commits (write, flush,
fsync); ``resume=true`` goes on from what a killed or stopped run committed
(docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from regioncap import boxes as bx
from regioncap import prompts
from regioncap.data import InputRow, check_shards, iter_rows, resolve_path
from regioncap.errors import RunError  # noqa: F401  (re-exported: regioncap.run.RunError)
from regioncap.draw import DrawStyle, draw_marks
from regioncap.engines.base import Engine, Request, Response, Sampling
from regioncap.images import ImageLoadError, crop_with_margin, load_image, resize_to, save_image, target_size
from regioncap.metrics import annotate_record
from regioncap.prepare import RowPool, resolve_workers
from regioncap.records import (CommitWriter, CorruptRecordsError, dumps, read_jsonl, rewrite_atomically, scan_records,
                               write_text_atomically)

log = logging.getLogger("regioncap")

VISUALIZE_FILE = "visualize.jsonl"
CAPTIONS_FILE = "captions.jsonl"
METRICS_FILE = "metrics.json"
RUN_KEY_FILE = "run_key.json"
IMAGES_DIR = "images"

#: Keys regioncap writes; an input field with one of these names is kept under ``input``.
_OWN_KEYS = {
    "id", "index", "image", "image_path", "type", "bbox", "bbox_format", "image_size", "input_size",
    "normalized_bbox", "valid_bboxes_num", "dropped_boxes", "clipped_boxes", "regions", "requests",
    "image_with_bbox", "prompt", "result_file", "error", "status", "answer", "tokens", "timing", "line",
    "input",
}


class Interrupted(RunError):
    """SIGINT or SIGTERM stopped the run after its last commit; ``resume=true`` goes on."""

    def __init__(self, signum: int, stage: str, rows: int) -> None:
        self.signum, self.stage, self.rows = signum, stage, rows
        super().__init__(f"stopped by {signal.Signals(signum).name} in the {stage} stage "
                         f"after committing {rows} row(s) of this run")


@dataclass
class StageStats:
    name: str
    rows: int = 0
    seconds: float = 0.0
    errors: Counter = field(default_factory=Counter)
    #: Process that ran the stage (the caption stage may run in a child).
    pid: Optional[int] = None
    #: Rows a resume found already done and did not redo.
    skipped: int = 0
    #: Caption rows taken out of the file to be redone (``retry_errors``).
    retried: int = 0

    def commit(self, writer: Any, records: List[Dict[str, Any]]) -> None:
        """Commit ``records`` through ``writer`` and count them, error rows by kind."""
        for rec in records:
            if rec["status"] == "error":
                self.errors[rec["error"]["kind"]] += 1
        writer.commit(records)
        self.rows += len(records)


def seed_everything(seed: int) -> None:
    """Seed every RNG regioncap or its engines use, before anything is built."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy comes with Pillow users almost always; not required
        pass
    import sys

    if "torch" in sys.modules:  # engines seed torch per request; this covers model init
        sys.modules["torch"].manual_seed(seed)


def draw_style(draw_cfg: Any) -> DrawStyle:
    return DrawStyle(
        palette=list(draw_cfg.palette), line_width=float(draw_cfg.line_width),
        min_line_px=int(draw_cfg.min_line_px), label_size=float(draw_cfg.label_size),
        min_label_px=int(draw_cfg.min_label_px), dim=float(draw_cfg.dim),
    )


# ------------------------------------------------------------ stop signals


class _StopFlag:
    """Set by the SIGINT/SIGTERM handler; stages look at it after each commit."""

    signum: Optional[int] = None


_STOP = _StopFlag()


def stop_requested() -> Optional[int]:
    """The signal that asked the run to stop, or None."""
    return _STOP.signum


@contextmanager
def stop_on_signals(*, escalate: bool = True) -> Iterator[None]:
    """SIGINT/SIGTERM set a flag instead of killing the run; the old handlers come back after.

    The stages stop after committing the batch in hand, so the records files
    never end in a half-written line. With ``escalate``, a second signal stops
    at once (SIGINT raises ``KeyboardInterrupt``, SIGTERM exits 143): a person
    pressing Ctrl-C twice means it. Outside the main thread (where Python
    cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if _STOP.signum is not None and escalate:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        if _STOP.signum is None:
            log.warning("%s: stopping after the current batch is written%s", signal.Signals(signum).name,
                        " (send it again to stop at once)" if escalate else "")
        _STOP.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _STOP.signum = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _STOP.signum = None


# ---------------------------------------------------------------- run key

#: Config sections whose every field decides the answers (their ``name`` aside).
_KEY_SECTIONS = ("prompt", "draw", "sampling")
_KEY_MODEL = ("path", "family", "revision", "min_pixels", "max_pixels", "patch_size", "merge_size", "dtype",
              "max_model_len")
#: Data fields that decide which rows are read and how; ``limit`` is left out
#: so a resume with a larger limit extends a run.
_KEY_DATA = ("path", "source", "hf_builder", "hf_config", "split", "hf_kwargs", "image_key", "bbox_key", "id_key",
             "bbox_format", "skip")
#: Data fields of the annotation adapters (coco, vg, refcoco) and their defaults: in the key only when
#: set otherwise, so the key (and a resume) of a run that does not use them is as before.
_KEY_DATA_ADAPTERS = {"images_dir": None, "coco_iscrowd": "keep", "ref_split": None}


def run_key_values(cfg: Any) -> Dict[str, Any]:
    """The settings that decide a run's answers: model, prompt, drawing, sampling, data, engine.

    Settings that change only how fast or how robustly answers come (batch
    sizes, retries, logging, ``engine.fail_keys``, ``data.limit``) are left out,
    so changing them does not block a resume.
    """
    from omegaconf import OmegaConf

    def plain(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    values: Dict[str, Any] = {
        "model": {k: plain(cfg.model.get(k)) for k in _KEY_MODEL},
        "engine": {"name": cfg.engine.name, "structured_outputs": cfg.engine.get("structured_outputs")},
        "max_boxes": int(cfg.max_boxes),
        "seed": int(cfg.seed),
    }
    for section in _KEY_SECTIONS:
        values[section] = {k: v for k, v in plain(cfg[section]).items() if k != "name"}
    data = {k: plain(cfg.data.get(k)) for k in _KEY_DATA}
    if data["path"] and not str(data["path"]).startswith("pkg://") and resolve_path(str(data["path"])).exists():
        data["path"] = str(resolve_path(str(data["path"])).resolve())
    if cfg.data.get("num_shards", 1) != 1:
        # Only when sharded, so the key (and a resume) of an unsharded run is as before.
        data["num_shards"], data["shard_index"] = int(cfg.data.num_shards), int(cfg.data.shard_index)
    for k, default in _KEY_DATA_ADAPTERS.items():
        if cfg.data.get(k, default) != default:
            data[k] = plain(cfg.data.get(k))
    values["data"] = data
    return values


def run_key_hash(values: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def key_changes(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    """``["max_boxes: 10 -> 2", ...]``: what differs between two run keys."""
    changes = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += key_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            changes.append(f"{prefix}{k}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return changes


class RegionCapRun:
    """One run: ``visualize`` then ``caption`` over the configured data."""

    def __init__(self, cfg: Any, *, model_path: Optional[str] = None, isolate: bool = False) -> None:
        self.cfg = cfg
        #: Run the caption stage in a spawned child process (see ``_caption_in_child``).
        self.isolate = isolate
        self.out = Path(cfg.output_dir)
        self.images_dir = self.out / IMAGES_DIR
        self.style = draw_style(cfg.draw)
        self.model_path = model_path
        self.engine: Optional[Engine] = None
        self.stats: Dict[str, StageStats] = {}
        #: Image preparation processes (``workers``), resolved when first needed.
        self.workers: Optional[int] = None
        #: How the stages ran: ``{"overlap", "workers", "seconds", "reason"}`` (metrics ``pipeline``).
        self.pipeline: Dict[str, Any] = {}
        if cfg.prompt.strategy not in prompts.STRATEGIES:
            raise RunError(f"prompt.strategy must be one of {prompts.STRATEGIES}, got {cfg.prompt.strategy!r}")
        if cfg.prompt.answer_format not in prompts.ANSWER_FORMATS:
            raise RunError(f"prompt.answer_format must be one of {prompts.ANSWER_FORMATS}")
        if cfg.data.bbox_format not in bx.BBOX_FORMATS:
            raise RunError(f"data.bbox_format must be one of {bx.BBOX_FORMATS}, got {cfg.data.bbox_format!r}")
        if cfg.max_boxes < 1:
            raise RunError(f"max_boxes must be at least 1, got {cfg.max_boxes}")
        check_shards(cfg.data)
        unknown = [s for s in cfg.stages if s not in ("visualize", "caption")]
        if unknown:
            raise RunError(f"unknown stage(s) {unknown}; stages are 'visualize' and 'caption'")

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        """Run the configured stages and return the run's metrics.

        With both stages, ``overlap`` and at least one worker, the stages
        stream into each other (:meth:`visualize_and_caption`); otherwise they
        run one after the other. Either way the outputs are the same.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepare()
        overlap, reason = self.overlap_mode()
        workers = self._workers()
        self.pipeline = {"overlap": overlap, "workers": workers}
        if not overlap:
            self.pipeline["reason"] = reason
        log.info("pipeline: %s; image preparation in %s", "visualize and caption overlap (streaming)" if overlap
                 else f"stages one after the other ({reason})",
                 f"{workers} worker process(es)" if workers else "the main process")
        start = time.perf_counter()
        try:
            if overlap:
                self.visualize_and_caption()
            else:
                if "visualize" in self.cfg.stages:
                    self.visualize()
                if "caption" in self.cfg.stages:
                    if not (self.out / VISUALIZE_FILE).exists():
                        raise RunError(f"{self.out / VISUALIZE_FILE} is missing: run the visualize stage first")
                    self.caption()
        finally:
            self.pipeline["seconds"] = time.perf_counter() - start
        metrics = self.metrics()
        (self.out / METRICS_FILE).write_text(dumps(metrics) + "\n", encoding="utf-8")
        return metrics

    # ------------------------------------------------------------- resume
    def prepare(self) -> None:
        """Refuse to overwrite an earlier run's outputs, check a resume's settings, write ``run_key.json``.

        Without ``resume``, a stage whose records file already holds rows is
        refused (the visualize stage also refuses when captions exist: they
        would no longer match). With ``resume``, the settings that decide the
        answers must match the ones the run started with, unless ``resume_force``.
        """
        cfg = self.cfg
        self._lock()
        vis, cap = self.out / VISUALIZE_FILE, self.out / CAPTIONS_FILE
        writes = ([vis, cap] if "visualize" in cfg.stages else []) + ([cap] if "caption" in cfg.stages else [])
        existing = [p.name for p in dict.fromkeys(writes) if p.exists() and p.stat().st_size > 0]
        values = run_key_values(cfg)
        key_file = self.out / RUN_KEY_FILE
        old = None
        if key_file.exists():
            try:
                old = json.loads(key_file.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise RunError(f"{key_file} is not JSON ({exc}); move it away to resume without the check") from None
        changes = key_changes(old["values"], values) if old else []
        if not cfg.resume:
            if cfg.retry_errors or cfg.resume_force:
                raise RunError("retry_errors=true and resume_force=true go with resume=true "
                               f"(python -m regioncap resume=true hydra.run.dir={self.out} ...)")
            if existing:
                raise RunError(
                    f"{self.out} already holds {' and '.join(existing)} from an earlier run; regioncap does not "
                    f"overwrite them. To go on with that run: resume=true hydra.run.dir={self.out} (with its "
                    f"overrides); for a fresh run: a new hydra.run.dir")
            if changes:  # a caption-only run over an earlier visualize stage
                log.warning("%s was made with other settings; they changed: %s", vis, "; ".join(changes))
        elif changes:
            listed = "\n  ".join(changes)
            if not cfg.resume_force:
                raise RunError(
                    f"resume refused: {self.out} was started with other settings than these, and they decide the "
                    f"answers. Changed:\n  {listed}\nResume with the original overrides, or add resume_force=true "
                    f"to go on anyway (the rows already done keep their old answers), or start a new hydra.run.dir")
            log.warning("resume_force=true: resuming although these settings changed:\n  %s", listed)
        elif old is None and existing:
            log.warning("resume: %s has no %s; cannot check that the settings match", self.out, RUN_KEY_FILE)
        key = {"hash": run_key_hash(values), "values": values}
        if old and changes:
            key["previous"] = [*old.get("previous", []), {"hash": old.get("hash"), "values": old["values"]}]
        write_text_atomically(key_file, dumps(key) + "\n")
        if cfg.resume:
            log.info("resume: run key %s%s", key["hash"], f" (was {old.get('hash')})" if changes else "")

    def _lock(self) -> None:
        """Hold ``DIR/.lock`` for the run: two processes appending to one records file would mix rows."""
        try:
            import fcntl
        except ImportError:  # not on POSIX: no lock, as before
            return
        fh = open(self.out / ".lock", "a")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise RunError(f"another regioncap process is writing {self.out} (it holds {self.out / '.lock'}); "
                           f"wait for it to end, or use another hydra.run.dir") from None
        self._lock_fh = fh

    def _done_rows(self, path: Path, stage: str, retry: bool = False) -> Tuple[Dict[int, str], set]:
        """``({index: id}, {indexes to redo})`` of a records file, its torn tail cut off."""
        def pick(rec: Dict[str, Any]) -> Tuple[Any, Any, bool]:
            err = rec.get("error") or {}
            return rec.get("index"), rec.get("id"), err.get("stage") == "caption"

        try:
            picks, cut = scan_records(path, pick)
        except CorruptRecordsError as exc:
            raise RunError(str(exc)) from None
        if cut:
            log.warning("resume: %s", cut)
        done: Dict[int, str] = {}
        redo = set()
        for n, (index, row_id, failed) in enumerate(picks, 1):
            if not isinstance(index, int):
                raise RunError(f"{path}: record {n} has no integer 'index'; it was not written by regioncap's "
                               f"{stage} stage: start a new hydra.run.dir")
            if index in done:
                raise RunError(f"{path}: row index {index} ({row_id}) is there twice; every row must be there "
                               f"once: start a new hydra.run.dir")
            done[index] = row_id
            if retry and failed:
                redo.add(index)
        log.info("resume: %s holds %d row(s)%s", path.name, len(done),
                 f"; {len(redo)} caption error row(s) will be redone" if retry else "")
        return done, redo

    @staticmethod
    def _check_same_row(path: Path, index: int, done_id: Any, row_id: Any) -> None:
        if done_id != row_id:
            raise RunError(f"resume: input row {index} has id {row_id!r} but {path} holds id {done_id!r} for it: "
                           f"the data changed since the run started; start a new hydra.run.dir")

    # ------------------------------------------------------------ pipeline
    def _workers(self) -> int:
        if self.workers is None:
            self.workers = resolve_workers(self.cfg)
        return self.workers

    def overlap_mode(self) -> Tuple[bool, str]:
        """``(True, "")`` when the stages stream into each other, else ``(False, why not)``."""
        if not {"visualize", "caption"} <= set(self.cfg.stages):
            return False, f"only {', '.join(self.cfg.stages) or 'no'} stage requested"
        if self.isolate:
            return False, "the caption stage runs in its own process (engine.isolate)"
        if self._ray_executor():
            return False, "executor=ray: the caption stage reads visualize.jsonl on the cluster"
        if not self.cfg.get("overlap", True):
            return False, "overlap=false"
        if self._workers() == 0:
            return False, "workers=0: images are prepared in the main process"
        return True, ""

    def _ray_executor(self) -> bool:
        return (self.cfg.get("executor") or {}).get("name") == "ray"

    def visualize_and_caption(self) -> StageStats:
        """Both stages as one stream: the engine captions a batch while the workers prepare the next rows.

        Every row is committed to ``visualize.jsonl`` before its caption record
        is written to ``captions.jsonl``, both in input order, so the files
        (and a resume from them) are what running the stages one after the
        other gives. A resume captions the rows an earlier run left in
        ``visualize.jsonl`` first, then the new ones. The visualize stage's
        seconds are the time until its last row was committed; the caption
        stage's, the whole stream's.
        """
        vis_stats = self.stats.setdefault("visualize", StageStats("visualize"))
        start = time.perf_counter()
        path, done, resume = self._visualize_begin(vis_stats)
        commits = self._visualize_commits(vis_stats, path, done, resume, start)

        def records() -> Iterator[Dict[str, Any]]:
            if done:  # rows an earlier run committed: exactly the file's records after the torn-tail cut
                yield from itertools.islice(read_jsonl(path), len(done))
            for batch in commits:
                yield from batch

        try:
            return self.caption(records=records())
        finally:
            commits.close()
            if vis_stats.skipped:
                log.info("resume: visualize skipped %d row(s) already done, did %d", vis_stats.skipped,
                         vis_stats.rows)

    # ------------------------------------------------------------ visualize
    def visualize(self) -> StageStats:
        """Read every row, validate boxes, resize, draw marks, write images and records.

        Records are committed ``commit_every`` rows at a time; on resume the
        rows already in ``visualize.jsonl`` are skipped. Rows are prepared in
        ``workers`` processes (records still in input order).
        """
        stats = self.stats.setdefault("visualize", StageStats("visualize"))
        start = time.perf_counter()
        path, done, resume = self._visualize_begin(stats)
        for _ in self._visualize_commits(stats, path, done, resume, start):
            pass
        return self._end_of_stage(stats)

    def _visualize_begin(self, stats: StageStats) -> Tuple[Path, Dict[int, str], bool]:
        """``(visualize.jsonl, {index: id} of the rows it holds, resume?)``, its torn tail cut."""
        stats.pid = os.getpid()
        self.images_dir.mkdir(parents=True, exist_ok=True)
        path = self.out / VISUALIZE_FILE
        done: Dict[int, str] = {}
        resume = bool(self.cfg.resume) and path.exists()
        if resume:
            done, _ = self._done_rows(path, "visualize")
        return path, done, resume

    def _visualize_commits(self, stats: StageStats, path: Path, done: Dict[int, str], resume: bool,
                           start: float) -> Iterator[List[Dict[str, Any]]]:
        """Prepare the rows not ``done`` and commit their records; yield each batch once committed."""
        every = max(1, int(self.cfg.commit_every))

        def todo() -> Iterator[InputRow]:
            for row in _progress(iter_rows(self.cfg.data), "visualize", self.cfg.progress):
                if row.index in done:
                    self._check_same_row(path, row.index, done[row.index], row.row_id)
                    stats.skipped += 1
                    continue
                yield row

        pool = RowPool(self.cfg, self._workers(), self.visualize_row,
                       window=max(4 * self._workers(), every, int(self.cfg.engine.batch_size)))
        finished = False
        try:
            with CommitWriter(path, stage="visualize", append=resume) as writer, pool:
                buf: List[Dict[str, Any]] = []
                for record in pool.map(todo()):
                    if record.get("error"):
                        stats.errors[record["error"]["kind"]] += 1
                    buf.append(record)
                    if len(buf) >= every or stop_requested():
                        writer.commit(buf)
                        stats.rows += len(buf)
                        # Before the yield: a consumer may keep this generator suspended for long.
                        stats.seconds = time.perf_counter() - start
                        yield buf
                        buf = []
                        if stop_requested():
                            break
                if buf:
                    writer.commit(buf)
                    stats.rows += len(buf)
                    stats.seconds = time.perf_counter() - start
                    yield buf
                finished = True
        finally:
            if not finished:  # stopped by an error or a signal: the time until then
                stats.seconds = time.perf_counter() - start

    @staticmethod
    def _end_of_stage(stats: StageStats) -> StageStats:
        """Log what a resume skipped; stop the run if a signal asked for it."""
        if stats.skipped:
            log.info("resume: %s skipped %d row(s) already done, did %d", stats.name, stats.skipped, stats.rows)
        if stop_requested():
            raise Interrupted(stop_requested(), stats.name, stats.rows)
        return stats

    def visualize_row(self, row: InputRow) -> Dict[str, Any]:
        """Everything the caption stage needs for one input row (or an error row)."""
        t0 = time.perf_counter()
        rec = self._base_record(row)
        if row.error:
            return self._fail(rec, "visualize", row.error["kind"], row.error["message"], t0)
        cfg, model = self.cfg, self.cfg.model
        source = row.image_path if row.image_path else row.image
        try:
            loaded = load_image(
                source, max_image_pixels=cfg.limits.max_image_pixels, max_file_bytes=cfg.limits.max_file_bytes,
                draft_target=lambda w, h: target_size(
                    w, h, min_pixels=model.min_pixels, max_pixels=model.max_pixels,
                    patch_size=model.patch_size, merge_size=model.merge_size),
            )
        except ImageLoadError as exc:
            return self._fail(rec, "visualize", exc.kind, exc.message, t0)
        width, height = loaded.original_size
        rec["image_size"] = [width, height]
        try:
            parsed = bx.parse_boxes(row.bbox, cfg.data.bbox_format, width, height)
        except bx.BoxFormatError as exc:
            return self._fail(rec, "visualize", "bad_bbox", f"{rec['image']}: {exc}", t0)
        rec["dropped_boxes"] = [asdict(i) for i in parsed.dropped]
        rec["clipped_boxes"] = [asdict(i) for i in parsed.clipped]
        rec["type"] = "with_bbox" if parsed.num_input else "without_bbox"
        try:
            tw, th = target_size(width, height, min_pixels=model.min_pixels, max_pixels=model.max_pixels,
                                 patch_size=model.patch_size, merge_size=model.merge_size)
        except ImageLoadError as exc:
            return self._fail(rec, "visualize", exc.kind, exc.message, t0)
        rec["input_size"] = [tw, th]
        kept = parsed.boxes
        rec["valid_bboxes_num"] = len(kept)
        rec["normalized_bbox"] = bx.pad_normalized(
            [bx.normalized_xyxy(b, width, height) for _, b in kept], cfg.max_boxes)
        if not kept:
            if parsed.num_input:
                reasons = ", ".join(sorted({i.reason for i in parsed.dropped}))
                return self._fail(rec, "visualize", "no_valid_boxes",
                                  f"{rec['image']}: none of its {parsed.num_input} boxes is usable ({reasons})", t0)
            rec["status"] = "no_regions"
            rec["timing"] = {"visualize_s": round(time.perf_counter() - t0, 4)}
            return rec

        sx, sy = tw / width, th / height
        regions = []
        for i, (src, box) in enumerate(kept):
            scaled = box.scale(sx, sy)
            regions.append({
                "id": i + 1, "source_index": src, "bbox": box.as_list(2),
                "input_bbox": scaled.round_int(), "chunk": i // cfg.max_boxes, "number": i % cfg.max_boxes + 1,
            })
        rec["regions"] = regions
        try:
            rec["requests"] = self._make_requests(row, rec, loaded, (tw, th), kept, regions)
        except (OSError, ValueError) as exc:  # a write failure or a drawing error on this image only
            return self._fail(rec, "visualize", "draw_error", f"{rec['image']}: {exc}", t0)
        rec["image_with_bbox"] = str(self.out / rec["requests"][0]["image"])
        rec["prompt"] = rec["requests"][0]["prompt"]
        rec["timing"] = {"visualize_s": round(time.perf_counter() - t0, 4)}
        return rec

    def _make_requests(self, row: InputRow, rec: Dict[str, Any], loaded: Any, size: tuple,
                       kept: Sequence, regions: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        cfg, pcfg = self.cfg, self.cfg.prompt
        stem = f"{row.index:07d}"
        ext = "png" if cfg.draw.image_format == "png" else "jpg"
        resized = resize_to(loaded.image, size)
        requests: List[Dict[str, Any]] = []
        if pcfg.strategy == "crop":
            scale_x = loaded.image.width / loaded.original_size[0]
            scale_y = loaded.image.height / loaded.original_size[1]
            for reg, (_, box) in zip(regions, kept):
                crop, rect = crop_with_margin(loaded.image, box.scale(scale_x, scale_y), pcfg.crop_margin)
                cw, ch = target_size(crop.width, crop.height, min_pixels=cfg.model.min_pixels,
                                     max_pixels=cfg.model.max_pixels, patch_size=cfg.model.patch_size,
                                     merge_size=cfg.model.merge_size)
                name = f"{IMAGES_DIR}/{stem}_r{reg['id']:03d}.{ext}"
                self._save(resize_to(crop, (cw, ch)), name)
                reg["number"] = 1
                requests.append(self._request_spec(rec, name, [reg], (cw, ch), f"r{reg['id']}"))
            return requests

        chunks = bx.chunk(regions, cfg.max_boxes)
        clean_name = None
        if pcfg.strategy == "coords":
            clean_name = f"{IMAGES_DIR}/{stem}.{ext}"
            self._save(resized, clean_name)
        for c, chunk_regions in enumerate(chunks):
            if pcfg.strategy == "marked":
                labels = [cfg.draw.label_format.format(n=r["number"]) for r in chunk_regions]
                boxes = [r["input_bbox"] for r in chunk_regions]
                name = f"{IMAGES_DIR}/{stem}_c{c:02d}.{ext}"
                self._save(draw_marks(resized, boxes, labels, self.style), name)
            else:
                name = clean_name
            requests.append(self._request_spec(rec, name, chunk_regions, size, f"c{c}"))
        return requests

    def _request_spec(self, rec: Dict[str, Any], image: str, regions: List[Dict[str, Any]],
                      size: tuple, suffix: str) -> Dict[str, Any]:
        pcfg = self.cfg.prompt
        numbers = [r["number"] for r in regions]
        prompt = self._prompt_text(pcfg.template, regions, size)
        return {
            "key": f"{rec['id']}/{suffix}", "image": image, "image_size": list(size), "prompt": prompt,
            "numbers": numbers, "region_ids": [r["id"] for r in regions],
        }

    def _prompt_text(self, template: str, regions: List[Dict[str, Any]], size: tuple) -> str:
        pcfg, model = self.cfg.prompt, self.cfg.model
        numbers = [r["number"] for r in regions]
        labels = [self.cfg.draw.label_format.format(n=n) for n in numbers]
        text = ""
        if pcfg.strategy == "coords":
            w, h = size
            coords = [
                bx.qwen2_coords(bx.Box(*r["input_bbox"]), w, h) if model.family == "qwen2_vl"
                else bx.qwen25_coords(bx.Box(*r["input_bbox"]), w, h)
                for r in regions
            ]
            text = prompts.regions_text(numbers, coords, model.family)
        noun = "region" if pcfg.strategy == "coords" else "box"
        return prompts.build_prompt(template, numbers=numbers, labels=labels,
                                    answer_format=pcfg.answer_format, regions_text=text, noun=noun)

    def _save(self, image: Any, name: str) -> None:
        save_image(image, self.out / name, fmt=self.cfg.draw.image_format, quality=self.cfg.draw.jpeg_quality)

    def _base_record(self, row: InputRow) -> Dict[str, Any]:
        rec: Dict[str, Any] = {}
        collisions = {}
        for k, v in row.extra.items():
            (collisions if k in _OWN_KEYS else rec)[k] = v
        if collisions:
            rec["input"] = collisions
        image = row.image if isinstance(row.image, str) else (row.image_path or "<in-memory image>")
        rec.update({
            "id": row.row_id, "index": row.index, "image": image, "image_path": row.image_path,
            "type": "with_bbox" if row.bbox else "without_bbox", "bbox": row.bbox,
            "bbox_format": self.cfg.data.bbox_format, "result_file": str(self.out),
            "image_with_bbox": None, "prompt": None, "valid_bboxes_num": 0,
            "normalized_bbox": bx.pad_normalized([], self.cfg.max_boxes),
            "regions": [], "requests": [], "dropped_boxes": [], "clipped_boxes": [],
            "status": "pending", "error": None,
        })
        if row.line is not None:
            rec["line"] = row.line
        return rec

    @staticmethod
    def _fail(rec: Dict[str, Any], stage: str, kind: str, message: str, t0: float) -> Dict[str, Any]:
        rec["status"] = "error"
        rec["error"] = {"stage": stage, "kind": kind, "message": message}
        rec["timing"] = {f"{stage}_s": round(time.perf_counter() - t0, 4)}
        return rec

    # -------------------------------------------------------------- caption
    def caption(self, records: Optional[Iterable[Dict[str, Any]]] = None) -> StageStats:
        """Send every prepared request to the engine, parse answers, write caption records.

        ``records``: the visualize records to caption, in order (a stream from
        :meth:`visualize_and_caption`); by default those of ``visualize.jsonl``.
        """
        if self._ray_executor():
            # Over a Ray cluster (regioncap.executors.ray_executor); Ray is imported only then.
            from regioncap.executors.ray_executor import caption_with_ray

            return caption_with_ray(self)
        if self.isolate:
            return self._caption_in_child()
        stats = self.stats.setdefault("caption", StageStats("caption"))
        stats.pid = os.getpid()
        start = time.perf_counter()
        batch_size = max(1, int(self.cfg.engine.batch_size))
        vis, path = self.out / VISUALIZE_FILE, self.out / CAPTIONS_FILE
        if self.cfg.resume and "visualize" not in self.cfg.stages:
            self._done_rows(vis, "visualize")  # cuts a torn tail a killed visualize stage left
        done: Dict[int, str] = {}
        resume = bool(self.cfg.resume) and path.exists()
        if resume:
            done, redo = self._done_rows(path, "caption", retry=bool(self.cfg.retry_errors))
            if redo:
                # Good rows first, atomically; the redone rows are appended after them.
                kept = rewrite_atomically(path, (r for r in read_jsonl(path) if r.get("index") not in redo))
                log.info("retry_errors: %s rewritten with its %d good row(s); redoing %d", path, kept, len(redo))
                for index in redo:
                    del done[index]
                stats.retried = len(redo)

        def todo() -> Iterator[Dict[str, Any]]:
            for rec in (read_jsonl(vis) if records is None else records):
                index = rec.get("index")
                if index in done:
                    self._check_same_row(path, index, done[index], rec.get("id"))
                    stats.skipped += 1
                    continue
                yield rec

        try:
            with CommitWriter(path, stage="caption", append=resume) as writer:
                for batch in _batches(_progress(todo(), "caption", self.cfg.progress), batch_size):
                    if self.engine is None and any(r["status"] == "pending" for r in batch):
                        # Started at the first batch with work: a resume with nothing left never loads a model.
                        self._start_engine()
                    stats.commit(writer, self._caption_batch(batch))
                    if stop_requested():
                        break
        finally:
            stats.seconds = time.perf_counter() - start
        return self._end_of_stage(stats)

    def _start_engine(self) -> None:
        from regioncap.engines import EngineError, build_engine

        try:
            self.engine = build_engine(self.cfg.engine, self.cfg.model, self.model_path)
        except EngineError as exc:
            if self.pipeline.get("overlap"):
                # The stages streamed: the visualize stage stopped with the engine, part way.
                raise RunError(
                    f"engine {self.cfg.engine.name!r} could not start: {exc}. The rows prepared so far are in "
                    f"{self.out / VISUALIZE_FILE}; after fixing this, go on with both stages with resume=true "
                    f"hydra.run.dir={self.out}") from None
            raise RunError(
                f"engine {self.cfg.engine.name!r} could not start: {exc}. The visualize records are in "
                f"{self.out / VISUALIZE_FILE}; after fixing this, run only the caption stage with "
                f"stages=[caption] resume=true hydra.run.dir={self.out}") from None
        log.info("engine: %s", self.engine.describe())

    def _caption_in_child(self) -> StageStats:
        """The caption stage in a spawned process, so the engine's memory (a vLLM
        engine's GPU memory above all) is released when it ends, whatever the engine."""
        import multiprocessing as mp
        import queue as queue_mod

        from omegaconf import OmegaConf

        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        proc = ctx.Process(target=_caption_child, args=(cfg, self.model_path, results), name="regioncap-caption")
        start = time.perf_counter()
        proc.start()
        result = None
        forwarded = False
        while result is None:
            if stop_requested() and not forwarded and proc.is_alive():
                # A signal to this process only (a scheduler's SIGTERM): the child stops after its batch too.
                os.kill(proc.pid, signal.SIGTERM)
                forwarded = True
            try:
                result = results.get(timeout=0.5)
            except queue_mod.Empty:
                if not proc.is_alive():
                    break
        proc.join()
        if result is None:
            raise RunError(f"the caption stage's process died (exit code {proc.exitcode}); "
                           f"the visualize records are in {self.out / VISUALIZE_FILE}")
        if "error" in result:
            raise RunError(result["error"])
        stats = self.stats.setdefault("caption", StageStats("caption"))
        stats.rows, stats.errors, stats.pid = result["rows"], Counter(result["errors"]), result["pid"]
        stats.skipped, stats.retried = result.get("skipped", 0), result.get("retried", 0)
        stats.seconds = time.perf_counter() - start
        if result.get("interrupted"):
            raise Interrupted(result["interrupted"], "caption", stats.rows)
        return stats

    def close(self) -> None:
        """Shut the engine down and let go of the run dir's lock."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        lock = getattr(self, "_lock_fh", None)
        if lock is not None:
            lock.close()  # closing the file releases the flock
            self._lock_fh = None

    def _sampling(self) -> Sampling:
        s = self.cfg.sampling
        return Sampling(temperature=float(s.temperature), top_p=float(s.top_p), max_tokens=int(s.max_tokens),
                        seed=int(s.seed if s.seed is not None else self.cfg.seed))

    def _engine_request(self, spec: Dict[str, Any], *, reask: bool = False) -> Request:
        pcfg = self.cfg.prompt
        numbers = spec["numbers"]
        return Request(
            key=spec["key"], image_path=str(self.out / spec["image"]), prompt=spec["prompt"],
            system=pcfg.system, sampling=self._sampling(), image_size=tuple(spec["image_size"]),
            regex=prompts.answer_regex(numbers, pcfg.answer_format),
            json_schema=prompts.answer_json_schema(numbers, pcfg.answer_format),
            meta={"numbers": numbers, "answer_format": pcfg.answer_format, "reask": reask},
        )

    def _caption_batch(self, batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        pcfg = self.cfg.prompt
        pending = [(rec, spec) for rec in batch if rec["status"] == "pending" for spec in rec["requests"]]
        if not pending:
            return batch
        assert self.engine is not None
        responses = self.engine.generate([self._engine_request(spec) for _, spec in pending])
        for (rec, spec), resp in zip(pending, responses):
            self._attach(spec, resp)

        # One re-ask for regions a (successful) answer left out; never invented.
        reasks = []
        if pcfg.reask_missing and pcfg.strategy != "crop":
            for rec, spec in pending:
                missing = [n for n in spec["numbers"] if n not in spec["captions"]]
                if spec["error"] is None and missing:
                    reasks.append((spec, self._reask_spec(rec, spec, missing)))
        if reasks:
            answers = self.engine.generate([self._engine_request(r, reask=True) for _, r in reasks])
            for (spec, rspec), resp in zip(reasks, answers):
                parsed = self._attach(rspec, resp)
                spec["reask"] = {k: rspec[k] for k in ("key", "prompt", "numbers", "answer", "error",
                                                       "prompt_tokens", "output_tokens", "latency_s")}
                for n, caption in parsed.items():
                    spec["captions"].setdefault(n, caption)
                    spec.setdefault("reasked_numbers", []).append(n)
        return [self._finish(rec) if rec["status"] == "pending" else rec for rec in batch]

    def _reask_spec(self, rec: Dict[str, Any], spec: Dict[str, Any], missing: List[int]) -> Dict[str, Any]:
        pcfg = self.cfg.prompt
        if pcfg.strategy == "coords":
            regions = [r for r in rec["regions"] if r["id"] in spec["region_ids"] and r["number"] in missing]
            prompt = self._prompt_text(pcfg.template, regions, tuple(spec["image_size"]))
        else:
            labels = [self.cfg.draw.label_format.format(n=n) for n in missing]
            prompt = pcfg.reask_template.format(
                labels=prompts.join_words(labels),
                format_instruction=prompts.format_instruction(pcfg.answer_format, missing))
        return {"key": spec["key"] + "/reask", "image": spec["image"], "image_size": spec["image_size"],
                "prompt": prompt, "numbers": missing, "region_ids": spec["region_ids"]}

    def _attach(self, spec: Dict[str, Any], resp: Response) -> Dict[int, str]:
        pcfg = self.cfg.prompt
        spec.update({"answer": resp.text, "error": resp.error, "prompt_tokens": resp.prompt_tokens,
                     "output_tokens": resp.output_tokens, "finish_reason": resp.finish_reason,
                     "latency_s": None if resp.latency_s is None else round(resp.latency_s, 4)})
        parsed = prompts.parse_answer(resp.text, spec["numbers"], pcfg.answer_format) if resp.ok else None
        spec["format_ok"] = bool(parsed and parsed.format_ok)
        spec["captions"] = dict(parsed.captions) if parsed else {}
        return spec["captions"]

    def _finish(self, rec: Dict[str, Any]) -> Dict[str, Any]:
        by_id = {r["id"]: r for r in rec["regions"]}
        answers, prompt_tokens, output_tokens = [], 0, 0
        first_error = None
        for spec in rec["requests"]:
            captions = spec.pop("captions", {})
            reasked = set(spec.pop("reasked_numbers", []))
            number_to_id = dict(zip(spec["numbers"], spec["region_ids"])) if len(spec["numbers"]) == len(
                spec["region_ids"]) else {}
            for n, rid in number_to_id.items():
                reg = by_id[rid]
                reg["caption"] = captions.get(n)
                reg["missing"] = reg["caption"] is None
                reg["attempt"] = 2 if n in reasked else 1
                if reg["missing"]:
                    reg["reason"] = (spec["error"] or {}).get("kind") or "not_in_answer"
            if spec.get("answer"):
                answers.append(spec["answer"])
            for s in (spec, spec.get("reask") or {}):
                prompt_tokens += s.get("prompt_tokens") or 0
                output_tokens += s.get("output_tokens") or 0
            if spec["error"] and first_error is None:
                first_error = spec["error"]
        rec["answer"] = "\n".join(answers) if answers else None
        rec["tokens"] = {"prompt": prompt_tokens, "output": output_tokens}
        captioned = sum(1 for r in rec["regions"] if r.get("caption"))
        if captioned == len(rec["regions"]):
            rec["status"] = "ok"
        elif captioned:
            rec["status"] = "partial"
        else:
            rec["status"] = "error"
        if first_error:
            rec["error"] = {"stage": "caption", **first_error}
        elif rec["status"] == "error":
            rec["error"] = {"stage": "caption", "kind": "no_caption_parsed",
                            "message": f"{rec['image']}: the model's answer named none of the regions"}
        # Per-region faithfulness flags and exact-match/attribute scores (regioncap/metrics.py).
        return annotate_record(rec, self.cfg.data.references_key)

    # -------------------------------------------------------------- metrics
    def metrics(self) -> Dict[str, Any]:
        """Counts, cost, answer shape and reference scores of what this run wrote
        (``regioncap.metrics.compute_metrics`` over the final records file)."""
        from regioncap.metrics import compute_metrics

        stages = {name: {"rows": st.rows, "seconds": st.seconds, "errors": dict(st.errors), "pid": st.pid}
                  for name, st in self.stats.items()}
        final = self.out / (CAPTIONS_FILE if "caption" in self.stats else VISUALIZE_FILE)
        records = read_jsonl(final) if final.exists() else iter(())
        model = self.cfg.model
        wall = self.pipeline.get("seconds")
        metrics = compute_metrics(records, stages, patch_size=int(model.patch_size),
                                  merge_size=int(model.merge_size), references_key=self.cfg.data.references_key,
                                  wall_s=wall)
        if self.pipeline:
            # End to end: every image and region of the run over the run's wall time (both stages).
            done = metrics["regions_captioned"] if "caption" in self.stats else metrics["regions"]
            metrics["pipeline"] = {
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.pipeline.items()},
                "images_per_s": round(metrics["images"] / wall, 3) if wall else None,
                "regions_per_s": round(done / wall, 3) if wall else None,
            }
        return metrics

    def summary(self, metrics: Dict[str, Any]) -> str:
        """A one-screen summary for the end of a run."""
        from regioncap.metrics import format_summary

        return format_summary(metrics, max_error_rate=float(self.cfg.max_error_rate), out_dir=str(self.out))


def _caption_child(cfg: Dict[str, Any], model_path: Optional[str], results: Any) -> None:
    """Entry of the spawned caption process: run the stage, report its stats, exit."""
    from omegaconf import OmegaConf

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    handler = logging.FileHandler(Path(cfg["output_dir"]) / "regioncap.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    run = RegionCapRun(OmegaConf.create(cfg), model_path=model_path)
    try:
        # Ctrl-C reaches this process too, and the parent forwards a SIGTERM it gets:
        # either way, stop after the batch in hand (never at once: the parent decides that).
        with stop_on_signals(escalate=False):
            try:
                run.caption()
            except Interrupted:
                pass
            stats = run.stats["caption"]
            results.put({"rows": stats.rows, "errors": dict(stats.errors), "pid": os.getpid(),
                         "skipped": stats.skipped, "retried": stats.retried, "interrupted": stop_requested()})
    except RunError as exc:
        results.put({"error": str(exc)})
    except Exception as exc:  # report anything else to the parent rather than dying silently
        log.exception("caption stage failed")
        results.put({"error": f"caption stage failed: {type(exc).__name__}: {exc}"})
    finally:
        run.close()


def _progress(items: Iterable, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="row", dynamic_ncols=True, mininterval=1.0)


def _batches(records: Iterable[Dict[str, Any]], max_requests: int) -> Iterator[List[Dict[str, Any]]]:
    """Group rows so that each engine call gets about ``max_requests`` requests."""
    batch: List[Dict[str, Any]] = []
    n = 0
    for rec in records:
        batch.append(rec)
        n += len(rec.get("requests") or []) if rec.get("status") == "pending" else 0
        if n >= max_requests:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def build_run(cfg: Any, *, multirun: bool = False) -> RegionCapRun:
    """Build the run object from a composed config: the one place objects are built.

    Seeds every RNG first; resolves (and, for the offline model, builds) the
    model before any stage starts, so a model that is not available fails in
    seconds, not after the visualize stage. ``multirun``: the job is one of a
    sweep (the vLLM engine then runs in a child process unless
    ``engine.isolate`` says otherwise).
    """
    seed_everything(int(cfg.seed))
    model_path = None
    if "caption" in cfg.stages and cfg.engine.name not in ("fake", "openai"):
        from regioncap.engines.base import EngineError
        from regioncap.models import resolve_model_path

        try:
            model_path = resolve_model_path(cfg.model)
        except EngineError as exc:
            raise RunError(str(exc)) from None
    isolate = cfg.engine.isolate
    if isolate is None:
        # vLLM does not hand a GPU back inside one process: in a sweep, each
        # job's engine lives and dies in its own process.
        isolate = multirun and cfg.engine.name in ("vllm", "auto")
    run = RegionCapRun(cfg, model_path=model_path, isolate=bool(isolate) and "caption" in cfg.stages)
    data_path = resolve_path(cfg.data.path) if cfg.data.path else None
    log.info("run: model=%s (%s) engine=%s prompt=%s draw=%s data=%s max_boxes=%d seed=%d -> %s",
             cfg.model.name, model_path or cfg.model.path, cfg.engine.name, cfg.prompt.name, cfg.draw.name,
             data_path, cfg.max_boxes, cfg.seed, run.out)
    return run
