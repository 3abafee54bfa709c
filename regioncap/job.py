"""What one Hydra job does: build the run, run it, report, decide the exit status."""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict

from regioncap.run import RunError, build_run

log = logging.getLogger("regioncap")


def run_job(cfg: Any) -> Dict[str, Any]:
    """Run one job and return its metrics (the value a Hydra sweeper sees).

    A run that cannot start, reads no rows, or ends with more error rows than
    ``max_error_rate`` allows exits non-zero in a single run; in a multirun it
    raises, so Hydra records that job as failed and the sweep goes on.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        metrics = execute(cfg)
    except RunError as exc:
        log.error("%s", exc)
        if multirun:
            raise
        sys.exit(1)
    return metrics


def execute(cfg: Any) -> Dict[str, Any]:
    """Build and run; raise :class:`RunError` when the run failed as a whole."""
    run = build_run(cfg)
    try:
        metrics = run.run()
    finally:
        run.close()
    log.info("summary:\n%s", run.summary(metrics))
    if metrics["rows"] == 0:
        raise RunError(f"no input rows were read from {cfg.data.path}: nothing to caption")
    if metrics["error_rate"] > cfg.max_error_rate:
        raise RunError(
            f"{metrics['error_rows']} of {metrics['rows']} rows failed (error rate {metrics['error_rate']:.1%} > "
            f"max_error_rate {cfg.max_error_rate:.1%}); see the 'error' field in "
            f"{run.out}/captions.jsonl (raise max_error_rate to accept this)"
        )
    return metrics
