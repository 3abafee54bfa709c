"""Join the records of a sharded run: ``python -m regioncap.merge --out DIR SHARD_DIR...``.

Each shard run (``data.num_shards=N data.shard_index=K``) writes the rows whose
index is ``K`` modulo ``N``, with the indexes of the unsharded run. The merge
writes ``DIR/captions.jsonl`` (or ``visualize.jsonl`` with ``--stage
visualize``) holding every shard's records once, in index order, and
``DIR/merge.json`` saying what it found. It refuses (exit 2) when an index is
there twice, when rows are missing (``--expect N``, or the row count the
shards' manifests give), when a shard is unfinished or damaged, or when the
shards' ``run_key.json`` differ other than in ``shard_index`` (``--force``
merges those anyway). Records are copied line for line: their image paths
still point into the shard dirs (``requests[].image`` is relative to the
record's ``result_file``, the shard dir).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from regioncap.records import CorruptRecordsError, dumps, fsync_dir, scan_records, write_text_atomically
from regioncap.rundir import MANIFEST_FILE, RUN_KEY_FILE, STAGE_FILES


#: Records files by stage, and the run's other files the merge reads.
MERGE_FILE = "merge.json"
#: Missing or duplicated indexes listed in a message (merge.json lists more).
_SHOW = 10
_LIST = 1000


class MergeRefused(Exception):
    """The shards cannot be merged into a file with every row exactly once."""


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MergeRefused(f"{path} is not JSON ({exc})") from None


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
    """Rows of the unsharded run: the input's row count less ``skip``, at most ``limit``."""
    if not manifest:
        return None
    rows = (manifest.get("data") or {}).get("rows")
    data_cfg = (manifest.get("config") or {}).get("data") or {}
    skip, limit = data_cfg.get("skip") or 0, data_cfg.get("limit")
    if not isinstance(rows, int) or not isinstance(skip, int):
        return None
    n = max(0, rows - skip)
    return min(n, limit) if isinstance(limit, int) else n


def _lines(path: Path) -> Iterator[Tuple[int, str]]:
    """``(index, line)`` of each record of a records file, in file order."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)["index"], line if line.endswith("\n") else line + "\n"


def merge(out: Path, shards: Sequence[Path], *, stage: str = "caption", expect: Optional[int] = None,
          force: bool = False) -> Dict[str, Any]:
    """Merge ``shards``' records into ``out``; return the summary written to ``out/merge.json``.

    Raises :class:`MergeRefused` (after writing ``merge.json`` with
    ``status: refused`` when ``out`` can be written) when the result would not
    hold every row exactly once or the shards were run with other settings.
    """
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
    if (out / name).exists() and (out / name).stat().st_size > 0:
        raise MergeRefused(f"{out / name} already exists; regioncap does not overwrite it: use another --out")
    if any(out.resolve() == s.resolve() for s in shards if s.exists()):
        raise MergeRefused(f"--out {out} is one of the shard dirs; use a folder of its own")

    where: Dict[int, Path] = {}  # index -> shard that holds it
    keys: List[Tuple[Path, Dict[str, Any]]] = []
    manifest_expect: Dict[Path, int] = {}
    for shard in shards:
        path = shard / name
        info: Dict[str, Any] = {"dir": str(shard.absolute()), "rows": 0, "sorted": True,
                                "num_shards": None, "shard_index": None, "run_key": None}
        summary["shards"].append(info)
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
        n = _expected_from_manifest(_read_json(shard / MANIFEST_FILE))
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

    # Settings: every shard's run key but for shard_index.
    if keys:
        base_dir, base = keys[0]
        for shard, values in keys[1:]:
            from regioncap.rundir import key_changes

            for change in key_changes(_key_without_shard(base), _key_without_shard(values)):
                summary["config_differences"].append(f"{base_dir} vs {shard}: {change}")
        if len(keys) < len(shards):
            summary["config_differences"].append(
                f"{len(shards) - len(keys)} shard(s) have no {RUN_KEY_FILE}; their settings are not checked")
        counts = {v.get("data", {}).get("num_shards", 1) for _, v in keys}
        if len(counts) == 1:
            (num,) = counts
            have = {v.get("data", {}).get("shard_index", 0) for _, v in keys}
            absent = sorted(set(range(num)) - have)
            if absent and len(keys) == len(shards):
                problems.append(f"shard(s) {absent} of data.num_shards={num} are not among the shard dirs")
    if summary["config_differences"] and not force:
        listed = "\n  ".join(summary["config_differences"])
        problems.append(f"the shards were run with other settings (run_key.json); add --force to merge anyway:"
                        f"\n  {listed}")

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
    if expect is not None:
        missing = [i for i in range(expect) if i not in where]
        unexpected = sorted(i for i in where if not 0 <= i < expect)
        summary.update(missing_count=len(missing), missing=missing[:_LIST], unexpected=unexpected[:_LIST])
        if missing:
            more = f" (and {len(missing) - _SHOW} more)" if len(missing) > _SHOW else ""
            problems.append(f"{len(missing)} of {expect} row(s) are in no shard: indexes "
                            f"{', '.join(map(str, missing[:_SHOW]))}{more}")
        if unexpected:
            problems.append(f"{len(unexpected)} row index(es) are past the {expect} expected: {unexpected[:_SHOW]}")

    if problems:
        _write_summary(out, summary)
        raise MergeRefused("\n".join(problems))

    # Each shard's file is in index order unless a retry rewrote it; those few are sorted in memory.
    streams = []
    for shard, info in zip(shards, summary["shards"]):
        if info["sorted"]:
            streams.append(_lines(shard / name))
        else:
            print(f"regioncap.merge: {shard / name} is not in index order (a retried shard?); "
                  f"sorting its {info['rows']} row(s) in memory", file=sys.stderr)
            streams.append(iter(sorted(_lines(shard / name))))
    out.mkdir(parents=True, exist_ok=True)
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
    _write_summary(out, summary)
    return summary


def _write_summary(out: Path, summary: Dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / MERGE_FILE, dumps(summary, indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry; returns the exit status (0 merged, 2 refused)."""
    parser = argparse.ArgumentParser(
        prog="python -m regioncap.merge",
        description="Merge the records of shard runs (data.num_shards/data.shard_index) into one file.")
    parser.add_argument("--out", required=True, type=Path, help="folder for the merged file and merge.json")
    parser.add_argument("shards", nargs="+", type=Path, metavar="SHARD_DIR", help="the shards' run dirs")
    parser.add_argument("--stage", choices=sorted(STAGE_FILES), default="caption",
                        help="merge captions.jsonl (caption, default) or visualize.jsonl")
    parser.add_argument("--expect", type=int, default=None,
                        help="rows of the whole run (indexes 0..N-1); default: from the shards' manifest.json")
    parser.add_argument("--force", action="store_true", help="merge although the shards' run_key.json differ")
    args = parser.parse_args(argv)
    try:
        summary = merge(args.out, args.shards, stage=args.stage, expect=args.expect, force=args.force)
    except MergeRefused as exc:
        print(f"regioncap.merge: refused: {exc}", file=sys.stderr)
        return 2
    print(f"regioncap.merge: {summary['rows']} row(s) from {len(args.shards)} shard(s) -> "
          f"{args.out / STAGE_FILES[args.stage]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
