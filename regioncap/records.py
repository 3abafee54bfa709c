"""Streaming JSONL output: one record per line, written as it is produced."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from regioncap.record_types import Record, RecordError, Region


#: How deep :func:`dumps` follows nested lists and dicts when it has to clean a value;
#: anything deeper is written as a string saying so.
MAX_DEPTH = 200


def _default(value: Any) -> Any:
    # Tuples, paths, numpy scalars and arrays and the like: write something readable rather than fail the row.
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    for method in ("tolist", "item"):  # numpy arrays and scalars, torch tensors
        if callable(getattr(value, method, None)):
            try:
                return getattr(value, method)()
            except Exception:  # noqa: BLE001 - an object with an odd item(): fall through to str
                pass
    try:
        return str(value)
    except Exception:  # noqa: BLE001
        return f"<unprintable {type(value).__name__}>"


def _clean_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (a surrogate pair becomes its character)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _clean(value: Any, depth: int, path: set) -> Any:
    """``value`` as plain JSON: non-finite floats (and ints too long to print) -> None,
    lone surrogates -> U+FFFD, odd objects through :func:`_default`."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, int):
        return value if value.bit_length() < 14_000 else None  # ~4200 digits: int->str refuses over 4300
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_DEPTH:
        return f"<nested deeper than {MAX_DEPTH}>"
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        if id(value) in path:
            return "<circular reference>"
        path.add(id(value))
        try:
            if isinstance(value, dict):
                return {_clean_key(k): _clean(v, depth + 1, path) for k, v in value.items()}
            return [_clean(v, depth + 1, path) for v in value]
        finally:
            path.discard(id(value))
    return _clean(_default(value), depth + 1, path)


def _clean_key(key: Any) -> str:
    if isinstance(key, str):
        return _clean_text(key)
    if isinstance(key, float) and not math.isfinite(key):
        return str(key)
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(_clean(key, 0, set()))
    return _clean_text(str(_default(key)))


#: Characters ``str.splitlines()`` breaks lines at that JSON allows raw inside strings: written as
#: ``\uXXXX`` escapes, so every reader of a JSONL line (also one splitting with splitlines) sees one record.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def dumps(record: Any, *, indent: Optional[int] = None, sort_keys: bool = False) -> str:
    """``record`` as strict JSON text: the one writer of every JSON file a run writes.

    Never writes ``NaN``/``Infinity`` (a non-finite float becomes ``null``, as
    does an int too long to print), never holds a lone surrogate (it becomes
    U+FFFD, so the text always encodes as UTF-8), and writes other objects
    (tuples, numpy values, paths) as lists, numbers or strings. Circular and
    overly deep values are written as a string saying so rather than failing.
    U+0085, U+2028 and U+2029 are escaped, so a record is one line for every
    line splitter. docs/formats.md documents these rules.
    """
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False, default=_default,
                          indent=indent, sort_keys=sort_keys)
        text.encode("utf-8")  # a lone surrogate passes json.dumps but no UTF-8 file can hold it
    except (ValueError, TypeError, RecursionError, UnicodeEncodeError):
        # The rare value that needs cleaning: walk it once (sort_keys may meet mixed key types: keys are str now).
        text = json.dumps(_clean(record, 0, set()), ensure_ascii=False, allow_nan=False, indent=indent,
                          sort_keys=sort_keys)
    # Outside strings json.dumps writes none of these, so escaping them keeps the JSON's value.
    return text.translate(_LINE_BREAKS) if ("\x85" in text or "\u2028" in text or "\u2029" in text) else text


class JsonlWriter:
    """Append records to a JSONL file; each line is flushed as written.

    Memory does not grow with the data set: nothing is kept after a write.
    ``close`` fsyncs, so a finished stage's file is on disk when the run says so.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def write(self, record: Dict[str, Any]) -> None:
        self._fh.write(dumps(record) + "\n")
        self._fh.flush()
        self.count += 1

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _parse_record(raw: bytes) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """``(record, None)`` for a line holding a record, else ``(None, why not)``."""
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        return None, f"not JSON ({exc})"
    return (rec, None) if isinstance(rec, dict) else (None, "not a JSON object")


def _damage(path: Path, bad: Tuple[int, str], advice: str = "") -> "CorruptRecordsError":
    """The error for a bad line (``bad``: its number and why) with good records after it."""
    return CorruptRecordsError(f"{path}:{bad[0]}: {bad[1]}, yet good records follow it; this is not what a crash "
                               f"leaves.{advice}")


def read_jsonl(path: Path, *, torn: Optional[Callable[[str], None]] = None) -> Iterator[Dict[str, Any]]:
    """Yield the records of a JSONL file regioncap wrote, maybe in a run that was killed.

    A killed writer leaves at most a torn tail (see :func:`scan_records`): it is
    left out, and ``torn`` (default: a warning on the ``regioncap`` logger) is
    told what went. A bad line with good records after it is damage no crash
    explains: :class:`CorruptRecordsError` naming the file and line.
    """
    bad: Optional[Tuple[int, str]] = None
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            rec, reason = _parse_record(raw)
            if reason is not None:
                bad = bad or (line_no, reason)
                continue
            if bad is not None:
                raise _damage(path, bad)
            yield rec
    if bad is not None:
        message = f"{path}: left out line {bad[0]} on ({bad[1]}): the torn tail a killed run leaves"
        if torn is not None:
            torn(message)
        else:
            logging.getLogger("regioncap").warning("%s", message)


class CommitWriter:
    """Append records to a JSONL file in commits that survive a killed process.

    ``commit`` writes a batch of records with one ``write``, then flushes and
    fsyncs: after it returns, the batch is on disk whatever happens to the
    process. A process killed inside ``commit`` leaves at most one torn line
    at the end of the file, which :func:`repair_tail` cuts off on resume.
    ``stage`` names the failpoints (``<stage>.before_commit`` ...).
    """

    def __init__(self, path: Path, *, stage: str, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self._fh = open(self.path, "ab" if append else "wb")
        self.count = 0
        self.commits = 0

    def commit(self, records: List[Dict[str, Any]]) -> None:
        """Write ``records`` and make them durable (flush + fsync)."""
        from regioncap.failpoints import failpoint

        if not records:
            return
        data = "".join(dumps(r) + "\n" for r in records).encode("utf-8")
        failpoint(f"{self.stage}.before_commit")
        failpoint(f"{self.stage}.mid_line", lambda: self._torn_write(data))
        self._fh.write(data)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.count += len(records)
        self.commits += 1
        failpoint(f"{self.stage}.after_commit")

    def _torn_write(self, data: bytes) -> None:
        # Everything up to the middle of the batch's last line: what a kill in a write leaves.
        last = data.rstrip(b"\n").rfind(b"\n") + 1
        self._fh.write(data[: last + (len(data) - last) // 2])
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> "CommitWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CorruptRecordsError(ValueError):
    """A records file is damaged somewhere other than its last line."""


def scan_records(path: Path, pick: Callable[[Dict[str, Any]], Any] = lambda rec: rec, *,
                 repair: bool = True) -> Tuple[List[Any], Optional[str]]:
    """Read a records file left by a (maybe killed) run: ``([pick(record)...], what_was_cut)``.

    ``pick`` keeps what the caller needs of each record (a resume keeps
    ``index`` and ``id`` only, so memory does not grow with the records' size).

    A killed writer leaves at most a torn tail: a last line without ``\\n``, or
    lines that do not parse (a partly flushed page). With ``repair`` the file
    is truncated to its last good line and ``what_was_cut`` says what went;
    a bad line followed by good ones is damage no crash explains and raises
    :class:`CorruptRecordsError` naming the line.
    """
    records: List[Any] = []
    good_end = 0
    bad: Optional[Tuple[int, str]] = None  # first bad line: number, reason
    with open(path, "rb") as fh:
        offset = 0
        for line_no, raw in enumerate(fh, 1):
            offset += len(raw)
            if not raw.strip():
                if bad is None:
                    good_end = offset
                continue
            if raw.endswith(b"\n"):
                rec, reason = _parse_record(raw)
            else:
                rec, reason = None, "no newline at the end (a torn write)"
            if reason is None:
                if bad is not None:
                    raise _damage(path, bad, " Move the file away and start a new run (a new hydra.run.dir)")
                records.append(pick(rec))
                good_end = offset
            elif bad is None:
                bad = (line_no, reason)
        size = offset
    if bad is None:
        return records, None
    cut = f"{path}: cut {size - good_end} byte(s) from line {bad[0]} on: {bad[1]}"
    if repair:
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return records, cut


def rewrite_atomically(path: Path, records: Iterable[Dict[str, Any]]) -> int:
    """Replace ``path`` with ``records``: temp file, fsync, ``os.replace``, fsync of the folder.

    A crash at any point leaves either the old file or the new one, never a mix.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as fh:
        for rec in records:
            fh.write((dumps(rec) + "\n").encode("utf-8"))
            n += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return n


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` the way :func:`rewrite_atomically` does."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Longest text (caption, id, error message, reference) the end-of-run summary shows of a record:
#: a model that runs on to its token limit would otherwise put a whole page in the log.
SAMPLE_CHARS = 200


def cut_text(text: str, n: int) -> str:
    """``text`` cut to at most ``n`` characters, the last one an ellipsis when it was cut."""
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def caption_samples(path: Path, *, rows: int = 4, regions: int = 6,
                    reference: Optional[Callable[[Record, Region], List[str]]] = None) -> str:
    """The captions of the first ``rows`` records of a records file, one region per line, for the
    end-of-run summary (only those records are read, however long the file).

    ``reference(record, region)`` returns a region's reference captions; when
    given, each line shows the first one beside the caption.
    """
    import itertools

    def cut(value: Any) -> str:
        return cut_text(str(value), SAMPLE_CHARS)

    lines: List[str] = []
    shown = 0
    for raw in itertools.islice(read_jsonl(path), rows):
        rec = Record.from_dict(raw)
        shown += 1
        label = cut(rec.id)
        if rec.error:
            err = rec.error if isinstance(rec.error, RecordError) else RecordError()
            lines.append(f"  {label}: error ({cut(err.kind)}): {cut(err.message)}")
            continue
        for reg in list(rec.iter_regions())[:regions]:
            text = reg.caption
            quoted = (json.dumps(cut(text), ensure_ascii=False) if text is not None
                      else f"<missing: {reg.reason or reg.missing}>")
            refs = reference(rec, reg) if reference else []
            lines.append(f"  {label} [{reg.id}] {quoted}" + (f"  (reference: {cut(refs[0])})" if refs else ""))
        more = len(rec.regions or []) - regions
        if more > 0:
            lines.append(f"  {label} ... {more} more region(s)")
    if not lines:
        return ""
    return "\n".join([f"captions of the first {shown} row(s) (all of them in {path.name}):", *lines])
