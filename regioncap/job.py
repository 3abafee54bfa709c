"""What one Hydra job does: build the run, run it, report, decide the exit status.

This is the one module besides ``__main__`` that may read ``HydraConfig``
(for the job's overrides and sweep dir); every read has a fallback, so
``execute(cfg)`` also works on a config from the compose API.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hydra.errors import CompactHydraException

from regioncap.loggers import RunLogger, build_logger
from regioncap.config import RegionCapConfig, config_to_dict
from regioncap.settings import typed_config
from regioncap.manifest import mask_hydra_dir, redact, redact_override, try_write_manifest
from regioncap.errors import RunError
from regioncap.prepare import start_fork_server
from regioncap.run import RegionCapRun, build_run
from regioncap.rundir import STAGE_FILES, RunDir, regioncap_command, resume_args, shell_word
from regioncap.signals import Interrupted, stop_on_signals
from regioncap.stages import CaptionStage, VisualizeStage

log = logging.getLogger("regioncap")

#: Overrides left out of a tracking run's name: they do not change what a run computes.
_NAME_SKIP = re.compile(r"^(logger(\..*)?|progress|hydra\..*)$")
_NAME_CHARS = 128


def run_job(cfg: Any) -> Any:
    """Run one job and return its metrics (the value a Hydra sweeper sees).

    A run that cannot start, reads no rows, or ends with more error rows than
    ``max_error_rate`` allows exits non-zero in a single run; in a multirun it
    raises, so Hydra records that job as failed and the sweep goes on.
    """
    try:
        check_objective(cfg)  # before any work: a misspelt objective fails every job of a sweep in a second
        metrics = execute(cfg)
        value = objective_value(cfg, metrics) if cfg.objective else metrics
    except Interrupted as exc:
        # Stopped by SIGINT/SIGTERM after a commit: say how to go on, exit 130/143
        # (in a sweep too: a stopped sweep should not start its next job).
        log.error("%s\n%s", exc, resume_hint(cfg))
        sys.exit(128 + exc.signum)
    except RunError as exc:
        log.error("%s", exc)
        if _hydra_multirun():
            # Hydra records the job as failed; when it reports it, the message is enough (a
            # CompactHydraException is printed without a traceback).
            raise JobFailed(str(exc)) from None
        sys.exit(1)
    return value


class JobFailed(CompactHydraException, RunError):
    """A job of a sweep failed as a whole (the message says why); Hydra prints it without a traceback."""


def check_objective(cfg: Any) -> None:
    """Raise :class:`RunError` when ``cfg.objective`` names no number of metrics.json."""
    if cfg.objective:
        from regioncap.metricspec import check_objective as check

        try:
            check(str(cfg.objective))
        except ValueError as exc:
            raise RunError(str(exc)) from None


def objective_value(cfg: Any, metrics: Dict[str, Any]) -> float:
    """The value of the dotted path ``cfg.objective`` in ``metrics`` (what a sweeper optimises)."""
    from regioncap.metricspec import value_at

    try:
        value = value_at(metrics, str(cfg.objective))
    except KeyError:
        value = None
    if value is None:
        # e.g. references.* on data without references, or pipeline.* when the stages ran one after the other
        raise RunError(f"objective {cfg.objective!r} has no value in this run (see {cfg.output_dir}/metrics.json)")
    return value


def execute(cfg: Any) -> Dict[str, Any]:
    """Build and run; raise :class:`RunError` when the run failed as a whole.

    The experiment logger opens before the run is built and is finished in a
    ``finally`` with the job's exit code, so a failed job never leaves a
    tracking run open for the next job of a sweep.
    """
    job_start(cfg)
    # The one boundary: the components' classes, keys, types and value ranges checked before the run
    # dir is touched, and the config turned into typed objects. Below the job, nothing reads a
    # DictConfig; ``cfg`` stays only for what Hydra owns (its files, the secrets masked in them, the
    # tracker's view of the composed config).
    typed = typed_config(cfg)
    # The preparation workers' fork server loads its modules on another CPU while the job sets up.
    start_fork_server(typed)
    run_dir = Path(typed.output_dir)
    started = time.time()
    built: Dict[str, Any] = {}  # model_path and engine_info, for the manifest
    error: Optional[str] = None
    _mask_hydra_files(cfg)
    # Nothing is written into the run dir before its lock is held and the run may go on there:
    # a refused run (another process writes it, or it holds another run's results) leaves it as it was.
    rundir = RunDir(run_dir)
    try:
        rundir.check_start(typed)
    except RunError:
        from regioncap.callbacks import restore_hydra_files

        restore_hydra_files(run_dir)
        raise
    _write_own_hydra_files(cfg)
    tracker = build_logger(typed.logger)
    tracker.sweep_dir = _sweep_dir()
    name, group = tracking_name(cfg, run_dir), tracking_group(cfg)
    tracker.start(config=config_dict(cfg), run_dir=run_dir, name=name, group=group,
                  job_type=CaptionStage.name if CaptionStage.name in typed.stages else VisualizeStage.name)
    exit_code = 1
    try:
        with stop_on_signals():
            run, metrics = _run_stages(typed, built, rundir, tracker)
        tracker.log_run(metrics=metrics, run_dir=run.out)
        _check(typed, run, metrics)
        if typed.objective:
            # Here, not after: a job without its objective's value failed, and its manifest, report,
            # tracker and the sweep report say so (they said ok while the sweep exited 1).
            objective_value(typed, metrics)
        exit_code = 0
        return metrics
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        # Every job leaves its manifest, a failed one too; writing it never raises.
        try_write_manifest(typed, run_dir=run_dir, started=started, ended=time.time(),
                           status="ok" if exit_code == 0 else "failed", error=error, **hydra_context(), **built)
        _try_write_report(run_dir)
        tracker.finish(exit_code)
        _write_own_hydra_files(cfg)
        rundir.unlock()


def job_start(cfg: Any) -> None:
    """What a job says before any work: the config tree (``print_config=true``), and that the
    sweep its config carries runs only with ``-m``."""
    if cfg.get("print_config"):
        try:
            from regioncap.config_tree import print_config_tree

            hc = _hydra()
            choices = hydra_context()["choices"] if hc is not None else None
            sys.stdout.flush()
            print_config_tree(config_dict(cfg), choices)
            sys.stdout.flush()
        except ImportError as exc:  # rich is a core dependency; a broken install must not stop the run
            log.warning("print_config: cannot print the tree (%s); `--cfg job` prints the config", exc)
    warn_unswept(cfg)


def unswept_hint(cfg: Any) -> Optional[str]:
    """In a single run whose config carries a sweep (``hydra.sweeper.params``, e.g.
    ``experiment=marks_vs_crops``): what it is and the ``-m`` command that runs it; else None."""
    from omegaconf import OmegaConf

    hc = _hydra()
    if hc is None or _hydra_multirun():
        return None
    params = OmegaConf.select(hc, "sweeper.params", default=None)
    if not params:
        return None
    choices = hydra_context()["choices"] or {}
    carriers = [f"{g}={choices[g]}" for g in ("experiment", "hparams_search") if choices.get(g)] or ["the config"]
    swept = " ".join(f"{k}={shell_word(str(v))}" for k, v in params.items())
    command = " ".join([regioncap_command(), "-m", *(shell_word(o) for o in job_overrides())])
    return (f"{' and '.join(carriers)} carries a sweep ({swept}) that runs only with -m: this is one job, "
            f"with the values its config sets. For the sweep: {command}")


def warn_unswept(cfg: Any) -> None:
    """Log :func:`unswept_hint` as a warning when there is one."""
    hint = unswept_hint(cfg)
    if hint:
        log.warning("%s", hint)


def _write_own_hydra_files(cfg: Any) -> None:
    """Write this job's ``.hydra/*.yaml`` again, masked, while it holds the run dir's lock.

    Hydra writes them before the job starts, so a second run started into the same new dir
    at the same moment (and refused there) may have written its own over this one's: the
    files must be the ones of the run that holds the dir. Never raises.
    """
    from omegaconf import OmegaConf

    from regioncap.records import write_text_atomically
    from regioncap.redaction import config_secrets

    hc = _hydra()
    if hc is None or not hc.output_subdir:
        return
    hydra_dir = Path(hc.runtime.output_dir) / str(hc.output_subdir)
    try:
        from hydra.core.hydra_config import HydraConfig

        files = {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
                 "overrides.yaml": OmegaConf.to_yaml(hc.overrides.task)}
        hydra_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            write_text_atomically(hydra_dir / name, text)
        mask_hydra_dir(hydra_dir, config_secrets(cfg, [*hc.overrides.task, *hc.overrides.hydra]))
    except Exception as exc:  # noqa: BLE001 - provenance is worth a warning, never the run
        log.warning("could not write %s again: %s: %s", hydra_dir, type(exc).__name__, exc)


def _mask_hydra_files(cfg: Any) -> None:
    """Hydra writes ``.hydra/*.yaml`` verbatim before the job starts: mask any value
    given to a secret-named key there (keys belong in the environment)."""
    from regioncap.redaction import config_secrets, install_log_filter

    hc = _hydra()
    secrets = config_secrets(cfg, [*hc.overrides.task, *hc.overrides.hydra] if hc is not None else [])
    install_log_filter(secrets)  # every record the job logs (console, regioncap.log), masked
    if hc is None or not hc.output_subdir:
        return
    hydra_dir = Path(hc.runtime.output_dir) / str(hc.output_subdir)
    try:
        changed = mask_hydra_dir(hydra_dir, secrets)
    except (OSError, ValueError) as exc:
        log.warning("could not mask secrets in %s: %s", hydra_dir, exc)
        return
    if changed:
        log.warning("a secret-named value was given on the command line or in a config file; it is masked in "
                    "%s (%s). Pass keys through the environment instead (engine.api_key_env names the variable).",
                    hydra_dir, ", ".join(changed))


def _try_write_report(run_dir: Path) -> None:
    """DIR/report.html for every job that got as far as writing records; never fails the job."""
    if not any((run_dir / f).exists() for f in STAGE_FILES.values()):
        return
    try:
        from regioncap.report import write_report

        log.info("report: %s", write_report(run_dir))
    except Exception as exc:  # a report is a view of the outputs, never a reason to fail the run
        log.warning("could not write the report for %s: %s: %s", run_dir, type(exc).__name__, exc)


def _run_stages(cfg: RegionCapConfig, built: Dict[str, Any], rundir: RunDir, tracker: RunLogger
                ) -> Tuple[RegionCapRun, Dict[str, Any]]:
    def progress(stats: Any, batch: Any) -> None:
        tracker.log_progress(stats.name, stats.rows, stats.regions, sum(stats.errors.values()), stats.seconds)

    run = build_run(cfg, multirun=_hydra_multirun(), on_commit=progress, rundir=rundir)
    built["model_path"] = run.model_path
    try:
        metrics = run.run()
    finally:
        run.close()
        if run.engine_info:
            built["engine_info"] = run.engine_info
        if run.threads is not None:
            built["threads"] = run.threads.as_dict()
        if run.rows_read.rows is not None:
            built["rows_read"] = run.rows_read.rows
    log.info("summary:\n%s", run.summary(metrics))
    samples = _samples(run)
    if samples:
        log.info("%s", samples)
    return run, metrics


def _samples(run: RegionCapRun) -> str:
    """A few captions of the run, with their references where the data has them."""
    from regioncap.metrics import region_reference_texts
    from regioncap.records import caption_samples

    path = run.rundir.captions_file
    if not path.exists():
        return ""
    key = run.cfg.data.references_key
    try:
        return caption_samples(path, reference=lambda rec, reg: region_reference_texts(rec, reg, key))
    except Exception as exc:  # noqa: BLE001 - a courtesy print, never a reason to fail the run
        log.debug("no caption samples: %s", exc)
        return ""


#: Overrides a resume command sets itself.
_RESUME_SKIP = re.compile(r"^[+~]*(hydra\.run\.dir|resume|resume_force|retry_errors)=")


def resume_hint(cfg: Any) -> str:
    """The command that goes on with this run: its own overrides, ``resume=true`` and its run dir."""
    overrides = [o for o in job_overrides() if not _RESUME_SKIP.match(o)]
    cmd = [regioncap_command(), *(shell_word(o) for o in overrides), resume_args(cfg.output_dir)]
    cwd = hydra_context()["cwd"]  # relative paths in the overrides are relative to it
    return (f"The rows finished so far are in {cfg.output_dir}; to go on where the run stopped"
            + (f" (from {cwd})" if cwd else "") + ":\n  " + " ".join(cmd))


def _check(cfg: RegionCapConfig, run: RegionCapRun, metrics: Dict[str, Any]) -> None:
    """Raise :class:`RunError` when the run as a whole failed."""
    if metrics["rows"] == 0:
        from regioncap.data import check_shards, rows_of_all_shards

        num_shards, shard_index = check_shards(cfg.data)
        whole = rows_of_all_shards(cfg.data) if num_shards > 1 else None
        if whole:
            # More shards than rows: this shard's share is empty, which is no failure of the run
            # (a sweep or job array over the shard indexes would report it as one).
            log.warning(f"shard {shard_index} of data.num_shards={num_shards} holds no rows: {cfg.data.path} "
                        f"has {whole} row(s) to share; regioncap.merge takes this shard as it is")
            return
        raise RunError(f"no input rows were read from {cfg.data.path}: nothing to caption")
    # Rows were read (above), so the rate is a number; a null one (no rows) is never over the limit.
    if (metrics["error_rate"] or 0.0) > cfg.max_error_rate:
        raise RunError(
            f"{metrics['error_rows']} of {metrics['rows']} rows failed (error rate {metrics['error_rate']:.1%} > "
            f"max_error_rate {cfg.max_error_rate:.1%}); see the 'error' field in "
            f"{run.rundir.captions_file} (raise max_error_rate to accept this)"
        )


# ------------------------------------------------------- what Hydra says of the job


def _hydra() -> Optional[Any]:
    """Hydra's config of the running job, or None (compose API, plain calls)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _hydra_multirun() -> bool:
    from hydra.types import RunMode

    hc = _hydra()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def _sweep_dir() -> Optional[Path]:
    """The sweep dir of a multirun job (where a tracker keeps the sweep's local runs), else None."""
    hc = _hydra()
    return Path(str(hc.sweep.dir)) if hc is not None and _hydra_multirun() else None


def job_overrides() -> List[str]:
    """The job's own command-line overrides (in a sweep: this job's values)."""
    hc = _hydra()
    return list(hc.overrides.task) if hc is not None else []


def hydra_context() -> Dict[str, Any]:
    """The job's group choices, overrides and launch folder, for the manifest (nulls outside Hydra)."""
    from omegaconf import OmegaConf

    hc = _hydra()
    if hc is None:
        return {"choices": None, "overrides": None, "cwd": None}
    return {"choices": OmegaConf.to_container(hc.runtime.choices), "overrides": list(hc.overrides.task),
            "cwd": hc.runtime.cwd}


def swept_keys() -> Optional[set]:
    """In a multirun, the keys its sweep varies: the sweep overrides of its command line
    (``max_boxes=5,10``, ``prompt=choice(marked,crop)``, read from the sweep dir's
    ``multirun.yaml``, so it works in every launcher's job process) and ``hydra.sweeper.params``
    (an experiment's or ``hparams_search``'s). None outside a multirun or when they cannot be read."""
    from omegaconf import OmegaConf

    hc = _hydra()
    if hc is None or not _hydra_multirun():
        return None
    keys = {str(k) for k in (OmegaConf.select(hc, "sweeper.params", default=None) or {})}
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        given = OmegaConf.load(Path(str(hc.sweep.dir)) / "multirun.yaml").hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in given])
    except Exception as exc:  # noqa: BLE001 - a run name is a courtesy: fall back to every override
        log.debug("no multirun.yaml to read the swept keys from: %s", exc)
        return None
    keys |= {o.key_or_group for o in parsed if o.is_sweep_override()}
    return keys


def tracking_name(cfg: Any, run_dir: Path) -> str:
    """A readable run name from the job's overrides: ``max_boxes=2,model=qwen25vl_3b``.

    In a multirun only the swept overrides name it (the ones its jobs differ in, see
    :func:`swept_keys`), not the ones every job shares. Logger and progress overrides are left
    out (they change nothing the run computes), secret-named values masked and paths cut to
    their file name; with no overrides left, the run dir's name.
    """
    swept = swept_keys() or None  # a multirun that sweeps nothing: every override, as in a single run
    parts = []
    for override in sorted(job_overrides()):
        key, sep, value = redact_override(override).partition("=")
        if _NAME_SKIP.match(key.lstrip("+~")):
            continue
        if swept is not None and key.lstrip("+~") not in swept:
            continue
        if "/" in value and "," not in value:
            value = value.rstrip("/").rsplit("/", 1)[-1]
        parts.append(f"{key}{sep}{value}")
    name = ",".join(parts)
    if len(name) > _NAME_CHARS:
        name = name[: _NAME_CHARS - 1] + "…"
    return name or run_dir.name


def tracking_group(cfg: Any) -> Optional[str]:
    """``logger.group``; else, in a multirun, the sweep dir's name; else none.

    Hydra's default sweep dir ends in ``DATE/TIME``: there the group is
    ``DATE_TIME``, so sweeps of different days never share a group.
    """
    group = getattr(cfg.logger, "group", None)
    if group:
        return str(group)
    hc = _hydra()
    if hc is None or not _hydra_multirun():
        return None
    sweep = Path(str(hc.sweep.dir))
    if re.fullmatch(r"\d{2}-\d{2}-\d{2}", sweep.name) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", sweep.parent.name):
        return f"{sweep.parent.name}_{sweep.name}"
    return sweep.name


def config_dict(cfg: Any) -> Dict[str, Any]:
    """The composed config as plain data for a tracker: resolved where it resolves, secrets masked."""
    from regioncap.redaction import config_secrets

    return redact(config_to_dict(cfg)[0], config_secrets(cfg, job_overrides()))
