"""The one resume/commit/stop loop that every stage and every executor runs.

:class:`StageLoop` is what makes a stage restartable:

1. ``begin``: with ``resume``, scan the stage's records file (its torn tail
   cut), note the rows already done and, with ``retry_errors``, take the
   retryable error rows out of it (atomically) so they are done again;
2. ``commits(items)``: skip every item a resume found done (checking that it
   is the same input row), hand the rest to the stage's ``batches``, commit
   each batch (write + fsync), count it, report it, and stop after the batch
   in hand when SIGINT/SIGTERM asked for it;
3. ``end``: log what a resume skipped, raise :class:`Interrupted` after a signal.

``commits`` yields each batch once it is committed, so one stage can stream
into the next (visualize into caption) with the files ending up as if the
stages had run one after the other.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from regioncap.record_types import RECORD
from regioncap.rundir import DoneRow, RunDir
from regioncap.signals import Interrupted, stop_requested
from regioncap.stages import OnCommit, StageStats

log = logging.getLogger("regioncap")

Identity = Callable[[Any], Tuple[Any, Any, Any]]


class StageLoop:
    """Resume, commit and stop for one stage's records file."""

    def __init__(self, name: str, rundir: RunDir, stats: StageStats, *, resume: bool = False,
                 retry: bool = False, on_commit: Optional[OnCommit] = None) -> None:
        self.name = name
        self.rundir = rundir
        self.stats = stats
        self.resume = resume
        self.retry = retry
        self.on_commit = on_commit
        self.path: Path = rundir.records_file(name)
        #: ``{index: DoneRow}`` of the rows a resume found committed (after ``begin``).
        self.done: Dict[int, DoneRow] = {}
        self._begun = False
        self._start = time.perf_counter()

    def begin(self) -> "StageLoop":
        """Scan the records file a resume goes on from; take out the error rows to redo."""
        if self._begun:
            return self
        self._begun = True
        self._start = time.perf_counter()
        self.stats.clock_start = self._start
        if not (self.resume and self.path.exists()):
            return self
        self.done, redo = self.rundir.done_rows(self.name, retry=self.retry)
        if redo:
            # Good rows first, atomically; the redone rows are appended after them.
            kept = self.rundir.drop_rows(self.name, redo)
            log.info("retry_errors: %s rewritten with its %d good row(s); redoing %d", self.path, kept, len(redo))
            for index in redo:
                del self.done[index]
            self.stats.retried = len(redo)
        return self

    def todo(self, items: Iterable[Any], identity: Identity) -> Iterator[Any]:
        """The items not done yet, in order; each done one is checked against what was committed."""
        done, stats = self.done, self.stats
        for item in items:
            if done:
                index, row_id, digest = identity(item)
                row = done.get(index)
                if row is not None:
                    row.check(self.path, index, row_id, digest)
                    stats.skipped += 1
                    continue
            yield item

    def commits(self, items: Iterable[Any], batches: Callable[[Iterable[Any]], Iterator[List[Dict[str, Any]]]],
                identity: Identity) -> Iterator[List[Dict[str, Any]]]:
        """Commit the records ``batches`` makes of the items not done; yield each batch once it is durable."""
        from regioncap.records import CommitWriter

        self.begin()
        stats = self.stats
        append = self.resume and self.path.exists()
        finished = False
        produced = batches(self.todo(items, identity))
        try:
            with CommitWriter(self.path, stage=self.name, append=append) as writer:
                for batch in produced:
                    if not batch:
                        continue
                    stats.commit(writer, batch)
                    # Before the yield: a consumer may keep this generator suspended for long.
                    stats.seconds = time.perf_counter() - self._start
                    if self.on_commit is not None:
                        self.on_commit(stats, batch)
                    yield batch
                    if stop_requested():
                        break
                finished = True
        finally:
            close = getattr(produced, "close", None)
            if close is not None:
                close()
            if not finished:  # stopped by an error or a signal: the time until then
                stats.seconds = time.perf_counter() - self._start

    def run(self, items: Iterable[Any], batches: Callable[[Iterable[Any]], Iterator[List[Dict[str, Any]]]],
            identity: Identity) -> StageStats:
        """The whole stage: every commit, then :meth:`end`."""
        for _ in self.commits(items, batches, identity):
            pass
        return self.end()

    def end(self) -> StageStats:
        """Log what a resume skipped; raise :class:`Interrupted` if a signal asked the run to stop."""
        stats = self.stats
        if stats.skipped:
            log.info("resume: %s skipped %d row(s) already done, did %d", stats.name, stats.skipped, stats.rows)
        if stop_requested():
            raise Interrupted(stop_requested(), stats.name, stats.rows)
        return stats


def progress(items: Iterable[Any], desc: str, enabled: bool, total: Optional[int] = None) -> Iterable[Any]:
    """``items`` with a progress bar on stderr (a total and an ETA when ``total`` is known) when ``enabled``."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="row", dynamic_ncols=True, mininterval=1.0, total=total)


def grouped(items: Iterable[Dict[str, Any]], max_requests: int, max_rows: int) -> Iterator[List[Dict[str, Any]]]:
    """Group records so each engine call gets about ``max_requests`` requests.

    Rows that need no engine (error rows, rows without regions) count too, up
    to ``max_rows`` rows a group: a long run of them is committed as it comes
    instead of piling up in memory until a row with work arrives.
    """
    batch: List[Dict[str, Any]] = []
    n = 0
    for rec in items:
        batch.append(rec)
        n += len(rec.get(RECORD.requests) or []) if rec.get(RECORD.status) == "pending" else 0
        if n >= max_requests or len(batch) >= max_rows:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def pending(batch: List[Dict[str, Any]]) -> bool:
    """Whether any row of ``batch`` has requests for the engine."""
    return any(r.get(RECORD.status) == "pending" for r in batch)


__all__ = ["StageLoop", "grouped", "pending", "progress"]
