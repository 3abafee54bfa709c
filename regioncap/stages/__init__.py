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

A new stage is one module here with a class like :class:`Stage` (its
``name`` and ``batches(todo)`` yielding records ready to commit), one line in
:data:`STAGES` (the order stages run in), its records file in
:data:`regioncap.rundir.STAGE_FILES`, and its place in
:meth:`regioncap.run.RegionCapRun.run`, which wires what each stage reads;
see docs/design.md, "How to add".
"""

from __future__ import annotations

import abc
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterable, Iterator, List, Optional, Tuple

#: Stage name -> "module:Class", in run order. Imported only when a run uses the stage.
STAGES = {
    "visualize": "regioncap.stages.visualize:Visualizer",
    "caption": "regioncap.stages.caption:Captioner",
}


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

    def commit(self, writer: Any, records: List[Dict[str, Any]]) -> None:
        """Commit ``records`` through ``writer`` and count them, error rows by kind."""
        for rec in records:
            if rec.get("status") == "error":
                self.errors[(rec.get("error") or {}).get("kind", "unknown")] += 1
            self.regions += len(rec.get("regions") or ())
        writer.commit(records)
        self.rows += len(records)

    def as_dict(self) -> Dict[str, Any]:
        """The stats as plain data (sent back from a child process)."""
        return {"rows": self.rows, "seconds": self.seconds, "errors": dict(self.errors), "pid": self.pid,
                "skipped": self.skipped, "retried": self.retried, "regions": self.regions}

    def update(self, values: Dict[str, Any]) -> None:
        """Take the counts of :meth:`as_dict` (from a child process)."""
        self.rows, self.errors, self.pid = values["rows"], Counter(values["errors"]), values["pid"]
        self.skipped, self.retried = values.get("skipped", 0), values.get("retried", 0)
        self.regions = values.get("regions", 0)


class Stage(abc.ABC):
    """The shape every stage follows: a name, a records file and batches of records to commit."""

    #: Name in ``stages=[...]``, the key of :data:`regioncap.rundir.STAGE_FILES`, the failpoint prefix.
    name: ClassVar[str]

    @staticmethod
    def identity(item: Any) -> Tuple[Any, Any, Any]:
        """``(index, id, digest)`` of an item, for the resume check (items are records by default)."""
        return item.get("index"), item.get("id"), item.get("digest")

    @abc.abstractmethod
    def batches(self, todo: Iterable[Any]) -> Iterator[List[Dict[str, Any]]]:
        """Records of the ``todo`` items, in their order, in batches ready to commit."""

    def close(self) -> None:
        """Release what the stage holds (an engine); safe to call twice."""


OnCommit = Callable[[StageStats, List[Dict[str, Any]]], None]
