"""Join the records of a sharded run: ``python -m regioncap.merge --out DIR SHARD_DIR...``.

Each shard run (``data.num_shards=N data.shard_index=K``) writes the rows whose
index is ``K`` modulo ``N``, with the indexes of the unsharded run. The merge
refuses (exit 2) when an index is there twice, when rows are missing
(``--expect N``, or the row count the shards' manifests give), when a shard is
unfinished or damaged, or when the shards' ``run_key.json`` (or the settings
that score the records: ``data.references_key``, ``metrics.*``) differ other
than in ``shard_index`` (``--force`` merges those anyway). Otherwise ``DIR``
becomes a run dir of its own, as the unsharded run over the same rows would
have written it:

- ``captions.jsonl`` (or ``visualize.jsonl`` with ``--stage visualize``): every
  shard's records once, in index order, with ``result_file`` (and the paths
  under it, ``image_with_bbox``) moved to ``DIR``;
- ``images/``: the shards' image files, hard-linked (copied where a link cannot
  be made), so ``requests[].image`` (relative to the run dir) resolves in
  ``DIR`` itself and the merged dir stays whole when moved or when the shard
  dirs are deleted;
- ``metrics.json``: the figures of the unsharded run (``run_metrics`` over the
  merged records with the shards' settings); stage seconds and rows are the
  shards' sums, ``shards`` adds the figures of the sharded run as a whole;
- ``manifest.json``: provenance, naming every shard (dir, run key, git sha,
  overrides, rows, digest of its records);
- ``.hydra/config.yaml`` and ``overrides.yaml``: the config of the equivalent
  unsharded run, for ``regioncap.report``, ``export`` and ``reproduce``;
- ``report.html`` and ``merge.json`` (what the merge found; written also when refused).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from regioncap.record_types import Record
from regioncap.records import CorruptRecordsError, dumps, fsync_dir, scan_records, write_text_atomically
from regioncap.rundir import (
    HYDRA_DIR, IMAGES_DIR, MANIFEST_FILE, METRICS_FILE, RUN_DIR_NAMES, RUN_KEY_FILE, STAGE_FILES, key_changes,
)
from regioncap.stages import STAGE_COUNTS, CaptionStage


MERGE_FILE = "merge.json"
#: Missing or duplicated indexes listed in a message (merge.json lists more).
_SHOW = 10
_LIST = 1000
#: Settings outside ``run_key.json`` that change ``metrics.json`` (not the records): the shards must agree
#: on them, as the merged metrics are scored with them once.
SCORING_KEYS = ("data.references_key", "metrics")
#: Config keys that differ between the shards of one run by design (and ``output_dir``, their run dirs).
_SHARD_KEYS = ("data.shard_index", "output_dir")
#: Overrides of a shard that the equivalent unsharded run does not have.
_SHARD_OVERRIDES = ("data.num_shards", "data.shard_index", "output_dir")


class MergeRefused(Exception):
    """The shards cannot be merged into a file with every row exactly once."""


@dataclass
class _Shard:
    """What the merge reads of one shard dir besides its records."""

    path: Path
    info: Dict[str, Any]
    manifest: Optional[Dict[str, Any]] = None
    config: Optional[Dict[str, Any]] = None
    metrics: Optional[Dict[str, Any]] = None
    overrides: List[str] = field(default_factory=list)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MergeRefused(f"{path} is not JSON ({exc})") from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MergeRefused(f"{path} is not YAML ({exc})") from None


def _read_shard(shard: _Shard) -> None:
    """The shard's manifest, resolved config (the manifest's, else ``.hydra/config.yaml``), overrides, metrics."""
    path = shard.path
    shard.manifest = _read_json(path / MANIFEST_FILE)
    config = (shard.manifest or {}).get("config")
    shard.config = config if isinstance(config, dict) else None
    if shard.config is None:
        config = _read_yaml(path / HYDRA_DIR / "config.yaml")
        shard.config = config if isinstance(config, dict) else None
    overrides = ((shard.manifest or {}).get("hydra") or {}).get("overrides")
    if not isinstance(overrides, list):
        overrides = _read_yaml(path / HYDRA_DIR / "overrides.yaml")
    shard.overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    shard.metrics = _read_json(path / METRICS_FILE)


def _dig(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<unset>"
        node = node[part]
    return node


def _without(config: Dict[str, Any], dotted_keys: Sequence[str]) -> Dict[str, Any]:
    """A copy of ``config`` without the ``dotted_keys``."""
    out = json.loads(json.dumps(config, default=str))
    for dotted in dotted_keys:
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _running(shard: Path) -> bool:
    """True when a regioncap process still holds the shard's ``.lock`` (it is still writing)."""
    lock = shard / ".lock"
    if not lock.exists():
        return False
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fh = open(lock, "a")
    except OSError:  # a read-only copy of a run: nothing can be writing it
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


def _key_without_shard(values: Dict[str, Any]) -> Dict[str, Any]:
    data = dict(values.get("data") or {})
    data.pop("shard_index", None)
    return {**values, "data": data}


def _expected_from_manifest(manifest: Optional[Dict[str, Any]]) -> Optional[int]:
    """Rows of the unsharded run: the rows of all shards the shard's run read (``data.rows_read``),
    else the input's row count less ``skip``, at most ``limit``."""
    if not manifest:
        return None
    read = (manifest.get("data") or {}).get("rows_read")
    if isinstance(read, int) and not isinstance(read, bool):
        return read
    rows = (manifest.get("data") or {}).get("rows")
    data_cfg = (manifest.get("config") or {}).get("data") or {}
    skip, limit = data_cfg.get("skip") or 0, data_cfg.get("limit")
    if not isinstance(rows, int) or not isinstance(skip, int):
        return None
    n = max(0, rows - skip)
    return min(n, limit) if isinstance(limit, int) else n


def _records(path: Path, out: Path) -> Iterator[Tuple[int, str]]:
    """``(index, line)`` of each record of a shard's records file, in file order, its paths moved to ``out``.

    ``result_file`` (the dir a record's relative image paths resolve against) becomes ``out``, and
    ``image_with_bbox`` (absolute, under the shard dir) the same file under ``out``: the merge links
    the shard's ``images/`` there.
    """
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = Record.from_dict(json.loads(line))
            old = rec.result_file
            if isinstance(old, str) and old:
                rec.result_file = str(out)
                image = rec.image_with_bbox
                if isinstance(image, str) and image:
                    try:
                        rec.image_with_bbox = str(out / Path(image).relative_to(old))
                    except ValueError:  # not under the shard dir: left as it is
                        pass
            # The model keeps every key and its place: only the two paths differ from the shard's line.
            yield rec.index, dumps(rec.to_dict()) + "\n"


def merge(out: Path, shards: Sequence[Path], *, stage: str = CaptionStage.name, expect: Optional[int] = None,
          force: bool = False, report: bool = True) -> Dict[str, Any]:
    """Merge ``shards``' records into ``out``; return the summary written to ``out/merge.json``.

    Besides the records, writes ``out``'s ``images/`` (links to the shards'
    images), ``metrics.json``, ``manifest.json``, ``.hydra/`` and (``report``)
    ``report.html`` (see the module docstring). Raises :class:`MergeRefused`
    (after writing ``merge.json`` with ``status: refused`` when ``out`` can be
    written) when the result would not hold every row exactly once or the
    shards were run with other settings.
    """
    started = time.time()
    name = STAGE_FILES[stage]
    out = Path(out)
    shards = [Path(s) for s in shards]
    summary: Dict[str, Any] = {"status": "refused", "stage": stage, "file": name, "out": str(out.absolute()),
                               "rows": 0, "shards": [], "expected": expect,
                               "expected_from": "--expect" if expect is not None else None,
                               "missing_count": 0, "missing": [], "duplicates": [], "unexpected": [],
                               "config_differences": [], "forced": bool(force), "problems": []}
    problems: List[str] = summary["problems"]
    if not shards:
        raise MergeRefused("no shard dirs given")
    held = [n for n in RUN_DIR_NAMES if n != MERGE_FILE and (out / n).exists()
            and not ((out / n).is_file() and (out / n).stat().st_size == 0)]
    if held:
        raise MergeRefused(f"{out / held[0]} already exists; regioncap does not overwrite a run's or a merge's "
                           f"files: use another --out")
    if any(out.resolve() == s.resolve() for s in shards if s.exists()):
        raise MergeRefused(f"--out {out} is one of the shard dirs; use a folder of its own")

    where: Dict[int, Path] = {}  # index -> shard that holds it
    keys: List[Tuple[Path, Dict[str, Any]]] = []
    manifest_expect: Dict[Path, int] = {}
    read: List[_Shard] = []
    for shard in shards:
        path = shard / name
        info: Dict[str, Any] = {"dir": str(shard.absolute()), "rows": 0, "sorted": True,
                                "num_shards": None, "shard_index": None, "run_key": None}
        summary["shards"].append(info)
        if not shard.is_dir():
            problems.append(f"{shard}: no such folder" if not shard.exists() else f"{shard}: not a folder")
            continue
        if not path.is_file():
            problems.append(f"{shard}: no {name} (did that shard run the {stage} stage?)")
            continue
        if _running(shard):
            problems.append(f"{shard}: a regioncap process is still writing it; merge when it has finished")
            continue
        try:
            picks, cut = scan_records(path, lambda r: r.get("index"), repair=False)
        except CorruptRecordsError as exc:
            problems.append(str(exc))
            continue
        if cut:
            problems.append(f"{cut} (the shard was stopped mid-write: resume it first)")
            continue
        key = _read_json(shard / RUN_KEY_FILE)
        if key and isinstance(key.get("values"), dict):
            data = key["values"].get("data") or {}
            info.update(num_shards=data.get("num_shards", 1), shard_index=data.get("shard_index", 0),
                        run_key=key.get("hash"))
            keys.append((shard, key["values"]))
        entry = _Shard(shard, info)
        _read_shard(entry)
        read.append(entry)
        n = _expected_from_manifest(entry.manifest)
        if n is not None:
            manifest_expect[shard] = n
        info["rows"] = len(picks)
        info["sorted"] = all(a < b for a, b in zip(picks, picks[1:])) if all(isinstance(i, int) for i in picks) \
            else False
        for n_rec, index in enumerate(picks, 1):
            if not isinstance(index, int):
                problems.append(f"{path}: record {n_rec} has no integer 'index'")
                break
            if index in where:
                summary["duplicates"].append({"index": index, "shards": [str(where[index]), str(shard)]})
            else:
                where[index] = shard

    # Settings: every shard's run key but for shard_index, and the settings that score the records.
    if keys:
        base_dir, base = keys[0]
        for shard, values in keys[1:]:
            for change in key_changes(_key_without_shard(base), _key_without_shard(values)):
                summary["config_differences"].append(f"{base_dir} vs {shard}: {change}")
        # Of the shards read: one that could not be read is a problem of its own, already named.
        if len(keys) < len(read):
            summary["config_differences"].append(
                f"{len(read) - len(keys)} shard(s) have no {RUN_KEY_FILE}; their settings are not checked")
        counts = {v.get("data", {}).get("num_shards", 1) for _, v in keys}
        if len(counts) == 1:
            (num,) = counts
            have = {v.get("data", {}).get("shard_index", 0) for _, v in keys}
            absent = sorted(set(range(num)) - have)
            if absent and len(keys) == len(shards):
                problems.append(f"shard(s) {absent} of data.num_shards={num} are not among the shard dirs")
    configured = [s for s in read if s.config is not None]
    for other in configured[1:]:
        for dotted in SCORING_KEYS:
            a, b = _dig(configured[0].config, dotted), _dig(other.config, dotted)
            if a != b:
                changes = key_changes(a, b, f"{dotted}.") if isinstance(a, dict) and isinstance(b, dict) else \
                    [f"{dotted}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}"]
                summary["config_differences"] += [f"{configured[0].path} vs {other.path}: {c} (scores the records)"
                                                  for c in changes]
    if summary["config_differences"] and not force:
        listed = "\n  ".join(summary["config_differences"])
        problems.append(f"the shards were run with other settings (run_key.json, config); add --force to merge "
                        f"anyway:\n  {listed}")

    if summary["duplicates"]:
        shown = "; ".join(f"index {d['index']} in {d['shards'][0]} and {d['shards'][1]}"
                          for d in summary["duplicates"][:_SHOW])
        more = len(summary["duplicates"]) - _SHOW
        problems.append(f"{len(summary['duplicates'])} row(s) are in more than one shard: {shown}"
                        + (f" (and {more} more)" if more > 0 else ""))
        summary["duplicates"] = summary["duplicates"][:_LIST]

    if expect is None and manifest_expect:
        if len(set(manifest_expect.values())) == 1:
            expect = next(iter(manifest_expect.values()))
            summary.update(expected=expect, expected_from=MANIFEST_FILE)
        else:
            problems.append("the shards' manifests count different input rows (the data changed between shards): "
                            + ", ".join(f"{s}: {n}" for s, n in manifest_expect.items()))
    # A shard's manifest is written when its run ends, whatever the end: none means the run was killed.
    unended = [str(s.path) for s in read if s.manifest is None]
    resume = (f"; {len(unended)} shard(s) have no {MANIFEST_FILE}, so their runs never ended (killed): "
              f"{', '.join(unended[:_SHOW])}: run each again with resume=true in its dir, then merge"
              if unended else "")
    if expect is not None:
        missing = [i for i in range(expect) if i not in where]
        unexpected = sorted(i for i in where if not 0 <= i < expect)
        summary.update(missing_count=len(missing), missing=missing[:_LIST], unexpected=unexpected[:_LIST])
        if missing:
            more = f" (and {len(missing) - _SHOW} more)" if len(missing) > _SHOW else ""
            problems.append(f"{len(missing)} of {expect} row(s) are in no shard: indexes "
                            f"{', '.join(map(str, missing[:_SHOW]))}{more}{resume}")
        if unexpected:
            problems.append(f"{len(unexpected)} row index(es) are past the {expect} expected: {unexpected[:_SHOW]}")

    elif read and not problems:
        # Without the number of rows, shards cut short (every shard killed at once: no manifest
        # anywhere) would merge into a run that silently lacks their rows.
        problems.append(f"cannot tell whether every row is in a shard: no shard's {MANIFEST_FILE} says how many "
                        f"rows the data has (data.rows_read){resume}; or give --expect N (the rows of the "
                        f"unsharded run) to merge")

    if problems:
        _write_summary(out, summary)
        raise MergeRefused("\n".join(problems))

    out.mkdir(parents=True, exist_ok=True)
    out_abs = out.absolute()
    # The images first: no merged record ever points at an image that is not there.
    try:
        summary["images"] = _link_images(shards, out)
    except (OSError, MergeRefused) as exc:
        problems.append(f"cannot put the shards' images into {out / IMAGES_DIR}: {exc}")
        _write_summary(out, summary)
        raise MergeRefused("\n".join(problems)) from None
    # Each shard's file is in index order unless a retry rewrote it; those few are sorted in memory.
    streams = []
    for shard, info in zip(shards, summary["shards"]):
        if info["sorted"]:
            streams.append(_records(shard / name, out_abs))
        else:
            print(f"regioncap.merge: {shard / name} is not in index order (a retried shard?); "
                  f"sorting its {info['rows']} row(s) in memory", file=sys.stderr)
            streams.append(iter(sorted(_records(shard / name, out_abs), key=lambda pair: pair[0])))
    target = out / name
    tmp = target.with_name(name + ".tmp")
    rows = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for _, line in heapq.merge(*streams, key=lambda pair: pair[0]):
            fh.write(line)
            rows += 1
        fh.flush()
        os.fsync(fh.fileno())
        os.replace(tmp, target)
    fsync_dir(out)
    summary.update(status="ok", rows=rows)

    ordered = sorted(read, key=lambda s: (s.info.get("shard_index") is None, s.info.get("shard_index") or 0))
    config, overrides = _merged_config(ordered, out_abs), _merged_overrides(ordered)
    if config is None:
        summary["metrics"] = (f"not written: {next(s.path for s in read if s.config is None)} has no "
                              f"{MANIFEST_FILE} or {HYDRA_DIR}/config.yaml to take the settings from")
    else:
        _write_hydra_dir(out, config, overrides)
        try:
            metrics = merged_metrics(config, target, ordered, stage=stage)
        except Exception as exc:  # noqa: BLE001 - a config the scorer cannot read: the records stand, say why
            summary["metrics"] = f"not written: {type(exc).__name__}: {exc}"
        else:
            write_text_atomically(out / METRICS_FILE, dumps(metrics) + "\n")
            untimed = [str(s.path) for s in read if not s.metrics]
            summary["metrics"] = METRICS_FILE + (f" (no stage timings: {', '.join(untimed)} have no "
                                                  f"{METRICS_FILE})" if untimed else "")
    from regioncap.manifest import build_merge_manifest, write_manifest

    write_manifest(out, build_merge_manifest(
        out, [_shard_provenance(s, name, out_abs, ordered[0]) for s in ordered], config=config,
        base=ordered[0].manifest if ordered else None, overrides=overrides, started=started, ended=time.time(),
        config_differences=summary["config_differences"]))
    if report:
        summary["report"] = _try_write_report(out)
    _write_summary(out, summary)
    return summary


def _link_images(shards: Sequence[Path], out: Path) -> Dict[str, int]:
    """Hard-link every file of each shard's ``images/`` into ``out/images/`` (a copy where a link cannot be
    made: another filesystem); return ``{files, linked, copied}``.

    A file's name starts with its row index (the unsharded run's), so the shards' names never meet;
    a name found twice with other content is refused rather than overwritten.
    """
    dest = out / IMAGES_DIR
    counts = {"files": 0, "linked": 0, "copied": 0}
    for shard in shards:
        src = shard / IMAGES_DIR
        if not src.is_dir():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        with os.scandir(src) as entries:
            for entry in entries:
                if not entry.is_file():
                    continue
                target = dest / entry.name
                if target.exists():
                    if target.stat().st_size != entry.stat().st_size:
                        raise MergeRefused(f"{entry.path} and another shard's image of the same name differ")
                    continue
                counts["files"] += 1
                try:
                    os.link(entry.path, target)
                    counts["linked"] += 1
                except OSError:
                    shutil.copy2(entry.path, target)
                    counts["copied"] += 1
    if counts["files"]:
        fsync_dir(dest)
    return counts


def _merged_config(shards: Sequence[_Shard], out: Path) -> Optional[Dict[str, Any]]:
    """The resolved config of the unsharded run the merge equals: the first shard's, unsharded
    (``data.num_shards: 1``, ``data.shard_index: 0``), with ``output_dir`` the merged dir; None when
    a shard has no config to check it against."""
    if not shards or any(s.config is None for s in shards):
        return None
    config = json.loads(json.dumps(shards[0].config, default=str))
    data = config.setdefault("data", {})
    if isinstance(data, dict):
        data["num_shards"], data["shard_index"] = 1, 0
    config["output_dir"] = str(out)
    return config


def _merged_overrides(shards: Sequence[_Shard]) -> List[str]:
    """The first shard's overrides less those that make it a shard or place its dir."""
    return [o for o in (shards[0].overrides if shards else [])
            if o.split("=", 1)[0].lstrip("+~") not in _SHARD_OVERRIDES and not o.lstrip("+~").startswith("hydra.")]


def _write_hydra_dir(out: Path, config: Dict[str, Any], overrides: List[str]) -> None:
    """``.hydra/config.yaml`` and ``overrides.yaml``, as Hydra writes them for a run."""
    import yaml

    hydra_dir = out / HYDRA_DIR
    hydra_dir.mkdir(parents=True, exist_ok=True)
    for file, value in (("config.yaml", config), ("overrides.yaml", overrides)):
        write_text_atomically(hydra_dir / file, yaml.safe_dump(value, sort_keys=False, allow_unicode=True))


def _sum_stages(shards: Sequence[_Shard]) -> Dict[str, Dict[str, Any]]:
    """Per stage, the shards' ``rows``, ``seconds`` and ``errors`` summed (process-seconds: each shard's
    own time, so rows/s is what one process did, as in an unsharded run)."""
    stages: Dict[str, Dict[str, Any]] = {}
    for shard in shards:
        for name, st in ((shard.metrics or {}).get("stages") or {}).items():
            acc = stages.setdefault(name, {"rows": 0, "seconds": 0.0, "errors": {}})
            acc["rows"] += int(st.get("rows") or 0)
            acc["seconds"] += float(st.get("seconds") or 0.0)
            # What each shard committed (after a resume, its resumed part): summed like its seconds.
            # A shard written before these were kept leaves them out: the rates fall back to the records.
            for key in STAGE_COUNTS:
                value = st.get(key)
                counted = isinstance(value, int) and not isinstance(value, bool) and acc.get(key, 0) is not None
                acc[key] = acc.get(key, 0) + value if counted else None
            for kind, n in (st.get("errors") or {}).items():
                acc["errors"][kind] = acc["errors"].get(kind, 0) + int(n)
            # The caption stage's steady part: counts and process-seconds summed like the stage's own
            # (shards whose steady part was, or took in, their first batch included: the merged basis is
            # after_first_batch);
            # the engines' start-up: the slowest shard's, as replicas (regioncap.stages.merge_startup).
            if isinstance(st.get("steady"), dict):
                steady = acc.setdefault("steady", {})
                for key, value in st["steady"].items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        steady[key] = steady.get(key, 0) + value
            if isinstance(st.get("startup"), dict):
                from regioncap.stages import merge_startup

                startup = acc.setdefault("startup", {})
                merge_startup(startup, st["startup"])
                for key in ("time_to_first_caption_s", "process_start_s", "cluster_start_s", "replicas_start_s"):
                    if st["startup"].get(key) is not None:
                        startup[key] = max(float(st["startup"][key]), float(startup.get(key) or 0.0))
    for acc in stages.values():
        for key in STAGE_COUNTS:
            if acc.get(key) is None:
                acc.pop(key, None)
    return stages


def _sum_pipeline(shards: Sequence[_Shard]) -> Dict[str, Any]:
    """The shards' ``pipeline`` (how the stages ran): seconds summed; ``overlap``, ``workers``,
    ``reason`` where every shard agrees (else null). Empty unless every shard has one."""
    pipes = [(s.metrics or {}).get("pipeline") for s in shards]
    if not pipes or not all(isinstance(p, dict) for p in pipes):
        return {}

    def same(key: str) -> Any:
        values = {json.dumps(p.get(key), default=str) for p in pipes}
        return pipes[0].get(key) if len(values) == 1 else None

    out = {"overlap": same("overlap"), "workers": same("workers"),
           "seconds": sum(float(p.get("seconds") or 0.0) for p in pipes)}
    if any("reason" in p for p in pipes):
        out["reason"] = same("reason")
    return out


def _time(value: Any) -> Optional[float]:
    try:
        return datetime.fromisoformat(value).timestamp() if isinstance(value, str) else None
    except ValueError:
        return None


def merged_metrics(config: Dict[str, Any], records_file: Path, shards: Sequence[Any], *,
                   stage: str = CaptionStage.name) -> Dict[str, Any]:
    """``metrics.json`` of a merge: :func:`regioncap.run.run_metrics` over the merged records with the
    shards' settings (``config``), so every figure computed from records equals the unsharded run's.

    Stage ``rows``/``seconds``/``errors`` and ``pipeline.seconds`` (hence ``wall_s`` and every
    ``*_per_s``) are the shards' sums: process-seconds, so a rate is what one process did, comparable
    with an unsharded run's. ``shards`` adds what only the sharded run as a whole has: ``count``,
    ``wall_s_max`` (the longest shard), ``span_s`` (first shard's start to last shard's end, from
    their manifests) and ``regions_per_s`` over that span. ``stages.*.pid`` is left out (per process).
    ``stage``: the stage whose records ``records_file`` holds (a visualize merge has no caption stage).
    """
    from omegaconf import OmegaConf

    from regioncap.records import read_jsonl
    from regioncap.run import run_metrics

    stages = _sum_stages(shards)
    if stage != CaptionStage.name:
        stages = {k: v for k, v in stages.items() if k == stage}
    if not all(s.metrics for s in shards):
        stages = {}  # a shard without metrics.json: its time is unknown, and so is the sum
    pipeline = _sum_pipeline(shards)
    metrics = run_metrics(OmegaConf.create(config), read_jsonl(records_file), stages, pipeline)
    walls = [float((s.metrics or {}).get("wall_s")) for s in shards
             if isinstance((s.metrics or {}).get("wall_s"), (int, float))]
    starts = [_time((s.manifest or {}).get("started")) for s in shards]
    ends = [_time((s.manifest or {}).get("ended")) for s in shards]
    span = (max(ends) - min(starts)) if starts and all(starts) and all(ends) else None
    done = metrics["regions_captioned"] if CaptionStage.name in stages else metrics["regions"]
    metrics["shards"] = {
        "count": len(shards),
        "wall_s_max": round(max(walls), 3) if len(walls) == len(shards) and walls else None,
        "span_s": round(span, 3) if span is not None else None,
        "regions_per_s": round(done / span, 3) if span else None,
    }
    return metrics


def _shard_provenance(shard: _Shard, name: str, out: Path, first: Optional[_Shard] = None) -> Dict[str, Any]:
    """One shard as the merged manifest names it; ``config_changes``: how its config differs from
    ``first``'s (the one the merged config is made of), its shard index and run dir aside."""
    from regioncap.manifest import output_files

    man = shard.manifest or {}
    git = man.get("git") or {}
    met = shard.metrics or {}
    try:
        relative = os.path.relpath(shard.path.absolute(), out)
    except ValueError:  # another drive (Windows)
        relative = None
    return {
        "shard_index": shard.info.get("shard_index"), "num_shards": shard.info.get("num_shards"),
        "dir": str(shard.path.absolute()), "dir_relative": relative,
        # Not "run_key": manifest.json masks any *_key field as a secret.
        "run_key_hash": shard.info.get("run_key"),
        "status": man.get("status"), "started": man.get("started"), "ended": man.get("ended"),
        "duration_s": man.get("duration_s"), "git_sha": git.get("sha"), "git_dirty": git.get("dirty"),
        "host": (man.get("host") or {}).get("hostname"), "threads": man.get("threads"),
        "overrides": shard.overrides,
        "rows": shard.info.get("rows"), "error_rows": met.get("error_rows"), "wall_s": met.get("wall_s"),
        "records": {"file": name, **(output_files(shard.path, (name,)).get(name) or {})},
        "config_changes": key_changes(_without(first.config, _SHARD_KEYS), _without(shard.config, _SHARD_KEYS))
        if first is not None and first.config is not None and shard.config is not None else None,
    }


def _try_write_report(out: Path) -> Optional[str]:
    """``out/report.html``; a report that cannot be written is said, never a failed merge."""
    try:
        from regioncap.report import write_report

        return str(write_report(out))
    except Exception as exc:  # noqa: BLE001 - a view of the outputs, never a reason to fail the merge
        print(f"regioncap.merge: could not write the report of {out}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _write_summary(out: Path, summary: Dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / MERGE_FILE, dumps(summary, indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry; returns the exit status (0 merged, 2 refused)."""
    parser = argparse.ArgumentParser(
        prog="python -m regioncap.merge",
        description="Merge shard runs (data.num_shards/data.shard_index) into one run dir: records, images, "
                    "metrics.json, manifest.json, .hydra/ and report.html, as the unsharded run would have them.")
    parser.add_argument("--out", required=True, type=Path, help="the merged run dir (a new folder)")
    parser.add_argument("shards", nargs="+", type=Path, metavar="SHARD_DIR", help="the shards' run dirs")
    parser.add_argument("--stage", choices=sorted(STAGE_FILES), default=CaptionStage.name,
                        help="merge captions.jsonl (caption, default) or visualize.jsonl")
    parser.add_argument("--expect", type=int, default=None,
                        help="rows of the whole run (indexes 0..N-1); default: from the shards' manifest.json")
    parser.add_argument("--force", action="store_true",
                        help="merge although the shards' settings (run_key.json, scoring config) differ")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not write DIR/report.html")
    args = parser.parse_args(argv)
    try:
        summary = merge(args.out, args.shards, stage=args.stage, expect=args.expect, force=args.force,
                        report=args.report)
    except MergeRefused as exc:
        print(f"regioncap.merge: refused: {exc}", file=sys.stderr)
        return 2
    print(f"regioncap.merge: {summary['rows']} row(s) from {len(args.shards)} shard(s) -> "
          f"{args.out / STAGE_FILES[args.stage]}")
    if summary.get("metrics") != METRICS_FILE:
        print(f"regioncap.merge: {METRICS_FILE}: {summary.get('metrics')}", file=sys.stderr)
    if summary.get("report"):
        print(f"regioncap.merge: report {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
