"""Hydra callbacks (configured under ``hydra.callbacks`` in ``conf/config.yaml``)."""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

log = logging.getLogger("regioncap")


class SweepReport(Callback):
    """After a multirun, write the sweep's comparison report to ``SWEEP_DIR/report.html``.

    Hydra calls ``on_multirun_end`` only when every job succeeded (its basic
    sweeper raises once a batch holds a failed job, and Hydra then exits), so
    the report is also written at interpreter exit when the sweep did not end
    normally: a sweep with failed jobs gets its report, the failed jobs marked.
    """

    def __init__(self) -> None:
        self._sweep_dir: Optional[Path] = None
        self._written = False

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        self._written = False
        atexit.register(self._at_exit)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        self._write(Path(str(config.hydra.sweep.dir)))

    def _at_exit(self) -> None:
        if not self._written and self._sweep_dir is not None and self._sweep_dir.is_dir():
            log.info("the sweep did not finish normally (a job failed or it was stopped); writing its report")
            self._write(self._sweep_dir)

    def _write(self, sweep_dir: Path) -> None:
        self._written = True
        try:
            from regioncap.report import ReportError, metric_name, write_report

            # The sweep's objective, when the report can plot it, is what its plots show.
            metric = None
            objective = config.get("objective") if hasattr(config, "get") else None
            if objective:
                try:
                    metric = metric_name(str(objective))
                except ReportError:
                    metric = None
            log.info("sweep report: %s", write_report(sweep_dir, metric=metric))
        except Exception as exc:  # the jobs' own outputs are what matter; a report is a view of them
            log.warning("could not write the sweep report for %s: %s: %s", sweep_dir, type(exc).__name__, exc)
