"""Hydra callbacks (configured under ``hydra.callbacks`` in ``conf/config.yaml``)."""

from __future__ import annotations

import atexit
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback

log = logging.getLogger("regioncap")


#: ``.hydra/*.yaml`` of run dirs that held them before Hydra wrote this run's: path -> bytes.
_HYDRA_FILES_BEFORE: Dict[str, bytes] = {}


class KeepRunDir(Callback):
    """Keep a run dir's ``.hydra/*.yaml`` if this run turns out not to be allowed there.

    Hydra writes ``.hydra/{config,hydra,overrides}.yaml`` into the run dir
    before the job starts, so a run refused there (the dir holds another
    run's results and ``resume`` is not set, or another process is writing it)
    would have replaced the earlier run's files, the ones ``regioncap.reproduce``
    replays. This keeps them before Hydra writes; :func:`restore_hydra_files`
    puts them back when the job is refused.

    A sweep (``-m``) into a sweep dir that holds an earlier sweep's jobs is refused
    here, before Hydra writes ``multirun.yaml`` or any job's ``.hydra`` files, unless
    ``resume=true`` (then each job's files are kept, as for a single run).
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        _HYDRA_FILES_BEFORE.clear()
        try:
            run_dir = Path(str(config.hydra.run.dir))
            subdir = config.hydra.output_subdir
        except Exception:  # noqa: BLE001 - an unresolvable dir: nothing there to keep
            return
        if subdir is not None:
            _keep(run_dir / str(subdir))

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from regioncap.rundir import holds_run

        _HYDRA_FILES_BEFORE.clear()
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            subdir = config.hydra.output_subdir
            resume = bool(config.resume)
        except Exception:  # noqa: BLE001 - an unresolvable dir: nothing there to keep
            return
        jobs = sorted(d.name for d in sweep_dir.iterdir() if d.is_dir() and holds_run(d)) \
            if sweep_dir.is_dir() else []
        if jobs and not resume:
            # SystemExit: Hydra turns a callback's Exception into a warning and would go on.
            sys.exit(f"{sweep_dir} already holds the jobs of an earlier sweep ({', '.join(jobs[:10])}"
                     f"{' ...' if len(jobs) > 10 else ''}); regioncap does not overwrite them. For a new sweep: "
                     f"a new hydra.sweep.dir; to go on with those jobs: resume=true (with the same overrides)")
        for job in jobs:
            if subdir is not None:
                _keep(sweep_dir / job / str(subdir))


def _keep(folder: Path) -> None:
    """Keep the bytes of ``folder``'s ``*.yaml`` for :func:`restore_hydra_files`."""
    if not folder.is_dir():
        return
    for path in folder.glob("*.yaml"):
        try:
            _HYDRA_FILES_BEFORE[str(path.resolve())] = path.read_bytes()
        except OSError:
            pass


def restore_hydra_files(run_dir: Path) -> int:
    """Put back the ``.hydra`` files :class:`KeepRunDir` kept for ``run_dir``; return how many."""
    import os

    n = 0
    root = str(Path(run_dir).resolve())
    for name, data in list(_HYDRA_FILES_BEFORE.items()):
        if name.startswith(root + "/"):
            tmp = name + ".restore"
            try:
                Path(tmp).write_bytes(data)
                os.replace(tmp, name)
                n += 1
            except OSError:
                pass
    return n


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
        self._objective = config.get("objective") if hasattr(config, "get") else None
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
            objective = getattr(self, "_objective", None)
            if objective:
                try:
                    metric = metric_name(str(objective))
                except ReportError:
                    metric = None
            log.info("sweep report: %s", write_report(sweep_dir, metric=metric))
        except Exception as exc:  # the jobs' own outputs are what matter; a report is a view of them
            log.warning("could not write the sweep report for %s: %s: %s", sweep_dir, type(exc).__name__, exc)


#: Jobs of the sweep that just ended (normally) without an ``ok`` manifest; ``python -m regioncap``
#: exits non-zero when there are any (see :class:`SweepFailures`).
FAILED_JOBS: List[str] = []


class SweepFailures(Callback):
    """Failed trials are counted, the sweep goes on, and its exit status says that some failed.

    A sweeper with a ``max_failure_rate`` (Optuna's plugin: default 0, so one failed trial
    ends the study) gets 1.0 unless it was set on the command line: a failed job is a
    trial that scored nothing, not a reason to stop the others. When the sweep ends, the
    jobs whose manifest does not say ``ok`` are logged and :data:`FAILED_JOBS` makes the
    process exit 1 (``regioncap.__main__``).
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf, read_write

        FAILED_JOBS.clear()
        sweeper = OmegaConf.select(config, "hydra.sweeper")
        given = [str(o) for o in OmegaConf.select(config, "hydra.overrides.hydra", default=[])]
        if sweeper is None or "max_failure_rate" not in sweeper or any(
                o.lstrip("+~").startswith("hydra.sweeper.max_failure_rate=") for o in given):
            return
        with read_write(config):
            config.hydra.sweeper.max_failure_rate = 1.0

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from regioncap.manifest import read_manifest
        from regioncap.report import job_dirs
        from regioncap.rundir import REPORT_FILE

        sweep_dir = Path(str(config.hydra.sweep.dir))
        FAILED_JOBS[:] = [d.name for d in job_dirs(sweep_dir) if ((_manifest(d, read_manifest) or {})
                                                                  .get("status") != "ok")]
        if FAILED_JOBS:
            log.error("%d job(s) of the sweep failed: %s (the sweep went on; see %s)", len(FAILED_JOBS),
                      ", ".join(FAILED_JOBS), sweep_dir / REPORT_FILE)


def _manifest(job_dir: Path, read: Any) -> Optional[Dict[str, Any]]:
    try:
        return read(job_dir)
    except (OSError, ValueError):
        return None


class MaskSecrets(Callback):
    """Keep secrets out of the files Hydra writes itself.

    Hydra saves a job's ``.hydra/{config,hydra,overrides}.yaml`` and a sweep's
    ``multirun.yaml`` verbatim, before any regioncap code runs. At each job's
    start (after Hydra saved them) this masks them (see
    :func:`regioncap.redaction.mask_hydra_outputs`) and puts the secret filter
    on the log handlers; at a sweep's end it masks ``multirun.yaml`` once more.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        # Hydra's launcher logs each job's overrides before the job starts.
        try:
            from omegaconf import OmegaConf

            from regioncap.redaction import config_secrets, install_log_filter

            overrides = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=[])]
            install_log_filter(config_secrets(config, overrides))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not install the secret filter: %s: %s", type(exc).__name__, exc)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        try:
            self._mask(config, job=True)
        except Exception as exc:  # noqa: BLE001 - never a reason to fail a job; the job masks again
            log.warning("could not mask secrets in Hydra's files: %s: %s", type(exc).__name__, exc)

    def on_job_end(self, config: Any, job_return: Any = None, **kwargs: Any) -> None:
        # Hydra prints a failed job's overrides ("Error executing job with overrides: [...]")
        # straight to stderr from the job's return, in the launching process: mask them there.
        try:
            from regioncap.redaction import mask_overrides

            if job_return is not None and getattr(job_return, "overrides", None):
                job_return.overrides = mask_overrides(job_return.overrides)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not mask the job's overrides: %s: %s", type(exc).__name__, exc)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            self._mask(config, job=False)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not mask secrets in multirun.yaml: %s: %s", type(exc).__name__, exc)

    @staticmethod
    def _mask(config: Any, job: bool) -> None:
        from omegaconf import OmegaConf

        from regioncap.redaction import config_secrets, install_log_filter, mask_hydra_outputs

        hydra = config.hydra
        overrides = [*OmegaConf.select(hydra, "overrides.task", default=[]),
                     *OmegaConf.select(hydra, "overrides.hydra", default=[])]
        secrets = config_secrets(config, [str(o) for o in overrides])
        mode = str(OmegaConf.select(hydra, "mode", default=""))
        sweep_dir = OmegaConf.select(hydra, "sweep.dir", default=None)
        sweep_file = Path(str(sweep_dir)) / "multirun.yaml" if sweep_dir and "MULTIRUN" in mode else None
        hydra_dir = None
        if job:
            install_log_filter(secrets)
            out_dir = OmegaConf.select(hydra, "runtime.output_dir", default=None)
            subdir = OmegaConf.select(hydra, "output_subdir", default=None)
            if out_dir and subdir:
                hydra_dir = Path(str(out_dir)) / str(subdir)
        changed = mask_hydra_outputs(hydra_dir, sweep_file, secrets)
        if changed and job:
            log.warning("a secret was given on the command line or in a config file; it is masked in %s. "
                        "Pass keys through the environment instead (engine.api_key_env names the variable).",
                        ", ".join(changed))
