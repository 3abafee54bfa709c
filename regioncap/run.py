"""The run object: built once from the composed config, it runs the stages in order.

``build_run`` is the one place where the run is built from the config (seeding
first, the model resolved before any stage starts, the executor picked).
:class:`RegionCapRun` owns the order of the stages and the lifetimes of what
they share (the run dir's lock, the preparation pool, the engine); the stages
(:mod:`regioncap.stages`) own the work; the run dir
(:class:`regioncap.rundir.RunDir`) owns the files and what a resume finds.

The stages stream: rows are read, processed and committed one batch at a
time, so memory does not grow with the data set. With both stages, a local
executor and preparation workers, the caption stage consumes the visualize
stage's commits as they come (both files still end up as if the stages had run
one after the other).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from dataclasses import asdict, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, Union

from regioncap.cpus import ThreadChoice, choose_threads
from regioncap.config import MetricsConfig, RegionCapConfig
from regioncap.data import RowCount, check_shards, count_rows, iter_rows, resolve_path
from regioncap.errors import RunError
from regioncap.executors import CaptionJob, Executor, executor_of
from regioncap.prepare import RowPool, resolve_workers
from regioncap.record_types import ERROR
from regioncap.images import image_uri
from regioncap.records import dumps, read_jsonl, write_text_atomically
from regioncap.rundir import RunDir, key_changes, resume_args, run_key_hash, run_key_values  # noqa: F401  (re-exported)
from regioncap.signals import Interrupted, stop_on_signals, stop_requested  # noqa: F401  (re-exported)
from regioncap.components import plain, short_name
from regioncap.settings import typed_config
from regioncap.stages import STAGE_NAMES, CaptionStage, OnCommit, StageStats, VisualizeStage
from regioncap.stages.loop import StageLoop, progress
from regioncap.stages.visualize import Visualizer

log = logging.getLogger("regioncap")


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


class RegionCapRun:
    """One run: the configured stages over the configured data, in one run dir."""

    def __init__(self, cfg: RegionCapConfig, *, model_path: Optional[str] = None,
                 executor: Union[Type[Executor], Executor, None] = None,
                 on_commit: Optional[OnCommit] = None, rundir: Optional[RunDir] = None) -> None:
        """``executor``: a class (default :func:`pick_executor`'s choice) or an executor already built
        (``LocalExecutor(cfg, engine=...)`` shares one engine between runs). ``cfg`` is the typed
        config (a composed ``DictConfig`` is typed first, :func:`regioncap.config.typed_config`)."""
        cfg = typed_config(cfg)
        self.cfg = cfg
        #: The run dir; its lock may already be held (the job takes it before writing anything).
        self.rundir = rundir if rundir is not None else RunDir(cfg.output_dir)
        self.out = self.rundir.path
        self.model_path = model_path
        self.stats: Dict[str, StageStats] = {}
        #: Called after each commit of any stage (progress to the experiment logger).
        self.on_commit = on_commit
        #: Image preparation processes (``workers``), resolved when first needed.
        self.workers: Optional[int] = None
        #: How the stages ran: ``{"overlap", "workers", "seconds", "reason"}`` (metrics ``pipeline``).
        self.pipeline: Dict[str, Any] = {}
        #: The engine's CPU threads and why (the manifest's ``threads``), chosen when the run starts.
        self.threads: Optional[ThreadChoice] = None
        #: What the engine was, for the manifest (filled by the caption stage's executor).
        self.engine_info: Dict[str, Any] = {}
        #: Rows of all shards, set when the visualize stage has read the data to its end (the manifest's
        #: ``data.rows_read``: what a merge expects, exact for every source).
        self.rows_read = RowCount()
        self._validate()
        self.executor: Executor = executor if isinstance(executor, Executor) else \
            (executor or pick_executor(cfg))(cfg)

    def _validate(self) -> None:
        from regioncap.strategies import strategy_class

        cfg = self.cfg
        strategy_class(cfg.prompt)  # a RunError naming prompt._target_ when it does not resolve
        check_shards(cfg.data)
        if not cfg.stages:  # it read the input and then said "no input rows were read"
            raise RunError(f"stages=[] runs nothing; name one or more of {', '.join(map(repr, STAGE_NAMES))} "
                           f"(the default runs them all)")
        unknown = [s for s in cfg.stages if s not in STAGE_NAMES]
        if unknown:
            raise RunError(f"unknown stage(s) {unknown}; stages are {', '.join(map(repr, STAGE_NAMES))}")

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        """Run the configured stages and return the run's metrics (also written to ``metrics.json``)."""
        if not self.rundir.started:
            self.rundir.check_start(self.cfg)
        overlap, reason = self.overlap_mode()
        workers = self._workers()
        self.pipeline = {"overlap": overlap, "workers": workers}
        if not overlap:
            self.pipeline["reason"] = reason
        log.info("pipeline: %s; image preparation in %s", "visualize and caption overlap (streaming)" if overlap
                 else f"stages one after the other ({reason})",
                 f"{workers} worker process(es)" if workers else "the main process")
        self.threads = self.choose_threads(overlap, workers)
        start = time.perf_counter()
        try:
            if overlap:
                self.visualize_and_caption()
            else:
                if VisualizeStage.name in self.cfg.stages:
                    self.visualize()
                if CaptionStage.name in self.cfg.stages:
                    if not self.rundir.visualize_file.exists():
                        raise RunError(f"{self.rundir.visualize_file} is missing: run the visualize stage first")
                    self.caption()
        finally:
            self.pipeline["seconds"] = time.perf_counter() - start
        metrics = self.metrics()
        write_text_atomically(self.rundir.metrics_file, dumps(metrics) + "\n")
        return metrics

    def choose_threads(self, overlap: bool, workers: int) -> Optional[ThreadChoice]:
        """The engine's CPU threads when the caption stage runs in this process or a child of it (logged).

        Ray replicas size their own threads from ``executor.num_cpus``.
        """
        if CaptionStage.name not in self.cfg.stages or self.executor.name == "ray":
            return None
        try:
            choice = choose_threads(self.cfg.threads, workers if overlap else 0)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        log.log(logging.WARNING if choice.source == "capped" else logging.INFO, "%s", choice.describe())
        return choice

    def _workers(self) -> int:
        if self.workers is None:
            self.workers = resolve_workers(self.cfg)
        return self.workers

    def overlap_mode(self) -> Tuple[bool, str]:
        """``(True, "")`` when the stages stream into each other, else ``(False, why not)``."""
        if not {VisualizeStage.name, CaptionStage.name} <= set(self.cfg.stages):
            return False, f"only {', '.join(self.cfg.stages) or 'no'} stage requested"
        if not self.executor.streams:
            where = self.executor.elsewhere or "somewhere else"
            return False, f"executor={short_name(type(self.executor))}: the caption stage reads visualize.jsonl {where}"
        if not self.cfg.overlap:
            return False, "overlap=false"
        if self._workers() == 0:
            return False, "workers=0: images are prepared in the main process"
        return True, ""

    # ------------------------------------------------------------ stages
    def _stats(self, name: str) -> StageStats:
        stats = self.stats.setdefault(name, StageStats(name))
        stats.pid = os.getpid()
        return stats

    def _visualize_commits(self, loop: StageLoop, *, on_first_wait: Optional[Callable[[], None]] = None
                           ) -> Iterator[List[Dict[str, Any]]]:
        """The visualize stage's commits, rows prepared in the worker pool (or in this process);
        ``on_first_wait``: see :class:`RowPool`."""
        stage = Visualizer(self.cfg, self.out)
        self.rundir.images_dir.mkdir(parents=True, exist_ok=True)
        workers = self._workers()
        window = max(4 * workers, self.cfg.commit_every, self.cfg.engine.batch_size)
        rows = progress(iter_rows(self.cfg.data, self.rows_read), VisualizeStage.name, self.cfg.progress,
                        self.total_rows())
        with RowPool(self.cfg, workers, stage.process_row, window=window, on_first_wait=on_first_wait) as pool:
            stage.pool = pool
            yield from loop.commits(rows, stage.batches, Visualizer.identity)

    def total_rows(self) -> Optional[int]:
        """Rows the run will read, where cheap to know (for the progress bars' totals and ETA)."""
        if not hasattr(self, "_total_rows"):
            self._total_rows = count_rows(self.cfg.data) if self.cfg.progress else None
        return self._total_rows

    def _visualize_loop(self) -> StageLoop:
        return StageLoop(VisualizeStage.name, self.rundir, self._stats(VisualizeStage.name), resume=self.cfg.resume,
                         retry=self.cfg.retry_errors, on_commit=self.on_commit).begin()

    def visualize(self) -> StageStats:
        """Read every row, validate boxes, resize, draw marks, write images and records."""
        loop = self._visualize_loop()
        for _ in self._visualize_commits(loop):
            pass
        return loop.end()

    def caption(self, records: Optional[Iterator[Dict[str, Any]]] = None) -> StageStats:
        """Caption the visualize records (``records`` as a stream, or ``visualize.jsonl``) where the executor says."""
        job = CaptionJob(cfg=self.cfg, rundir=self.rundir, stats=self._stats(CaptionStage.name), model_path=self.model_path,
                         on_commit=self.on_commit, start_hint=self._start_hint(), engine_info=self.engine_info,
                         threads=self.threads.engine if self.threads else None,
                         total=self.total_rows() if VisualizeStage.name in self.cfg.stages else None)
        return self.executor.caption(job, records)

    def visualize_and_caption(self) -> StageStats:
        """Both stages as one stream: the engine captions a batch while the workers prepare the next rows.

        Every row is committed to ``visualize.jsonl`` before its caption record
        is written, both in input order. A resume captions the rows an earlier
        run left in ``visualize.jsonl`` first, then the new ones. The visualize
        stage's seconds are the time until its last commit; the caption
        stage's, the whole stream's.
        """
        loop = self._visualize_loop()
        # The engine starts once the first new rows are out to the workers: its load and their
        # start-up run side by side (a resume with no new row leaves it to the first batch).
        commits = self._visualize_commits(loop, on_first_wait=self.executor.warm_up)

        def records() -> Iterator[Dict[str, Any]]:
            if loop.done:  # rows an earlier run committed: exactly the file's records after the torn-tail cut
                yield from itertools.islice(read_jsonl(self.rundir.visualize_file), len(loop.done))
            for batch in commits:
                yield from batch

        try:
            return self.caption(records())
        finally:
            commits.close()
            vis = self.stats[VisualizeStage.name]
            if vis.skipped:
                log.info("resume: visualize skipped %d row(s) already done, did %d", vis.skipped, vis.rows)

    def _start_hint(self) -> str:
        if self.pipeline.get("overlap"):
            # The stages streamed: the visualize stage stopped with the engine, part way.
            return (f" The rows prepared so far are in {self.rundir.visualize_file}; after fixing this, go on with "
                    f"both stages with {resume_args(self.out)}")
        return (f" The visualize records are in {self.rundir.visualize_file}; after fixing this, run only the "
                f"caption stage with stages=[caption] {resume_args(self.out)}")

    def close(self) -> None:
        """Shut the engine down and let go of the run dir's lock."""
        self.executor.close()
        self.rundir.unlock()

    # -------------------------------------------------------------- metrics
    def metrics(self) -> Dict[str, Any]:
        """Counts, cost, answer shape and reference scores of what this run wrote (:func:`run_metrics`)."""
        stages = {name: {"rows": st.rows, "seconds": st.seconds, "errors": dict(st.errors), "pid": st.pid,
                         **st.done(), **st.timing()} for name, st in self.stats.items()}
        final = self.rundir.captions_file if CaptionStage.name in self.stats else self.rundir.visualize_file
        records = read_jsonl(final) if final.exists() else iter(())
        return run_metrics(self.cfg, records, stages, self.pipeline)

    def summary(self, metrics: Dict[str, Any]) -> str:
        """A one-screen summary for the end of a run."""
        from regioncap.metrics import format_summary

        return format_summary(metrics, max_error_rate=self.cfg.max_error_rate, out_dir=str(self.out))


def run_metrics(cfg: RegionCapConfig, records: Iterator[Dict[str, Any]], stages: Dict[str, Dict[str, Any]],
                pipeline: Dict[str, Any]) -> Dict[str, Any]:
    """``metrics.json`` of a run: ``regioncap.metrics.compute_metrics`` over its final records with the
    run's scoring settings (``model.patch_size``/``merge_size``, ``data.references_key``, ``metrics.*``,
    ``seed`` for the bootstrap intervals), the model's weights kind, and the ``pipeline`` figures when
    the run says how its stages ran.

    ``stages``: ``{name: {rows, seconds, errors, ...}}`` as the stages counted them (``caption``
    among them when the records are caption records); ``pipeline``: ``{overlap, workers, seconds,
    reason}`` or empty. The one recipe for a run's and a merge's (``regioncap.merge``) metrics.json;
    a merge passes the config its shards recorded (a mapping read by attribute, as the typed config is).
    """
    from regioncap.families.base import visual_tokens_counter
    from regioncap.metrics import compute_metrics
    from regioncap.random_weights import describe as weights

    model = cfg.model
    wall = pipeline.get("seconds")
    # A config written before a metrics setting existed (a merge of old shards) gets the schema's default.
    scorers = {**asdict(MetricsConfig()), **plain(getattr(cfg, "metrics", None) or {})}
    metrics = compute_metrics(records, stages, patch_size=int(model.patch_size),
                              merge_size=int(model.merge_size), references_key=cfg.data.references_key,
                              meteor=bool(scorers["meteor"]), meteor_timeout_s=float(scorers["meteor_timeout_s"]),
                              wall_s=wall, bootstrap_resamples=int(scorers["bootstrap_resamples"]), seed=int(cfg.seed),
                              densecap=bool(scorers["densecap"]), visual=visual_tokens_counter(model))
    metrics.update(weights(model))
    if pipeline:
        # End to end: every image and region this invocation made over its wall time (both stages):
        # the last stage's own counts where it gives them (a resume timed only the rows it did).
        last = stages.get(CaptionStage.name) or next(reversed(stages.values()), {})
        captioned = CaptionStage.name in stages
        done = last.get("regions_captioned" if captioned else "regions",
                        metrics["regions_captioned"] if captioned else metrics["regions"])
        images = last.get("images", metrics["images"])
        metrics["pipeline"] = {
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in pipeline.items()},
            "images_per_s": round(images / wall, 3) if wall else None,
            "regions_per_s": round(done / wall, 3) if wall else None,
        }
    return metrics


def pick_executor(cfg: RegionCapConfig, *, multirun: bool = False) -> Type[Executor]:
    """The executor class of the caption stage: ``executor._target_``, with the engine's isolation in sweeps.

    With ``executor=local`` (no node: the same), ``engine.isolate`` (true/false) asks for
    :class:`~regioncap.executors.isolated.IsolatedExecutor` or the local one explicitly;
    null isolates an engine that does not hand its memory back inside one
    process (vLLM, ``isolate_in_sweeps``) in each job of a sweep.
    """
    from regioncap.engines import engine_of
    from regioncap.executors.local import LocalExecutor

    node = cfg.executor
    cls = executor_of(node) if node is not None else LocalExecutor
    if cls is not LocalExecutor or CaptionStage.name not in cfg.stages:
        return cls
    isolate = cfg.engine.isolate
    if isolate is None:
        isolate = multirun and engine_of(cfg.engine).isolate_in_sweeps
    if not isolate:
        return cls
    from regioncap.executors.isolated import IsolatedExecutor

    return IsolatedExecutor


#: File name endings of an image path (what an image field's value looks like).
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Error kinds of a line that is not a row object at all.
_LINE_ERRORS = ("invalid_utf8", "invalid_json", "invalid_row")
#: Fields that say which annotation format the rows are in: ``(fields, the data option that reads it)``.
_FORMAT_HINTS = ((("regions",), "vg"), (("sentences",), "refcoco"), (("ref_id",), "refcoco"),
                 (("images", "annotations"), "coco"))


def check_image_key(rows: List[Any], image_key: str) -> Optional[str]:
    """Why every row will be an error row when none of ``rows`` (the first rows read) has the
    image field, naming the fields they have and the fix; None when any row has it."""
    # Rows that are objects (a line that is not JSON, or not an object, says nothing about fields).
    objects = [r for r in rows if not r.error or r.error.get(ERROR.kind) not in _LINE_ERRORS]
    missing = [r for r in objects if r.error and r.error.get(ERROR.kind) == "missing_image_field"]
    if not missing or len(missing) < len(objects):
        return None
    keys = sorted({str(k) for r in missing for k in r.extra})
    candidates = [k for k in keys if any(isinstance(r.extra.get(k), str)
                                         and r.extra[k].lower().endswith(_IMAGE_SUFFIXES) for r in missing)]
    hints = [opt for fields, opt in _FORMAT_HINTS if all(any(f in r.extra for r in missing) for f in fields)]
    text = (f"none of the first {len(missing)} row(s) has the image field {image_key!r} (data.image_key); "
            f"their fields: {', '.join(keys) or '(none)'}")
    if candidates:
        text += f". Set data.image_key={candidates[0]}" + (f" ({', '.join(candidates[1:])} look like image paths too)"
                                                            if candidates[1:] else "")
    if hints:
        text += f". The rows look like the {hints[0]} format: read them with data={hints[0]}"
    if not candidates and not hints:
        text += ". Set data.image_key to the field that holds the image path"
    return text


def check_images_dir(rows: List[Any], data_cfg: Any) -> Optional[str]:
    """Why every row will be a missing_file error row when none of the relative image paths of
    ``rows`` (the first rows read) is a file where they resolve (the data file's folder, or
    ``data.images_dir``) but some are files relative to the folder the run was started from, as
    DataFlow-MM writes them; the fix names the setting. None otherwise, and for sources without
    ``data.images_dir``."""
    if not hasattr(data_cfg, "images_dir"):
        return None
    relative = [r for r in rows if not r.error and isinstance(r.image, str) and r.image_path
                and not os.path.isabs(os.path.expanduser(r.image)) and not image_uri(r.image)]
    if not relative or any(os.path.isfile(r.image_path) for r in relative):
        return None
    here = [r for r in relative if os.path.isfile(r.image)]
    if not here:
        return None
    return (f"none of the first {len(relative)} row(s)' image paths is a file where they resolve (e.g. "
            f"{relative[0].image_path}), but {len(here)} are files relative to the folder the run was started "
            f"from (as DataFlow-MM writes its image paths, relative to where its pipeline ran): set "
            f"data.images_dir={os.getcwd()}; each row is a missing_file error row otherwise")


def check_data(cfg: RegionCapConfig, rows: int = 20) -> None:
    """Read the first ``rows`` rows before the run starts: a data path that does not open fails now,
    and a box field missing from every one of them is said at once (with ``propose=none``: the run stops)."""
    from regioncap.propose import check_box_key, proposer_name

    try:
        first = list(itertools.islice(iter_rows(cfg.data), rows))
    except RunError:
        raise
    except Exception as exc:  # noqa: BLE001 - a reader's own error type; the user needs the message
        raise RunError(f"cannot read data.path={cfg.data.path}: {type(exc).__name__}: {exc}") from None
    image_problem = check_image_key(first, cfg.data.image_key) or check_images_dir(first, cfg.data)
    if image_problem:  # said now, while the run writes each such row as a missing_image_field error row
        log.warning("%s", image_problem)
    key = cfg.data.bbox_key
    seen = [({**r.extra, key: r.bbox} if r.bbox is not None else dict(r.extra)) for r in first if not r.error]
    problem = check_box_key(seen, key, proposer_name(cfg.propose))
    if problem is not None and problem.fatal and not problem.candidates:
        # The first rows may simply have no boxes: without another field that looks like boxes the
        # key is wrong for the file only when no row of it has the field (read on to the first that does).
        if any(r.bbox is not None for r in itertools.islice(iter_rows(cfg.data), rows, None)):
            return
        problem = replace(problem, message=f"{problem.message} No later row has a {key!r} field either.")
    if problem is not None:
        if problem.fatal:
            raise RunError(problem.message)
        log.warning("%s", problem.message)


def build_run(cfg: RegionCapConfig, *, multirun: bool = False, on_commit: Optional[OnCommit] = None,
              rundir: Optional[RunDir] = None) -> RegionCapRun:
    """Build the run object from a composed config: the one place objects are built.

    Seeds every RNG first; checks that the packages the config needs are
    installed and that the data opens; resolves (and, for the offline model,
    builds) the model before any stage starts, so a model that is not
    available fails in seconds, not after the visualize stage. ``multirun``:
    the job is one of a sweep (see :func:`pick_executor`). ``cfg`` is the typed config the job
    made (:func:`regioncap.settings.typed_config`); a composed ``DictConfig`` (a script's, a test's)
    is typed and checked here first.
    """
    from regioncap.engines import EngineError, engine_choice, engine_of
    from regioncap.requirements import check_requirements

    cfg = typed_config(cfg)  # checked before anything is read, built or started
    seed_everything(cfg.seed)
    check_requirements(cfg)
    if VisualizeStage.name in cfg.stages:
        check_data(cfg)
    if CaptionStage.name in cfg.stages:
        from regioncap.engines import preflight

        preflight(cfg.engine, cfg.model)  # a server that is not there fails now, not after the images
    model_path = None
    try:
        if CaptionStage.name in cfg.stages and engine_of(cfg.engine).needs_model_path:
            from regioncap.models import resolve_model_path

            model_path = resolve_model_path(cfg.model)
    except EngineError as exc:
        raise RunError(str(exc)) from None
    run = RegionCapRun(cfg, model_path=model_path, executor=pick_executor(cfg, multirun=multirun),
                       on_commit=on_commit, rundir=rundir)
    data_path = resolve_path(cfg.data.path) if cfg.data.path else None
    log.info("run: model=%s (%s) engine=%s prompt=%s draw=%s data=%s max_boxes=%d seed=%d executor=%s -> %s",
             cfg.model.name, model_path or cfg.model.path, engine_choice(cfg.engine), cfg.prompt.name, cfg.draw.name,
             data_path, cfg.max_boxes, cfg.seed, short_name(type(run.executor)), run.out)
    return run


__all__ = ["RegionCapRun", "RunError", "run_metrics", "Interrupted", "build_run", "pick_executor", "seed_everything",
           "stop_on_signals", "stop_requested", "run_key_values", "run_key_hash", "key_changes"]
