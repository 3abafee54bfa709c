"""regioncap from Python (a notebook, a script): compose and run with overrides, read a run's records.

::

    from regioncap import api

    result = api.run(["data.limit=2", "prompt=crop"])   # the same as `regioncap data.limit=2 prompt=crop`
    result.run_dir, result.metrics["regions_per_s"]
    rows = api.records(result.run_dir)                   # the caption records, as dicts
    typed = api.records(result.run_dir, typed=True)      # ... as the record model's Record objects
    ds = api.as_dataset(result.run_dir)                  # the same as a datasets.Dataset

:func:`run` runs one job exactly as the command line does (the shipped configs, the
``.hydra`` files, the log file, manifest and report), in ``outputs/DATE/TIME-PID-N`` of the
working folder (N numbers the runs of the process) unless ``hydra.run.dir=`` says otherwise;
sweeps (``-m``) stay on the command line.
Importing this module imports no Hydra, torch or datasets: each function imports what it needs.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]
#: Numbers the runs of this process (their default run dirs).
_RUNS = itertools.count(1)


@dataclass
class Result:
    """What :func:`run` returns: the run dir and the run's ``metrics.json`` as a dict."""

    run_dir: Path
    metrics: Dict[str, Any]
    #: The overrides the run was composed with (as given).
    overrides: List[str] = field(default_factory=list)

    def records(self, stage: Optional[str] = None, *, typed: bool = False) -> List[Any]:
        """:func:`records` of this run."""
        return records(self.run_dir, stage, typed=typed)

    def as_dataset(self, stage: Optional[str] = None) -> Any:
        """:func:`as_dataset` of this run."""
        return as_dataset(self.run_dir, stage)


def conf_dir() -> Path:
    """The shipped configs (``regioncap/conf``), the ones the command line composes."""
    return Path(__file__).resolve().parent / "conf"


def run(overrides: Sequence[str] = (), config_dir: Optional[PathLike] = None, *,
        configure_logging: bool = True) -> Result:
    """Compose the config with ``overrides`` and run one job, as ``regioncap OVERRIDES`` does.

    The run dir is ``outputs/DATE/TIME-PID-N`` (N: this process's N-th run), or ``hydra.run.dir=``.

    ``config_dir`` is ``--config-dir``: a folder of your own options that compose beside the
    shipped ones (``config_dir="myconf"`` with ``myconf/model/mine.yaml`` and ``model=mine``).
    ``configure_logging`` sets up Hydra's job logging as the command line does (the console and
    ``RUN_DIR/regioncap.log``); false leaves the caller's logging alone.

    A run that fails as a whole (no rows, too many error rows, a setting out of range, a
    missing package) raises :class:`regioncap.errors.RunError` with the command line's message;
    a misspelt override raises Hydra's ``ConfigCompositionException``.
    """
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    from regioncap.config import register_configs
    from regioncap.job import execute

    register_configs()
    given = list(overrides)
    overrides = list(given)
    if not any(o.lstrip("+").startswith("hydra.run.dir=") for o in overrides):
        # The command line's run dir, numbered: runs of one process may start within the same second.
        overrides.append(f"hydra.run.dir=outputs/${{now:%Y-%m-%d}}/${{now:%H-%M-%S}}-${{pid:}}-{next(_RUNS)}")
    search_path = create_config_search_path(str(conf_dir()))
    if config_dir is not None:
        folder = Path(config_dir).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"config_dir={config_dir!s}: no such folder")
        search_path.prepend(provider="command-line", path=f"file://{folder}")  # what --config-dir does
    done: Dict[str, Any] = {}

    def task(cfg: Any) -> Dict[str, Any]:
        done["run_dir"] = Path(str(cfg.output_dir)).resolve()
        done["metrics"] = execute(cfg)
        return done["metrics"]

    gh = GlobalHydra.instance()
    before = gh.hydra if gh.is_initialized() else None  # a caller's own initialize(): put back after
    gh.clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name="regioncap", config_search_path=search_path)
        hydra.run(config_name="config", task_function=task, overrides=overrides,
                  with_log_configuration=configure_logging)  # re-raises the job's exception
    finally:
        gh.clear()
        if before is not None:
            gh.initialize(before)
    return Result(run_dir=done["run_dir"], metrics=done["metrics"], overrides=given)


def _records_file(run_dir: PathLike, stage: Optional[str]) -> Path:
    from regioncap.rundir import CAPTIONS_FILE, STAGE_FILES, VISUALIZE_FILE

    folder = Path(run_dir)
    if stage is not None:
        if stage not in STAGE_FILES:
            raise ValueError(f"stage={stage!r}: one of {', '.join(STAGE_FILES)}")
        path = folder / STAGE_FILES[stage]
    else:
        path = folder / CAPTIONS_FILE
        if not path.exists():
            path = folder / VISUALIZE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such records file (is {folder} a regioncap run dir?)")
    return path


def records(run_dir: PathLike, stage: Optional[str] = None, *, typed: bool = False) -> List[Any]:
    """The records of a run dir, in input order: dicts (the fields: docs/formats.md), or with
    ``typed=True`` the record model's :class:`regioncap.record_types.Record` objects
    (``rec.regions[0].caption``; ``rec.to_dict()`` gives the dict back).

    ``stage``: ``caption`` (``captions.jsonl``) or ``visualize`` (``visualize.jsonl``); by
    default the caption records, or the visualize ones in a run that captioned nothing. A
    killed run's torn last line is left out (with a warning), as everywhere in regioncap.
    """
    from regioncap.records import read_jsonl

    rows = read_jsonl(_records_file(run_dir, stage))
    if typed:
        from regioncap.record_types import Record

        return [Record.from_dict(rec) for rec in rows]
    return list(rows)


def as_dataset(run_dir: PathLike, stage: Optional[str] = None) -> Any:
    """:func:`records` as a ``datasets.Dataset``: one row per record, one column per field.

    Records differ (an error row has no regions; an input field the data passes through may
    hold different types in different rows): a missing field is null, and a column whose values
    Arrow cannot hold in one type holds them as JSON text (``json.loads`` gives them back).
    """
    import datasets
    import pyarrow as pa

    rows = records(run_dir, stage)
    columns: Dict[str, List[Any]] = {}
    for rec in rows:
        for key in rec:
            columns.setdefault(key, [])
    for key, values in columns.items():
        values.extend(rec.get(key) for rec in rows)
        try:
            # Arrow's field names are C strings: a key with a NUL would be cut (and two keys cut to
            # one name cannot be read back), so such a column is JSON text too.
            if any(_nul_key(v) for v in values):
                raise ValueError("a key with a NUL character")
            pa.array(values).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, ValueError):
            columns[key] = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
    return datasets.Dataset.from_dict(columns)


def _nul_key(value: Any) -> bool:
    """True when a dict inside ``value`` (at any depth) has a key with a NUL character."""
    if isinstance(value, dict):
        return any("\x00" in str(k) or _nul_key(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_nul_key(v) for v in value)
    return False


__all__ = ["Result", "as_dataset", "conf_dir", "records", "run"]
