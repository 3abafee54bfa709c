"""The stages of a run, each an object that owns its work.

A stage turns items into records and knows nothing of files, resume or
signals: :mod:`regioncap.stages.loop` runs every stage the same way (skip the
rows a resume finds done, commit batches, count, stop on a signal), and
:class:`regioncap.rundir.RunDir` owns the files. The run
(:mod:`regioncap.run`) owns the order of the stages and the lifetimes of
what they use (engine, worker pool, lock).

==========  =====================================  ==================  ======================
stage       item -> record                         records file        where it runs
==========  =====================================  ==================  ======================
visualize   input row -> boxes, images, requests   ``visualize.jsonl`` worker processes
caption     batch of records -> answers, regions   ``captions.jsonl``  ``executor=...``
==========  =====================================  ==================  ======================

Each stage's name (``stages=[...]``, the failpoint prefix, the error rows'
``error.stage``, the ``stages.*`` metrics) and records file are declared once,
on the light classes here (:class:`VisualizeStage`, :class:`CaptionStage`)
that the working classes derive from, so the run dir, metrics, merge and report
read them without importing a stage's dependencies. :data:`STAGES` is the one
list of them, in run order. A new stage is one module here with a class like
:class:`Stage` (its ``batches(todo)`` yielding records ready to commit), its
declaration here and in :data:`STAGES`, and its place in
:meth:`regioncap.run.RegionCapRun.run`, which wires what each stage reads;
see docs/design.md, "How to add".
"""

from __future__ import annotations

import abc
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterable, Iterator, List, Optional, Tuple, Type

from regioncap.record_types import ERROR, RECORD, REGION


@dataclass
class StageStats:
    """What a stage did in this run: rows committed, seconds, error rows by kind, resume counts."""

    name: str
    rows: int = 0
    seconds: float = 0.0
    errors: Counter = field(default_factory=Counter)
    #: Process that ran the stage (the caption stage may run in a child).
    pid: Optional[int] = None
    #: Rows a resume found already done and did not redo.
    skipped: int = 0
    #: Error rows taken out of the records file to be redone (``retry_errors``).
    retried: int = 0
    #: Regions in the committed rows (progress reports).
    regions: int = 0
    #: Of them, regions with a caption; and the distinct images of the committed rows
    #: (:func:`regioncap.records.image_key`). With ``rows`` and ``regions``, what this invocation
    #: did: a resumed stage's rates are over these and its own seconds, not over the whole file.
    captioned: int = 0
    images: set = field(default_factory=set)
    #: The engine's start-up (caption stage): ``engine_load_s``, ``first_batch_s``, ``engines``,
    #: ``time_to_first_caption_s`` (see :func:`merge_startup` and docs/formats.md); empty otherwise.
    startup: Dict[str, Any] = field(default_factory=dict)
    #: What was committed after the first commit with an engine answer (the steady part, start-up
    #: left out): ``rows``, ``images`` (rows answered), ``regions`` (captioned), ``prompt_tokens``,
    #: ``output_tokens``; and :attr:`steady_seconds`, from that commit to the last one.
    steady: Counter = field(default_factory=Counter)
    steady_seconds: Optional[float] = None
    #: The same counts for the first commit with an engine answer (the engine's first batch): the
    #: rates fall back to them over ``startup.first_batch_s`` when nothing came after it.
    first: Counter = field(default_factory=Counter)
    #: ``time.perf_counter()`` when the stage loop began (set by the loop; for ``time_to_first_caption_s``).
    clock_start: Optional[float] = None
    _steady_from: Optional[float] = field(default=None, repr=False)

    def commit(self, writer: Any, records: List[Dict[str, Any]]) -> None:
        """Commit ``records`` through ``writer`` and count them, error rows by kind."""
        from regioncap.record_types import image_key

        # Decoded records read by key (derived from the record model): this runs on every row.
        for rec in records:
            if rec.get(RECORD.status) == "error":
                self.errors[(rec.get(RECORD.error) or {}).get(ERROR.kind, "unknown")] += 1
            self.regions += len(rec.get(RECORD.regions) or ())
            self.captioned += sum(1 for r in rec.get(RECORD.regions) or () if r.get(REGION.caption))
            key = image_key(rec)
            if key is not None:
                self.images.add(key)
        writer.commit(records)
        self.rows += len(records)
        self._count_steady(records)

    def _count_steady(self, records: List[Dict[str, Any]]) -> None:
        # A row the engine answered carries ``tokens`` (set when the caption stage finishes it);
        # visualize records never do, so that stage never opens a window.
        now = time.perf_counter()
        if self._steady_from is None:
            if any(RECORD.tokens in rec for rec in records):
                # Everything until this commit (engine load, first batch, the first rows' preparation)
                # is start-up: the steady window opens now, so its rates do not depend on the run's length.
                self._steady_from = now
                self.steady_seconds = 0.0
                _count(self.first, records)
                if self.clock_start is not None:
                    self.startup["time_to_first_caption_s"] = now - self.clock_start
            return
        _count(self.steady, records)
        self.steady_seconds = now - self._steady_from

    def as_dict(self) -> Dict[str, Any]:
        """The stats as plain data (sent back from a child process)."""
        return {"rows": self.rows, "seconds": self.seconds, "errors": dict(self.errors), "pid": self.pid,
                "skipped": self.skipped, "retried": self.retried, "regions": self.regions,
                "captioned": self.captioned, "images": sorted(self.images),
                "startup": dict(self.startup), "steady": dict(self.steady), "steady_seconds": self.steady_seconds,
                "first": dict(self.first)}

    def update(self, values: Dict[str, Any]) -> None:
        """Take the counts of :meth:`as_dict` (from a child process)."""
        self.rows, self.errors, self.pid = values["rows"], Counter(values["errors"]), values["pid"]
        self.skipped, self.retried = values.get("skipped", 0), values.get("retried", 0)
        self.regions = values.get("regions", 0)
        self.captioned = values.get("captioned", 0)
        self.images = set(values.get("images") or ())
        self.startup = dict(values.get("startup") or {})
        self.steady = Counter(values.get("steady") or {})
        self.steady_seconds = values.get("steady_seconds")
        self.first = Counter(values.get("first") or {})

    def done(self) -> Dict[str, int]:
        """What this invocation committed, as ``compute_metrics`` takes it in a stage's entry:
        ``regions``, ``regions_captioned`` and distinct ``images``."""
        return {"regions": self.regions, "regions_captioned": self.captioned, "images": len(self.images)}

    def timing(self) -> Dict[str, Any]:
        """``startup`` and ``steady`` (with its ``seconds``) as ``compute_metrics`` takes them; empty
        for a stage without an engine answer."""
        out: Dict[str, Any] = {}
        if self.startup:
            out["startup"] = dict(self.startup)
        if self.steady_seconds is not None:
            out["steady"] = {"seconds": self.steady_seconds, **{k: self.steady[k] for k in STEADY_COUNTS}}
            out["first_batch"] = {k: self.first[k] for k in STEADY_COUNTS}
        return out


def _count(into: Counter, records: List[Dict[str, Any]]) -> None:
    """Add the rows of ``records``, those the engine answered (``tokens``), their captioned regions and tokens."""
    into["rows"] += len(records)
    for rec in records:
        tokens = rec.get(RECORD.tokens)
        if tokens is None:
            continue
        into["images"] += 1
        into["regions"] += sum(1 for r in rec.get(RECORD.regions) or () if r.get(REGION.caption))
        into["prompt_tokens"] += tokens.get("prompt") or 0
        into["output_tokens"] += tokens.get("output") or 0


#: What a stage entry of ``compute_metrics`` may say the stage itself committed (:meth:`StageStats.done`):
#: its rates and the run's ``pipeline`` rates are over these where given, so a resume's rates are the
#: resumed part's (the part its seconds timed), not the whole records file over those seconds.
STAGE_COUNTS = ("regions", "regions_captioned", "images")

#: What the steady window counts (:attr:`StageStats.steady`).
STEADY_COUNTS = ("rows", "images", "regions", "prompt_tokens", "output_tokens")


def merge_startup(into: Dict[str, Any], startup: Dict[str, Any]) -> None:
    """Add one engine's start-up (``engine_load_s``, ``first_batch_s``) to a stage's ``into``.

    Several engines (Ray replicas) start in parallel: the stage waits for the
    slowest, so the seconds kept are the largest; ``engines`` counts them.
    """
    if not startup:
        return
    into["engines"] = into.get("engines", 0) + int(startup.get("engines", 1))
    for key in ("engine_load_s", "first_batch_s"):
        value = startup.get(key)
        if value is not None:
            into[key] = max(float(value), float(into.get(key) or 0.0))


class Stage(abc.ABC):
    """The shape every stage follows: a name, a records file and batches of records to commit."""

    #: Name in ``stages=[...]``, the key of :data:`regioncap.rundir.STAGE_FILES`, the failpoint prefix,
    #: ``error.stage`` of the error rows it writes, the ``stages.<name>`` metrics.
    name: ClassVar[str]
    #: The file (in the run dir) its records are committed to.
    records_file: ClassVar[str]

    @staticmethod
    def identity(item: Any) -> Tuple[Any, Any, Any]:
        """``(index, id, digest)`` of an item, for the resume check (items are records by default)."""
        return item.get(RECORD.index), item.get(RECORD.id), item.get(RECORD.digest)

    @abc.abstractmethod
    def batches(self, todo: Iterable[Any]) -> Iterator[List[Dict[str, Any]]]:
        """Records of the ``todo`` items, in their order, in batches ready to commit."""

    def close(self) -> None:
        """Release what the stage holds (an engine); safe to call twice."""


class VisualizeStage(Stage):
    """The visualize stage as the run dir and the readers know it; the work is
    :class:`regioncap.stages.visualize.Visualizer`'s."""

    name = "visualize"
    records_file = "visualize.jsonl"


class CaptionStage(Stage):
    """The caption stage as the run dir and the readers know it; the work is
    :class:`regioncap.stages.caption.Captioner`'s."""

    name = "caption"
    records_file = "captions.jsonl"


#: The stages in run order: the one list of them (``stages=[...]`` takes these names).
STAGES: Tuple[Type[Stage], ...] = (VisualizeStage, CaptionStage)
#: Their names, in run order.
STAGE_NAMES: Tuple[str, ...] = tuple(stage.name for stage in STAGES)


OnCommit = Callable[[StageStats, List[Dict[str, Any]]], None]
