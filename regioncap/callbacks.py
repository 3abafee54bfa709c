"""Hydra callbacks (configured under ``hydra.callbacks`` in ``conf/config.yaml``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("regioncap")


class SweepReport(Callback):
    """After a multirun, write the sweep's comparison report to ``SWEEP_DIR/report.html``."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
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
