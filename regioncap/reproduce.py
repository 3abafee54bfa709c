"""Run a finished run again and check that it gives the same captions.

    python -m regioncap.reproduce RUN_DIR [--out DIR] [--force] [OVERRIDE ...]

``RUN_DIR`` is a run dir, or one job dir of a multirun sweep (``SWEEP/3``):
anything with a ``.hydra/overrides.yaml``. The tool

1. reads the run's overrides (``.hydra/overrides.yaml``), its launch folder,
   ``--config-dir`` and ``--config-name`` (``.hydra/hydra.yaml``) and, when
   present, its ``manifest.json``;
2. checks that the input data still has the fingerprint the manifest recorded,
   and refuses to go on when it does not (``--force`` goes on anyway);
3. runs ``python -m regioncap`` in a subprocess, from the same folder, with the
   same ``--config-dir`` / ``--config-name`` and overrides (the seed is part of them or of the config), any extra
   overrides given here, and ``hydra.run.dir=OUT`` (default
   ``RUN_DIR-reproduced-<timestamp>``);
4. compares ``captions.jsonl`` of both runs region by region and says whether
   they are identical; the verdict is also written to ``OUT/reproduction.json``.

Exit status: 0 identical; 3 the captions differ; 2 nothing was run (not a run
dir, input data changed, output dir not empty, config no longer composes);
4 the new run failed (exited non-zero) where the original did not.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from regioncap.manifest import REDACTED, data_fingerprint, read_manifest, redact_override
from regioncap.record_types import Record
from regioncap.records import CorruptRecordsError
from regioncap.rundir import MANIFEST_FILE, hydra_value
from regioncap.stages import STAGES

EXIT_IDENTICAL = 0
EXIT_REFUSED = 2
EXIT_DIFFERENT = 3
EXIT_RUN_FAILED = 4

REPORT_FILE = "reproduction.json"
#: Output files compared, in order of preference: the last stage's first (a visualize-only run has no captions).
COMPARED_FILES = tuple(stage.records_file for stage in reversed(STAGES))

# Overrides that place the original run's outputs; the reproduction gets its own.
#: Overrides that place outputs or continue an earlier run: a reproduction is a new run.
_DROPPED_OVERRIDES = re.compile(
    r"^(hydra\.run\.dir|hydra\.sweep\.|hydra\.mode$|hydra\.job\.(num|id)$|output_dir$|resume$|resume_force$|retry_errors$)")


class ReproduceError(RuntimeError):
    """The run cannot be reproduced as asked (the message says why and what to do)."""


# ------------------------------------------------------------------ run dirs
@dataclass
class RunDirInfo:
    run_dir: Path
    overrides: List[str]
    #: The folder the run was started from (relative paths in the overrides resolve against it).
    cwd: Optional[str]
    manifest: Optional[Dict[str, Any]]
    #: ``--config-dir`` the run was given (absolute, as Hydra records it), else None.
    config_dir: Optional[str] = None
    #: ``--config-name`` when not the default ``config``, else None.
    config_name: Optional[str] = None

    def flags(self) -> List[str]:
        """The command-line flags (``--config-dir``, ``--config-name``) the run was started with."""
        out: List[str] = []
        if self.config_dir:
            out += ["--config-dir", self.config_dir]
        if self.config_name:
            out += ["--config-name", self.config_name]
        return out


def _load_yaml(path: Path) -> Any:
    import yaml

    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def read_run_dir(run_dir: Path) -> RunDirInfo:
    """The overrides, launch folder and manifest of a run dir (or a multirun job dir)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReproduceError(f"run dir {run_dir} does not exist")
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        jobs = sorted(p.name for p in run_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file())
        if jobs:
            raise ReproduceError(
                f"{run_dir} is a multirun sweep dir, not a run dir; reproduce one job at a time, "
                f"e.g. {run_dir / jobs[0]} (jobs: {', '.join(jobs[:10])}{' ...' if len(jobs) > 10 else ''})")
        raise ReproduceError(f"{run_dir} is not a regioncap run dir: it has no .hydra/overrides.yaml")
    overrides = _load_yaml(overrides_file) or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ReproduceError(f"{overrides_file} is not a list of overrides")
    cwd = config_dir = config_name = None
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        try:
            hydra = (_load_yaml(hydra_file) or {}).get("hydra") or {}
            runtime = hydra.get("runtime") or {}
            cwd = runtime.get("cwd")
            # Hydra records --config-dir as a config source of the command line.
            config_dir = next((s.get("path") for s in runtime.get("config_sources") or []
                               if isinstance(s, dict) and s.get("provider") == "command-line" and s.get("path")),
                              None)
            name = (hydra.get("job") or {}).get("config_name")
            config_name = name if isinstance(name, str) and name != "config" else None
        except Exception:  # an unreadable hydra.yaml only costs the launch folder and the config dir
            cwd = config_dir = config_name = None
    try:
        manifest = read_manifest(run_dir)
    except (OSError, ValueError) as exc:
        raise ReproduceError(f"{run_dir / MANIFEST_FILE} cannot be read ({exc}); move it away to reproduce "
                             f"without the data check") from None
    if manifest and manifest.get("cwd"):
        cwd = manifest["cwd"]
    return RunDirInfo(run_dir=run_dir, overrides=list(overrides), cwd=cwd, manifest=manifest,
                      config_dir=config_dir, config_name=config_name)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].strip().lstrip("+~")


def replay_overrides(recorded: Sequence[str], extra: Sequence[str], out_dir: Path) -> List[str]:
    """The recorded overrides (minus those placing outputs, minus keys ``extra`` sets again), ``extra``, the run dir."""
    extra_keys = {_override_key(o) for o in extra}
    kept = [o for o in recorded
            if not _DROPPED_OVERRIDES.match(_override_key(o)) and _override_key(o) not in extra_keys]
    return [*kept, *extra, f"hydra.run.dir={hydra_value(str(out_dir))}"]


# -------------------------------------------------------------- data check
def regioncap_env(cwd: str) -> Dict[str, str]:
    """The environment of a ``python -m regioncap`` started in ``cwd`` that runs the same
    regioncap source as this tool, whatever the launch folder holds.

    ``python -m`` puts its folder first on ``sys.path``, ahead of ``PYTHONPATH``, so
    from a launch folder that is another checkout its ``regioncap`` would run (and a
    reproduction would compare that code with itself). ``PYTHONSAFEPATH`` leaves
    that entry out; the folder comes back after this tool's source, so a user's
    own modules there (``_target_: mymodule.MyEngine``) still import.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, str(Path(cwd).resolve()), env.get("PYTHONPATH")) if p)
    env["PYTHONSAFEPATH"] = "1"
    return env


def composed_data_config(overrides: Sequence[str], cwd: str, python: str = sys.executable) -> Dict[str, Any]:
    """The ``data`` section the run with ``overrides`` will use, composed by ``python -m regioncap --cfg job``."""
    import yaml

    cmd = [python, "-m", "regioncap", *overrides, "--cfg", "job", "--package", "data", "--resolve"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=regioncap_env(cwd), timeout=300)
    if proc.returncode != 0:
        raise ReproduceError(
            "the run's config does not compose any more (a config file or option changed since the run?):\n"
            + (proc.stderr.strip() or proc.stdout.strip())[-3000:])
    text = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("# @package"))
    data = yaml.safe_load(text) or {}
    return data.get("data", data) if isinstance(data, dict) else {}


def _absolute_data_path(data_cfg: Dict[str, Any], cwd: str) -> Dict[str, Any]:
    from regioncap.data import source_name

    path = data_cfg.get("path")
    if path and not str(path).startswith("pkg://"):
        p = Path(os.path.expanduser(str(path)))
        if not p.is_absolute():
            candidate = Path(cwd) / p
            # A relative hub name (owner/name) that is not a local path stays as it is.
            if candidate.exists() or source_name(data_cfg) == "jsonl":
                data_cfg = {**data_cfg, "path": str(candidate)}
    return data_cfg


def check_data(recorded: Dict[str, Any], data_cfg: Dict[str, Any]) -> Optional[str]:
    """None when the data ``data_cfg`` names matches the ``recorded`` fingerprint (the manifest's ``data``).

    Otherwise a message naming the file and both hashes (or what else changed:
    the source kind, a file that is gone).
    """
    now = data_fingerprint(data_cfg)
    where = now.get("resolved_path") or data_cfg.get("path")
    if recorded.get("source") != now.get("source"):
        return (f"the input source changed: the run read {recorded.get('source')} data from "
                f"{recorded.get('path')}, this run would read {now.get('source')} data from {where}")
    for field_name in ("sha256", "fingerprint"):
        old = recorded.get(field_name)
        if old is None:
            continue
        new = now.get(field_name)
        if new is None:
            why = "does not exist any more" if now.get("method") == "missing" else \
                f"cannot be fingerprinted now ({now.get('method')})"
            return f"input data {where} {why}; the run recorded {field_name} {old}"
        if new != old:
            rows = ""
            if recorded.get("rows") is not None and now.get("rows") is not None:
                rows = f" (rows: {recorded['rows']} then, {now['rows']} now)"
            return (f"input data {where} changed since the run: its {field_name} is now {new}, "
                    f"the run recorded {old}{rows}")
    return None


# -------------------------------------------------------------- comparison
@dataclass
class Comparison:
    """Result of comparing two caption files row by row and region by region."""

    identical: bool
    file: str
    rows: int
    regions: int
    #: Regions (or rows, where a whole row differs) that differ.
    n_differences: int
    #: The first few differences, readable.
    differences: List[str] = field(default_factory=list)


def _short(value: Any, width: int = 90) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _pair(old: Any, new: Any, width: int = 70) -> str:
    """``OLD then, NEW now``; long strings are shown from a little before their first difference."""
    if isinstance(old, str) and isinstance(new, str) and max(len(old), len(new)) > width:
        i = next((k for k, (x, y) in enumerate(zip(old, new)) if x != y), min(len(old), len(new)))
        start = max(0, i - 20)
        cut = lambda s: ("..." if start else "") + _short(s[start:start + width], width + 5)
        return f"{cut(old)} then, {cut(new)} now (from character {start})"
    return f"{_short(old)} then, {_short(new)} now"


def compare_records(a_path: Path, b_path: Path, *, max_shown: int = 5) -> Comparison:
    """Compare two ``captions.jsonl`` (or ``visualize.jsonl``) files region by region.

    Per row: id, ``status``, the error's ``kind`` and the raw ``answer``; per
    region: ``bbox``, ``caption`` and ``missing``. Paths, timings and token
    latencies are not compared: they differ between any two runs.
    """
    from regioncap.records import read_jsonl

    diffs: List[str] = []
    n = rows = regions = 0

    def note(text: str) -> None:
        nonlocal n
        n += 1
        if len(diffs) < max_shown:
            diffs.append(text)

    def records(path: Any) -> Any:
        return (Record.from_dict(rec) for rec in read_jsonl(Path(path)))

    for pos, (a, b) in enumerate(zip_longest(records(a_path), records(b_path))):
        if a is not None:
            rows += 1
            regions += len(a.regions or [])
        if a is None or b is None:
            present = a if a is not None else b
            note(f"row {pos} ({present.id!r}) is only in the {'original' if b is None else 'new'} run")
            continue
        row = f"row {pos} ({a.id!r})"
        if a.id != b.id:
            note(f"row {pos}: id {a.id!r} then, {b.id!r} now")
            continue
        for key, get in (("status", lambda r: r.status),
                         ("error kind", lambda r: getattr(r.error, "kind", None)),
                         ("answer", lambda r: r.answer)):
            if get(a) != get(b):
                note(f"{row}: {key} {_pair(get(a), get(b))}")
        for ra, rb in zip_longest(a.regions or [], b.regions or []):
            if ra is None or rb is None:
                present = ra if ra is not None else rb
                note(f"{row} region {present.id}: only in the {'original' if rb is None else 'new'} run")
                continue
            rid = f"{row} region {ra.id}"
            for key in ("bbox", "caption", "missing"):
                if getattr(ra, key) != getattr(rb, key):
                    note(f"{rid}: {key} {_pair(getattr(ra, key), getattr(rb, key))}")
                    break
    return Comparison(identical=n == 0, file=Path(a_path).name, rows=rows, regions=regions,
                      n_differences=n, differences=diffs)


#: Manifest fields worth pointing at when two runs differ (what changed besides the data).
_ENV_FIELDS = (("git", "sha"), ("git", "dirty"), ("model", "fingerprint"), ("model", "commit"),
               ("engine", "name"), ("host", "cpu_model"), ("host", "gpus"))


def environment_changes(old: Optional[Dict[str, Any]], new: Optional[Dict[str, Any]]) -> List[str]:
    """Readable differences between two manifests' code, library, model and host facts."""
    if not old or not new:
        return []
    out = []
    for section, key in _ENV_FIELDS:
        a, b = (old.get(section) or {}).get(key), (new.get(section) or {}).get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict) and "sha256" in a:
                a, b = a.get("sha256"), b.get("sha256")
            out.append(f"{section}.{key}: {_short(a, 60)} then, {_short(b, 60)} now")
    va, vb = old.get("versions") or {}, new.get("versions") or {}
    for name in sorted(set(va) | set(vb)):
        if va.get(name) != vb.get(name):
            out.append(f"{name}: {va.get(name)} then, {vb.get(name)} now")
    return out


# -------------------------------------------------------------------- main
def _default_out(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}-reproduced-{time.strftime('%Y%m%d-%H%M%S')}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m regioncap.reproduce",
        description="Run a finished regioncap run again with the same config, data check and seed, "
                    "and compare its captions region by region.",
        epilog="Exit status: 0 identical, 3 captions differ, 2 nothing was run, 4 the new run failed.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run dir, or one job dir of a multirun sweep")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                   help="extra Hydra overrides, applied after the recorded ones (e.g. model.path=/models/x)")
    p.add_argument("--out", metavar="DIR", help="run dir of the reproduction (default RUN_DIR-reproduced-<time>)")
    p.add_argument("--force", action="store_true", help="run even when the input data changed since the run")
    p.add_argument("--show", type=int, default=5, metavar="N", help="differences to print (default 5)")
    return p


def _say(text: str) -> None:
    print(f"[reproduce] {text}", flush=True)


def reproduce(run_dir: Path, *, out: Optional[Path] = None, force: bool = False, extra: Sequence[str] = (),
              show: int = 5, python: str = sys.executable) -> int:
    """Reproduce ``run_dir`` into ``out`` and return the exit status (see the module docstring)."""
    run_dir = Path(run_dir).absolute()
    info = read_run_dir(run_dir)
    out = Path(out).absolute() if out else _default_out(run_dir)
    if out.resolve() == run_dir.resolve():
        raise ReproduceError("--out must not be the run dir itself")
    if out.exists() and any(out.iterdir()):
        raise ReproduceError(f"output dir {out} exists and is not empty; pick another --out")
    cwd = info.cwd if info.cwd and Path(info.cwd).is_dir() else os.getcwd()
    if info.config_dir and not Path(info.config_dir).is_dir():
        raise ReproduceError(f"the run was started with --config-dir {info.config_dir}, which is gone; "
                             f"restore it to reproduce the run")
    flags = info.flags()
    args = replay_overrides(info.overrides, extra, out)
    masked = [a for a in args if a.partition("=")[2] == REDACTED]
    if masked:
        keys = ", ".join(a.partition("=")[0] for a in masked)
        raise ReproduceError(f"the run was given secret-named values on the command line, masked in its records "
                             f"({keys}); give them again as extra overrides, or better through the environment")

    recorded = (info.manifest or {}).get("data")
    if not recorded:
        _say(f"warning: {run_dir} has no {MANIFEST_FILE} with a data fingerprint: the input data cannot be "
             f"checked against the run")
    elif recorded.get("sha256") is None and recorded.get("fingerprint") is None:
        _say(f"warning: the run's input {recorded.get('path')} has no recorded hash "
             f"({recorded.get('method')}): it cannot be checked")
    else:
        # The data section the new run will read (extra overrides included), composed as the run composes it.
        data_cfg = _absolute_data_path(composed_data_config([*flags, *args[:-1]], cwd, python), cwd)
        problem = check_data(recorded, data_cfg)
        if problem and not force:
            raise ReproduceError(f"{problem}. Restore the data the run read, or pass --force to run anyway.")
        if problem:
            _say(f"warning (--force): {problem}")
        else:
            _say(f"input data unchanged: {recorded.get('path')} ({recorded.get('method')})")

    cmd = [python, "-m", "regioncap", *flags, *args]
    _say(f"running in {cwd}: {' '.join(redact_override(a) for a in cmd)}")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=regioncap_env(cwd))
    seconds = time.monotonic() - t0
    _say(f"the new run exited with status {proc.returncode} after {seconds:.1f} s; outputs: {out}")

    original_failed = (info.manifest or {}).get("status") == "failed"
    name = next((f for f in COMPARED_FILES if (run_dir / f).is_file()), None)
    comparison = None
    if name is None:
        _say(f"the original run has none of {', '.join(COMPARED_FILES)}: nothing to compare")
    elif not (out / name).is_file():
        _say(f"the new run wrote no {name}: nothing to compare")
    else:
        comparison = compare_records(run_dir / name, out / name, max_shown=show)
    notes = environment_changes(info.manifest, read_manifest(out) if (out / MANIFEST_FILE).is_file() else None)

    if proc.returncode != 0 and not original_failed:
        status = EXIT_RUN_FAILED
    elif comparison is None:
        status = EXIT_RUN_FAILED
    else:
        status = EXIT_IDENTICAL if comparison.identical else EXIT_DIFFERENT
    if comparison is not None:
        if comparison.identical:
            _say(f"IDENTICAL: {comparison.file}: {comparison.regions} regions in {comparison.rows} rows match")
        else:
            _say(f"DIFFERENT: {comparison.file}: {comparison.n_differences} differences "
                 f"({comparison.regions} regions in {comparison.rows} rows); first {len(comparison.differences)}:")
            for d in comparison.differences:
                print(f"  {d}", flush=True)
    if notes:
        _say("changed since the run: " + "; ".join(notes))
    report = {
        "source_run": str(run_dir), "reproduction": str(out), "exit_status": status,
        "run_returncode": proc.returncode, "seconds": round(seconds, 2), "cwd": cwd,
        "command": [redact_override(a) for a in cmd], "forced": force,
        "comparison": asdict(comparison) if comparison else None, "environment_changes": notes,
    }
    if out.is_dir():
        from regioncap.records import dumps

        (out / REPORT_FILE).write_text(dumps(report, indent=2) + "\n", encoding="utf-8")
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: parse ``argv``, reproduce, return the exit status."""
    args = _parser().parse_intermixed_args(argv)
    try:
        return reproduce(Path(args.run_dir), out=Path(args.out) if args.out else None, force=args.force,
                         extra=args.overrides, show=args.show)
    except (ReproduceError, CorruptRecordsError) as exc:
        print(f"regioncap.reproduce: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
