"""Secrets out of every file a run writes: Hydra's files, the sweep's, the log.

The rules (which names are secret, how a string is masked) live in
:mod:`regioncap.manifest` (:func:`~regioncap.manifest.redact`,
:func:`~regioncap.manifest.redact_string`, :func:`~regioncap.manifest.secret_values`);
this module applies them where Hydra and :mod:`logging` write:

- :func:`mask_hydra_outputs`: a job's ``.hydra/*.yaml`` and the sweep's
  ``multirun.yaml``, masked as parsed YAML and dumped again (see
  :func:`~regioncap.manifest.mask_yaml_file`);
- :class:`SecretFilter` / :func:`install_log_filter`: every log record that
  reaches the root or ``regioncap`` handlers (console, ``regioncap.log``, and
  so W&B's copy of the console) is masked before it is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from regioncap.manifest import (
    REDACTED, mask_hydra_dir, mask_yaml_file, redact_override, redact_string, secret_values,
    use_secret_names,
)

log = logging.getLogger("regioncap")

#: Loggers of Hydra's launchers, which print each job's overrides (``#0 : engine.api_key=...``)
#: through handlers Hydra sets up again after every job: the filter goes on the loggers themselves.
LAUNCHER_LOGGERS: Tuple[str, ...] = (
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_joblib_launcher._core",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
    "hydra_plugins.hydra_optuna_sweeper._impl",
    "hydra._internal.utils",
    "hydra.core.utils",
)


def config_secrets(cfg: Any, overrides: Iterable[str] = ()) -> List[str]:
    """The secret values a run's config and overrides hold (values of secret-named
    keys, URL passwords and secret query parameters), longest first.

    Adds the config's ``secret_names`` to the name rule first
    (:func:`~regioncap.manifest.use_secret_names`): every caller of this
    (Hydra's files, the log filter, the job) then masks the user's names too.
    """
    from regioncap.config import config_to_dict  # Hydra's node too: the callbacks mask with what it holds

    try:
        data = config_to_dict(cfg)[0]
    except Exception:  # noqa: BLE001 - a config that does not convert still has overrides to mask
        data = {}
    if isinstance(data, dict):
        names = data.get("secret_names")
        use_secret_names([str(n) for n in names] if isinstance(names, (list, tuple)) else [])
        data = {k: v for k, v in data.items() if k != "hydra"}
    return secret_values(data, list(overrides))


def mask_overrides(overrides: Iterable[str]) -> List[str]:
    """Overrides with every secret-named value masked (:func:`~regioncap.manifest.redact_override`)."""
    return [redact_override(str(o)) for o in overrides]


def mask_hydra_outputs(hydra_dir: Optional[Path], sweep_file: Optional[Path], secrets: Sequence[str]) -> List[str]:
    """Mask a job's ``.hydra`` files and the sweep's ``multirun.yaml``; returns what changed.
    Never raises: a file that cannot be masked is named in a warning."""
    changed: List[str] = []
    if hydra_dir is not None and Path(hydra_dir).is_dir():
        try:
            changed += [str(Path(hydra_dir) / n) for n in mask_hydra_dir(Path(hydra_dir), secrets)]
        except Exception as exc:  # noqa: BLE001
            log.warning("could not mask secrets in %s: %s: %s", hydra_dir, type(exc).__name__, exc)
    if sweep_file is not None and Path(sweep_file).is_file():
        try:
            if mask_yaml_file(Path(sweep_file), secrets):
                changed.append(str(sweep_file))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not mask secrets in %s: %s: %s", sweep_file, type(exc).__name__, exc)
    return changed


class SecretFilter(logging.Filter):
    """Masks secrets in every record it sees (message, arguments and traceback).

    Put on handlers, it covers records of every logger that reach them. The
    rules of :func:`~regioncap.manifest.redact_string` apply to every record
    (URL credentials, ``api_key=...``); ``secrets`` adds the run's known values.
    """

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__("regioncap.secrets")
        self.secrets: Tuple[str, ...] = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            masked = redact_string(message, self.secrets)
            if masked != message:
                record.msg, record.args = masked, None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact_string(record.exc_text, self.secrets)
            if record.stack_info:
                record.stack_info = redact_string(record.stack_info, self.secrets)
        except Exception:  # noqa: BLE001 - a record that cannot be masked is still logged, as it came
            pass
        return True


def install_log_filter(secrets: Sequence[str] = ()) -> SecretFilter:
    """Put one :class:`SecretFilter` with ``secrets`` on every handler of the root
    and ``regioncap`` loggers, and on the :data:`LAUNCHER_LOGGERS` themselves
    (replacing one an earlier job of a sweep put there)."""
    flt = SecretFilter(secrets)
    targets: List[Any] = [h for logger in (logging.getLogger(), logging.getLogger("regioncap"))
                          for h in logger.handlers]
    targets += [logging.getLogger(name) for name in LAUNCHER_LOGGERS]
    for target in targets:
        for old in [f for f in target.filters if isinstance(f, SecretFilter)]:
            target.removeFilter(old)
        target.addFilter(flt)
    return flt


__all__ = ["LAUNCHER_LOGGERS", "REDACTED", "SecretFilter", "config_secrets", "install_log_filter",
           "mask_hydra_outputs", "mask_overrides"]
