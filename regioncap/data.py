"""Input rows from DataFlow-MM JSONL files, Hugging Face ``datasets`` or annotation files.

Each source is a :class:`DataSource` subclass, named by ``_target_`` in
``conf/data/NAME.yaml`` (``regioncap.data.JsonlSource``); it owns its settings
(its ``Config``), its reader, whether its path is one file, and which of its
settings decide the rows (``key_fields``).

Every line or record becomes exactly one :class:`InputRow`, including the bad
ones (invalid JSON, not UTF-8, not an object): those carry an ``error`` so the
run can write them out as error rows instead of losing them.

Pure module: no Hydra, no W&B. ``datasets`` is imported only for the ``hf`` source.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Tuple, Type

from regioncap.boxes import BboxFormat
from regioncap.components import TARGET, Component, class_of, setting, short_name
from regioncap.errors import RunError
from regioncap.images import ImageLoadError, file_uri_path, image_uri

#: Longest piece of a bad line quoted back in its error message.
_QUOTE = 120

#: Deepest nesting of lists/objects accepted in a row. Every row is written back
#: (and read again by later stages) with recursive JSON code: a row nested near
#: Python's recursion limit would load here and then crash a later stage.
MAX_NESTING = 100


class DataError(RunError, ValueError):
    """The data source as a whole is unusable (missing file, bad config)."""


@dataclass
class InputRow:
    #: Position in the source (0-based), after ``skip``.
    index: int
    #: Stable id: the ``id_key`` column when set, else ``row-<index>``.
    row_id: str
    #: The image field as given (a path string, an image dict, bytes...).
    image: Any = None
    #: A path string resolved against the JSONL file's folder (None for in-memory images).
    image_path: Optional[str] = None
    bbox: Any = None
    #: Every other field of the row, carried through to the output.
    extra: Dict[str, Any] = field(default_factory=dict)
    #: ``{"kind", "message"}`` when the row could not be read at all.
    error: Optional[Dict[str, str]] = None
    #: 1-based line number in a JSONL file.
    line: Optional[int] = None
    #: ``row_id`` came from the ``id_key`` field (else it is ``row-<index>``).
    id_from_data: bool = False
    #: Content hash of the row (:data:`DIGEST_CHARS` hex digits of a sha256): of the
    #: line's bytes for JSONL (line ending excluded), else of a canonical JSON of the
    #: row's fields. Independent of the row's position, so a resume can tell that the
    #: row at an index is not the one it captioned before.
    digest: Optional[str] = None


#: Hex digits kept of a row's sha256 (64 bits: a chance collision is not a concern).
DIGEST_CHARS = 16


def digest_bytes(data: bytes) -> str:
    """The :attr:`InputRow.digest` of raw row bytes (a JSONL line without its line ending)."""
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


#: `` at 0x7f...``: the memory address in an object's default ``repr``, different in every process.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _digest_default(value: Any) -> Any:
    # Image bytes are hashed, not spelled out: the canonical text stays small.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"sha256": hashlib.sha256(bytes(value)).hexdigest()}
    tobytes, size = getattr(value, "tobytes", None), getattr(value, "size", None)
    if callable(tobytes) and isinstance(size, tuple) and hasattr(value, "mode"):  # a decoded PIL image
        try:
            return {"mode": value.mode, "size": list(size), "sha256": hashlib.sha256(tobytes()).hexdigest()}
        except Exception:  # noqa: BLE001 - an image that does not decode: its repr below, address removed
            pass
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            return tolist()
        except Exception:  # noqa: BLE001
            pass
    # Never a memory address: a row's digest must be the same when a resume reads it again.
    return f"<{type(value).__name__}> {_ADDRESS.sub('', f'{value!s:.1000}')}"


def digest_value(value: Any) -> str:
    """The :attr:`InputRow.digest` of a row that is not a line of bytes (a dataset record,
    an annotation file's entry): sha256 of its canonical JSON (sorted keys)."""
    try:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=_digest_default, allow_nan=True)
    except (TypeError, ValueError, RecursionError):  # mixed key types, ints too long to print, too deep
        text = repr(value) if not isinstance(value, (list, dict)) else _safe_repr(value)
    return digest_bytes(text.encode("utf-8", "surrogatepass"))


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - an int over 4300 digits, recursion: its type and size will do
        return f"<{type(value).__name__} of {len(value)}>"


def resolve_path(path: str) -> Path:
    """Resolve ``pkg://package/relative/path`` into the installed package; else a plain path."""
    if path.startswith("pkg://"):
        package, _, rel = path[len("pkg://") :].partition("/")
        return Path(str(resources.files(package).joinpath(rel)))
    return Path(os.path.expanduser(path))


def data_folder(path: Path) -> Path:
    """The folder a data file's relative image paths resolve against: the folder of the file it is
    (its target, for a symlink: images sit beside the real file), or the folder itself. The same for
    every source, so one data set linked in from elsewhere reads alike through any ``data=``."""
    real = path.resolve()
    return real if real.is_dir() else real.parent


def check_data_config(data_cfg: DataSource.Config) -> Tuple[int, int]:
    """Refuse a row window or shard split that cannot be meant, before anything is read or written.

    :class:`DataError` when ``data.skip`` is not a whole number >= 0, ``data.limit``
    is neither null nor a whole number >= 0, ``data.num_shards`` is under 1, or
    ``data.shard_index`` is not in ``0..num_shards-1``. (A negative skip once
    shifted every index, so a finished run could not be merged.) Returns
    ``(num_shards, shard_index)``.
    """
    skip = getattr(data_cfg, "skip", 0)
    skip = 0 if skip is None else skip
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise DataError(f"data.skip must be a whole number >= 0 (rows to pass over), got {skip!r}")
    limit = getattr(data_cfg, "limit", None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"data.limit must be null (all rows) or a whole number >= 0, got {limit!r}")
    num_shards, shard_index = getattr(data_cfg, "num_shards", 1), getattr(data_cfg, "shard_index", 0)
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise DataError(f"data.num_shards must be a whole number >= 1, got {num_shards!r}")
    if isinstance(shard_index, bool) or not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise DataError(f"data.shard_index must be in 0..{num_shards - 1} (data.num_shards={num_shards}), "
                        f"got {shard_index!r}")
    return num_shards, shard_index


def check_shards(data_cfg: DataSource.Config) -> Tuple[int, int]:
    """``(num_shards, shard_index)`` of ``data_cfg``: :func:`check_data_config`, which also
    checks ``data.skip`` and ``data.limit``, under the name existing callers use."""
    return check_data_config(data_cfg)


def count_rows(data_cfg: DataSource.Config) -> Optional[int]:
    """How many rows :func:`iter_rows` will yield, where that is cheap to know (the source's
    :meth:`DataSource.count`: a JSONL file, one pass counting non-blank lines; a JSON array file,
    its elements; a ``datasets`` source is not opened for it); else None.

    For progress bars only: nothing depends on it being exact.
    """
    total = rows_of_all_shards(data_cfg)
    if total is None:
        return None
    num_shards, shard_index = check_data_config(data_cfg)
    if num_shards > 1:
        total = len(range(shard_index, total, num_shards))
    return total


def rows_of_all_shards(data_cfg: DataSource.Config) -> Optional[int]:
    """How many rows the shards of ``data_cfg`` hold together (``skip`` and ``limit`` applied: what an
    unsharded run reads), where that is cheap to know (see :func:`count_rows`); else None."""
    if not data_cfg.path:
        return None
    total = source_class(data_cfg)(data_cfg).count()
    if total is None:
        return None
    skip, limit = max(0, int(data_cfg.skip or 0)), data_cfg.limit
    total = max(0, total - skip)
    if limit is not None:
        total = min(total, max(0, int(limit)))
    return total


def file_rows(path: Path) -> int:
    """How many rows the JSON Lines or JSON array file ``path`` holds (what ``data=jsonl`` reads from it)."""
    elements = json_array_length(path)
    if elements is not None:
        return elements
    total = 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh):
            if (_strip_bom(raw) if n == 0 else raw).strip():
                total += 1
    return total


def json_array_length(path: Path) -> Optional[int]:
    """The number of elements when ``path`` is a JSON array file of rows, else None (JSON Lines)."""
    elements = _json_array_elements(path)
    return None if elements is None else len(elements)


@dataclass
class RowCount:
    """What :func:`iter_rows` read to the end: the rows of all shards together (``skip`` and ``limit``
    applied, what an unsharded run reads), counted as they are passed over; None until the source
    was read to its end or to ``limit``."""

    rows: Optional[int] = None


def iter_rows(data_cfg: DataSource.Config, count: Optional[RowCount] = None) -> Iterator[InputRow]:
    """Yield the rows selected by ``data_cfg``: ``skip``/``limit`` applied, then this shard's share.

    Shard ``k`` of ``n`` keeps the rows whose index (position after ``skip``)
    is ``k`` modulo ``n``; indexes are those of the unsharded run. ``count``,
    when given, gets the rows of all shards once the source is read through:
    the exact count for every source, where :func:`rows_of_all_shards` knows
    only the cheap ones (a merge checks its shards against it).
    """
    if not data_cfg.path:
        raise DataError("data.path is not set: give a JSONL file or dataset (data.path=FILE)")
    check_data_config(data_cfg)
    rows = source_class(data_cfg)(data_cfg).read()
    num_shards, shard_index = check_data_config(data_cfg)
    skip, limit = int(data_cfg.skip or 0), data_cfg.limit
    seen = 0
    for i, row in enumerate(rows):
        if i < skip:
            continue
        if limit is not None and i - skip >= limit:
            break
        seen = i - skip + 1
        # Shards split the rows an unsharded run would read (after skip/limit) and keep
        # its indexes, so file names never collide and a merge can check exactly-once.
        if (i - skip) % num_shards != shard_index:
            continue
        row.index = i - skip
        if not row.id_from_data:
            row.row_id = f"row-{row.index:07d}"
        if row.digest is None:  # an annotation file's row: its content, never its position
            row.digest = digest_value({"id": row.row_id if row.id_from_data else None, "image": row.image,
                                       "bbox": row.bbox, "extra": row.extra, "error": row.error})
        yield row
    if count is not None:
        count.rows = seen


#: Data file formats ``data=jsonl`` does not read, by extension (DataFlow-MM's storage reads some of them).
_NOT_JSON = {".parquet": "a Parquet file", ".arrow": "an Arrow file", ".csv": "a CSV file", ".tsv": "a TSV file",
             ".pkl": "a serialized Python object", ".xlsx": "a spreadsheet", ".xls": "a spreadsheet"}

#: Compressed and archive files by their first bytes, whatever their name: read as JSON Lines, each
#: run of bytes between two newline bytes would be one invalid_utf8 error row.
_COMPRESSED = ((b"\x1f\x8b", "gzip-compressed", "gunzip -k"), (b"BZh", "bzip2-compressed", "bunzip2 -k"),
               (b"\xfd7zXZ\x00", "xz-compressed", "unxz -k"), (b"\x28\xb5\x2f\xfd", "zstd-compressed", "unzstd"),
               (b"PK\x03\x04", "a zip archive", "unzip"))


def _refuse_compressed(path: Path) -> None:
    with open(path, "rb") as fh:
        start = fh.read(8)
    for magic, what, tool in _COMPRESSED:
        if start.startswith(magic):
            raise DataError(f"data file {path} is {what}, not JSON Lines: decompress it first "
                            f"({tool} {path}) and give the decompressed file as data.path")


#: The UTF-8 byte order mark some editors write at the start of a file; not part of the first row.
_BOM = b"\xef\xbb\xbf"


def _strip_bom(data: bytes) -> bytes:
    return data[len(_BOM):] if data.startswith(_BOM) else data


def require_file(path: Path, what: str, pattern_hint: str) -> None:
    """Refuse a ``data.path`` that is not one regular file, saying what it is instead: a folder
    (naming the data files in it), a ``*`` pattern (never expanded; ``pattern_hint`` says what
    reads several files), missing, or something else (a FIFO, a device)."""
    if path.is_file():
        return
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl") and p.is_file())
        listed = f" (it holds {', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''})" if inside else ""
        raise DataError(f"{what} {path} is a folder, not a file: give the file itself as data.path{listed}")
    if path.exists():
        raise DataError(f"{what} {path} is not a regular file")
    if any(c in str(path) for c in "*?["):
        matches = len(glob.glob(str(path)))
        raise DataError(f"{what} {path} does not exist: data.path names one file, not a pattern "
                        f"({matches} file(s) match it); {pattern_hint}")
    raise DataError(f"{what} {path} does not exist (data.path)")


def _iter_jsonl(path: Path, data_cfg: DataSource.Config) -> Iterator[InputRow]:
    require_file(path, "data file", f"join them into one file, or read them all with data=hf "
                                    f"'data.path={path}' data.hf_builder=json")
    other = _NOT_JSON.get(path.suffix.lower())
    if other is not None:
        raise DataError(f"data file {path} is {other}, not JSON Lines: "
                        + (f"read it with data=hf data.path={path} (the builder follows the extension)"
                           if path.suffix.lower() in _HF_BUILDERS else "convert it to JSON Lines, one row object per line"))
    _refuse_compressed(path)
    base = images_dir(data_cfg, path)
    keys = (data_cfg.image_key, data_cfg.bbox_key, data_cfg.id_key)
    head = _head(path)
    _refuse_one_object(path, head, data_cfg.image_key)
    elements = _json_array_elements(path, head)
    if elements is not None:
        yield from _array_rows(path, elements, keys, base)
        return
    index = 0
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1:
                raw = _strip_bom(raw)  # Windows editors and spreadsheets start UTF-8 files with one
            if not raw.strip():
                continue  # blank lines are not rows
            row = InputRow(index=index, row_id=f"row-{index:07d}", line=line_no,
                           digest=digest_bytes(raw.rstrip(b"\r\n")))
            index += 1
            where = f"{path.name} line {line_no}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                row.error = {"kind": "invalid_utf8", "message": f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})"}
                yield row
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                row.error = {
                    "kind": "invalid_json",
                    "message": f"{where}: invalid JSON ({exc.msg} at column {exc.colno}): {text.strip()[:_QUOTE]!r}",
                }
                yield row
                continue
            except RecursionError:
                row.error = {"kind": "invalid_json",
                             "message": f"{where}: JSON nested too deeply to read: {text.strip()[:_QUOTE]!r}"}
                yield row
                continue
            except ValueError as exc:  # an integer over Python's 4300-digit limit
                row.error = {"kind": "invalid_json", "message": f"{where}: a value cannot be read ({exc})"}
                yield row
                continue
            _object_row(row, obj, keys, base, where, text)
            yield row


def _object_row(row: InputRow, obj: Any, keys: Tuple[str, str, Optional[str]], base: Path, where: str,
                text: Optional[str] = None) -> None:
    """Fill ``row`` from the parsed value ``obj`` (read from the JSON ``text`` when given), or make it
    an error row saying why it cannot be one."""
    problem = _unwritable(obj, text)
    if problem is not None:
        row.error = {"kind": problem[0], "message": f"{where}: {problem[1]}"}
    elif not isinstance(obj, dict):
        row.error = {"kind": "invalid_row", "message": f"{where}: expected a JSON object, got {type(obj).__name__}"}
    else:
        _fill(row, obj, keys[0], keys[1], keys[2], base, where)


#: The most of a file read to tell a JSON array file from JSON Lines (its first non-blank line).
_SNIFF_BYTES = 1 << 16


def _head(path: Path) -> bytes:
    """The start of ``path`` as its rows begin (no byte order mark, no leading blank space): what
    tells a JSON array or a single object from JSON Lines."""
    with open(path, "rb") as fh:
        return _strip_bom(fh.read(_SNIFF_BYTES)).lstrip()


def _json_array_elements(path: Path, head: Optional[bytes] = None) -> Optional[List[Tuple[int, Any]]]:
    """``(line, value)`` of each element when ``path`` is one JSON array (a ``.json`` dump),
    else None (JSON Lines).

    A file is read as a JSON array when its name ends in ``.json`` or its first
    non-blank line is a lone ``[`` (a pretty-printed array, whatever its name). If
    it is not one JSON array but its first non-blank line is a JSON value of its
    own, it is JSON Lines after all (many ``.json`` files are); otherwise it is a
    broken JSON array, refused with where it breaks, since reading it line by line
    would make every line of it an error row.
    """
    head = _head(path) if head is None else head
    if not head.startswith(b"["):
        return None
    if path.suffix.lower() != ".json" and head.split(b"\n", 1)[0].strip() != b"[":
        return None
    data = path.read_bytes()
    raw = _strip_bom(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if _parses(raw.lstrip().split(b"\n", 1)[0]):
            return None
        raise DataError(f"data file {path} starts like a JSON array but is not UTF-8 ({exc.reason} at byte "
                        f"{exc.start + len(data) - len(raw)})") from None
    decoder = json.JSONDecoder()
    elements: List[Tuple[int, Any]] = []
    ws = re.compile(r"[ \t\r\n]*")
    line, counted = 1, 0
    try:
        pos = ws.match(text, text.index("[") + 1).end()
        if text.startswith("]", pos):
            pos += 1
        else:
            while True:
                value, end = decoder.raw_decode(text, pos)
                line, counted = line + text.count("\n", counted, pos), pos
                elements.append((line, value))
                pos = ws.match(text, end).end()
                if text.startswith(",", pos):
                    pos = ws.match(text, pos + 1).end()
                    continue
                if text.startswith("]", pos):
                    pos += 1
                    break
                raise json.JSONDecodeError("expected ',' or ']' after an element", text, pos)
        if ws.match(text, pos).end() != len(text):
            raise json.JSONDecodeError("extra data after the array", text, pos)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        if _parses(text.lstrip().split("\n", 1)[0].encode("utf-8", "surrogatepass")):
            return None
        where = (f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError)
                 else "nested too deeply to read" if isinstance(exc, RecursionError) else str(exc))
        raise DataError(f"data file {path} starts like a JSON array but is not valid JSON ({where}); fix it, "
                        f"or write one JSON object per line (JSON Lines)") from None
    return elements


def _refuse_one_object(path: Path, head: bytes, image_key: str) -> None:
    """Refuse a file that is one JSON object rather than rows: an annotation file (COCO's
    ``{"images", "annotations"}``) given to ``data=jsonl``, or a pretty-printed object,
    which read line by line would be an error row per line."""
    if not head.startswith(b"{"):
        return
    first = head.split(b"\n", 1)[0].strip()
    if path.suffix.lower() != ".json" and first != b"{" and not (b'"images"' in first and b'"annotations"' in first):
        return  # JSON Lines: the first line is a row of its own (the common case, decided without reading on)
    try:
        obj = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        return  # not one object (JSON Lines, or broken): read line by line
    if not isinstance(obj, dict):
        return
    if "images" in obj and "annotations" in obj and image_key not in obj:
        raise DataError(f"data file {path} is a COCO annotation file, not rows: read it with data=coco "
                        f"data.path={path} data.images_dir=FOLDER_OF_ITS_IMAGES")
    if first == b"{":
        keys = ", ".join(sorted(map(str, obj))[:8])
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        raise DataError(f"data file {path} is one JSON object (keys: {keys}), not rows: write one row object "
                        f"per line (JSON Lines) or a JSON array of them"
                        + (f"; its list under {lists[0]!r} may be the rows" if lists else ""))


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except (ValueError, RecursionError):
        return False
    return True


def _array_rows(path: Path, elements: List[Tuple[int, Any]], keys: Tuple[str, str, Optional[str]],
                base: Path) -> Iterator[InputRow]:
    """The rows of a JSON array file: one per element, numbered by the line it starts on."""
    for index, (line_no, obj) in enumerate(elements):
        # Of the element's value, not its text: re-indenting the file changes no digest.
        row = InputRow(index=index, row_id=f"row-{index:07d}", line=line_no, digest=digest_value(obj))
        _object_row(row, obj, keys, base, f"{path.name} item {index} (line {line_no})")
        yield row


def _unwritable(obj: Any, text: Optional[str] = None) -> Optional[tuple]:
    """``(kind, reason)`` when a parsed row cannot be carried to the output files, else None.

    ``text``, when given, is the JSON text ``obj`` was parsed from, as decoded from UTF-8. Quick whole-row checks clear
    almost every row in C (string scans of ``text``, else one JSON encoding); only a row they
    cannot clear is walked value by value, so the answer is always the walk's (:func:`_unwritable_walk`).
    """
    # Every list/object is one "[" or "{" of its JSON text (brackets inside strings only add to
    # the count), so a count up to MAX_NESTING means no value nests MAX_NESTING levels deep.
    # A str decoded from UTF-8 holds no surrogate, so JSON text without any "\u" escape has none.
    if text is not None and "\\u" not in text and text.count("[") + text.count("{") <= MAX_NESTING:
        return None
    try:
        encoded = json.dumps(obj, ensure_ascii=False)
    except Exception:  # noqa: BLE001 - anything the encoder refuses is for the walk to judge
        return _unwritable_walk(obj)
    # The same count on the encoding; encodable as UTF-8 means no string holds an unpaired surrogate.
    if encoded.count("[") + encoded.count("{") <= MAX_NESTING:
        if encoded.isascii():
            return None
        try:
            encoded.encode("utf-8")
            return None
        except UnicodeEncodeError:
            pass
    return _unwritable_walk(obj)


def _unwritable_walk(obj: Any) -> Optional[tuple]:
    """What :func:`_unwritable` answers, found by visiting every value: the first problem met.

    Two things valid JSON can hold that the output cannot: nesting deep enough
    to hit the recursion limit in a later stage, and a ``\\udXXX`` escape for an
    unpaired UTF-16 surrogate, which is not Unicode and fails when the record is
    written as UTF-8. Iterative, so it cannot itself recurse too deeply.
    """
    stack = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    bad = value[exc.start]
                    reason = f"a string holds an unpaired surrogate escape ({bad!r}), which is not valid Unicode"
                    return ("invalid_utf8", reason)
        elif isinstance(value, (list, dict)):
            if depth >= MAX_NESTING:
                return ("invalid_row", f"lists/objects nested over {MAX_NESTING} levels deep")
            items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)
    return None


def _image_path_problem(value: Any, image_key: str) -> Optional[str]:
    """Why ``value`` cannot be an image path, or None."""
    if not isinstance(value, str):
        return f"{image_key!r} must be a path string, got {type(value).__name__}"
    if not value.strip():
        return f"{image_key!r} is an empty string"
    if "\x00" in value:
        return f"{image_key!r} holds a NUL character, which no file path can: {value[:_QUOTE]!r}"
    return None


def _fill(row: InputRow, obj: Dict[str, Any], image_key: str, bbox_key: str,
          id_key: Optional[str], base: Optional[Path], where: str) -> None:
    row.image = obj.get(image_key)
    row.bbox = obj.get(bbox_key)
    if id_key and obj.get(id_key) not in (None, ""):
        row.row_id = str(obj[id_key])
        row.id_from_data = True
    row.extra = {k: v for k, v in obj.items() if k not in (image_key, bbox_key)}
    if image_key not in obj:
        row.error = {"kind": "missing_image_field", "message": f"{where}: no {image_key!r} field"}
    elif isinstance(row.image, str):
        problem = _image_path_problem(row.image, image_key)
        if problem:
            row.error = {"kind": "bad_image_value", "message": f"{where}: {problem}"}
        elif (uri := image_uri(row.image)) == "file":
            try:
                row.image_path = file_uri_path(row.image)
            except ImageLoadError as exc:
                row.error = {"kind": exc.kind, "message": f"{where}: {exc.message}"}
        elif uri is None:
            p = Path(os.path.expanduser(row.image))
            row.image_path = str(p if p.is_absolute() or base is None else base / p)
        # else a data: URI (decoded when the image is loaded) or a URL (refused then, naming it)
    elif isinstance(row.image, dict) and not isinstance(row.image.get("bytes"), (bytes, bytearray, memoryview)):
        # An image dict without real bytes (always so in JSONL) must carry a usable path.
        if row.image.get("path") is None:
            keys = sorted(map(str, row.image))
            problem = f"{image_key!r} is an object without a 'path' string or 'bytes' (keys: {keys})"
        else:
            problem = _image_path_problem(row.image["path"], f"{image_key}.path")
        if problem:
            row.error = {"kind": "bad_image_value", "message": f"{where}: {problem}"}
        else:
            p = Path(row.image["path"])
            row.image_path = str(p if p.is_absolute() or base is None else base / p)
    elif row.image is None:
        row.error = {"kind": "bad_image_value", "message": f"{where}: {image_key!r} is null"}
    elif isinstance(row.image, (int, float, bool, list)):
        row.error = {
            "kind": "bad_image_value",
            "message": f"{where}: {image_key!r} must be a path string or an image, got {type(row.image).__name__}",
        }


#: The ``datasets`` builder of a single data file given as ``data.path`` without ``data.hf_builder``.
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _iter_hf(data_cfg: DataSource.Config) -> Iterator[InputRow]:
    import datasets

    path = str(data_cfg.path)
    local = resolve_path(path)
    base: Optional[Path] = None
    try:
        if local.is_dir() and any((local / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if data_cfg.split not in ds:
                    raise DataError(f"saved dataset {path!r} has no split {data_cfg.split!r} (data.split); its "
                                    f"splits: {', '.join(map(str, ds))}: set data.split={next(iter(ds), '')}")
                ds = ds[data_cfg.split]
            base = data_folder(local)
        else:
            builder = data_cfg.hf_builder
            if not builder and local.is_file():
                # One data file: datasets needs its builder; the file's extension says which.
                builder = _HF_BUILDERS.get(local.suffix.lower())
                if builder is None:
                    raise DataError(f"{local} is a file datasets cannot tell the format of; set data.hf_builder "
                                    f"({', '.join(sorted(set(_HF_BUILDERS.values())))}) or use data=jsonl")
            args = [builder] if builder else [str(local) if local.exists() else path]
            kwargs = dict(data_cfg.hf_kwargs or {})
            if builder == "csv":
                kwargs.setdefault("converters", _csv_text_columns(data_cfg))
            if builder or local.exists():
                base = data_folder(local)
            if builder:
                kwargs.setdefault("data_files", str(local))
            if data_cfg.hf_config:
                args.append(data_cfg.hf_config)
            ds = datasets.load_dataset(*args, split=data_cfg.split, **kwargs)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds; all mean "cannot open"
        raise DataError(f"cannot load dataset {path!r} (split {data_cfg.split!r}): {exc}") from exc
    image_key, bbox_key, id_key = data_cfg.image_key, data_cfg.bbox_key, data_cfg.id_key
    refs_from, refs_key = getattr(data_cfg, "hf_references_key", None), data_cfg.references_key
    for column in (image_key, bbox_key) + ((refs_from,) if refs_from else ()):
        if column not in ds.column_names and column.split(".")[0] not in ds.column_names:
            raise DataError(f"dataset {path!r} has no column {column!r}; columns: {ds.column_names} "
                            f"(a dotted name reads a nested field: objects.bbox)")
    if refs_from and not refs_key:
        raise DataError("data.hf_references_key is set but data.references_key is null: set where references go")
    for column, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            # Decode the image column ourselves, with the same guards as files on disk; never decode
            # another (it is not used, and a decoded image has no stable text for the row's digest).
            ds = ds.cast_column(column, datasets.Image(decode=False))
    names = _class_names(ds.features, refs_from) if refs_from else None
    nested = [k for k in (image_key, bbox_key, id_key) if k and k not in ds.column_names and "." in k]
    for i, obj in enumerate(ds):
        row = InputRow(index=i, row_id=f"row-{i:07d}", digest=digest_value(obj))
        if nested or refs_from:
            obj = dict(obj)
            for key in nested:
                value = field_at(obj, key)
                if value is not _ABSENT:
                    obj[key] = value
            if refs_from:
                obj[refs_key] = _hf_references(field_at(obj, refs_from), names)
        _fill(row, obj, image_key, bbox_key, id_key, base, f"{path} row {i}")
        row.extra = {k: v for k, v in row.extra.items() if _jsonable(v)}
        yield row


def _csv_text_columns(data_cfg: DataSource.Config) -> Dict[str, Callable[[str], str]]:
    """pandas converters that keep the CSV columns holding text as the text written.

    A CSV cell has no type: pandas guesses one per column, so ids ``007`` and ``7``
    both became ``7``, ids in a column with a blank cell became ``1.0``, ``2.0``
    (floats, for the NaN), and a reference ``2`` the number 2.0 (a malformed
    reference). The id, image and references columns are text whatever they look
    like; an empty cell is still null. Other columns keep pandas' types.
    """
    names = (data_cfg.id_key, data_cfg.image_key, data_cfg.references_key,
             getattr(data_cfg, "hf_references_key", None))
    return {name: str for name in names if name and "." not in name}


#: What :func:`field_at` returns for a path a row does not have.
_ABSENT = object()


def field_at(obj: Any, dotted: str) -> Any:
    """The value of ``dotted`` in a row: the key itself when present, else the nested
    field (``objects.bbox``), taken from each item where a level is a list of objects."""
    if isinstance(obj, dict) and dotted in obj:
        return obj[dotted]
    value = obj
    for part in dotted.split("."):
        if isinstance(value, dict):
            if part not in value:
                return _ABSENT
            value = value[part]
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            value = [v.get(part) for v in value]
        else:
            return _ABSENT
    return value


def _class_names(features: Any, dotted: str) -> Optional[List[str]]:
    """Names of the ``ClassLabel`` at ``dotted`` in ``features`` (through lists/sequences), or None."""
    import datasets

    feature = features
    for part in dotted.split(".") if dotted not in features else [dotted]:
        while not isinstance(feature, dict) and hasattr(feature, "feature"):
            feature = feature.feature
        if isinstance(feature, list) and feature:
            feature = feature[0]
        if not isinstance(feature, dict) or part not in feature:
            return None
        feature = feature[part]
    while not isinstance(feature, datasets.ClassLabel) and hasattr(feature, "feature"):
        feature = feature.feature
    if isinstance(feature, list) and feature:
        feature = feature[0]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _hf_references(value: Any, names: Optional[List[str]]) -> Any:
    """One references entry per box: class-label ids as their names; other values as given."""
    if value is _ABSENT or value is None:
        return None
    items = value if isinstance(value, list) else [value]

    def name(v: Any) -> Any:
        if names is not None and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
            return names[v]
        if isinstance(v, list):
            return [name(x) for x in v]
        return v

    return [name(v) for v in items]


# ------------------------------------------------------------------ annotation files (COCO, VG, RefCOCO)
def _load_json(path: Path, what: str) -> Any:
    """The parsed JSON file ``path``; :class:`DataError` naming it when it cannot be read."""
    require_file(path, f"{what} file", "give one annotation file")
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, UTF-8, an int over 4300 digits
        raise DataError(f"{what} file {path} is not readable JSON: {exc}") from exc


def images_dir(data_cfg: DataSource.Config, path: Path) -> Path:
    """Folder the relative image paths of the data file ``path`` (rows, or an annotation file) resolve
    against: ``data.images_dir`` (relative to the file's folder, or absolute), else that folder itself."""
    base = data_folder(path)
    configured = getattr(data_cfg, "images_dir", None)
    if not configured:
        return base
    p = resolve_path(str(configured))
    return p if p.is_absolute() else base / p


def _is_id(value: Any) -> bool:
    """True when ``value`` can name an image, annotation or category: a JSON scalar, never a list
    or an object (they cannot be dict keys, and as ids they name nothing). Every adapter checks
    an id with this before using it as a key, so one odd entry is one error row, not a crash."""
    return value is not None and isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _error_row(row_id: str, kind: str, message: str, **extra: Any) -> InputRow:
    return InputRow(index=0, row_id=row_id, error={"kind": kind, "message": message}, extra=extra,
                    id_from_data=True)


def _image_row(row_id: str, image_file: Any, folder: Path, where: str, boxes: List[Any], extra: Dict[str, Any],
               references_key: Optional[str], references: List[Any]) -> InputRow:
    """One row of an annotation adapter: an error row when the image file is not usable."""
    if references_key:
        extra[references_key] = references
    problem = _image_path_problem(image_file, "file_name")
    if problem:
        return _error_row(row_id, "bad_image_value", f"{where}: {problem}", **extra)
    path = Path(image_file) if Path(image_file).is_absolute() else folder / image_file
    if not path.is_file():
        return _error_row(row_id, "image_not_found",
                          f"{where}: image {image_file!r} not found in {folder} (set data.images_dir)", **extra)
    return InputRow(index=0, row_id=row_id, image=str(image_file), image_path=str(path), bbox=boxes, extra=extra,
                    id_from_data=True)


def _iter_coco(path: Path, data_cfg: DataSource.Config) -> Iterator[InputRow]:
    """COCO instances JSON: one row per entry of ``images`` with all its annotations' boxes."""
    doc = _load_json(path, "COCO instances")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations", []), list):
        raise DataError(f"{path} is not a COCO instances file: expected an object with 'images' and "
                        f"'annotations' lists")
    folder, name, refs_key = images_dir(data_cfg, path), path.name, data_cfg.references_key
    crowd = str(getattr(data_cfg, "coco_iscrowd", "keep"))
    if crowd not in ("keep", "skip"):
        raise DataError(f"data.coco_iscrowd must be 'keep' or 'skip', got {crowd!r}")
    categories: Dict[Any, Any] = {}
    bad: List[InputRow] = []
    for i, cat in enumerate(doc.get("categories") or []):
        if not isinstance(cat, dict) or not _is_id(cat.get("id")):
            bad.append(_error_row(f"category-entry-{i}", "invalid_category",
                                  f"{name} categories[{i}]: expected an object with a number or string 'id', "
                                  f"got {_quote(cat)}"))
            continue
        categories[cat["id"]] = cat.get("name")
    by_image: Dict[Any, List[Dict[str, Any]]] = {}
    for i, ann in enumerate(doc.get("annotations") or []):
        if not isinstance(ann, dict) or not _is_id(ann.get("image_id")):
            bad.append(_error_row(f"annotation-{i}", "invalid_annotation",
                                  f"{name} annotations[{i}]: expected an object with an 'image_id', got "
                                  f"{_quote(ann)}"))
            continue
        if ann.get("category_id") is not None and not _is_id(ann["category_id"]):
            bad.append(_error_row(f"annotation-{i}", "invalid_annotation",
                                  f"{name} annotations[{i}] (image id {ann['image_id']!r}): 'category_id' must be "
                                  f"a number or string, got {_quote(ann['category_id'])}",
                                  image_id=ann["image_id"], annotation_id=ann.get("id")))
            continue
        by_image.setdefault(ann["image_id"], []).append(ann)
    seen = set()
    for i, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or not _is_id(img.get("id")):
            bad.append(_error_row(f"image-entry-{i}", "invalid_image_entry",
                                  f"{name} images[{i}]: expected an object with an 'id', got "
                                  f"{_quote(img)}"))
            continue
        image_id = img["id"]
        where = f"{name} image id {image_id} (images[{i}])"
        if image_id in seen:
            bad.append(_error_row(f"{image_id}-dup{i}", "duplicate_image_id", f"{where}: image id given twice"))
            continue
        seen.add(image_id)
        anns = by_image.pop(image_id, [])
        skipped = [a.get("id") for a in anns if a.get("iscrowd") and crowd == "skip"]
        anns = [a for a in anns if not (a.get("iscrowd") and crowd == "skip")]
        extra: Dict[str, Any] = {
            "image_id": image_id, "file_name": img.get("file_name"), "width": img.get("width"),
            "height": img.get("height"), "annotation_ids": [a.get("id") for a in anns],
            "category_ids": [a.get("category_id") for a in anns],
            "iscrowd": [int(bool(a.get("iscrowd"))) for a in anns],
        }
        if skipped:
            extra["crowd_annotation_ids"] = skipped
        refs = [[categories[a.get("category_id")]] if isinstance(categories.get(a.get("category_id")), str) else []
                for a in anns]
        # One box per annotation: a bbox that is not a list (null, a string) goes in as {"bbox": value}, or
        # a list of only such values reads as one bare box ([None, None]: "1 box of 2 values").
        boxes = [a.get("bbox") if isinstance(a.get("bbox"), (list, dict)) else {"bbox": a.get("bbox")} for a in anns]
        yield _image_row(str(image_id), img.get("file_name"), folder, where, boxes, extra, refs_key, refs)
    for image_id, anns in by_image.items():  # annotations of images the file does not list
        ids = [a.get("id") for a in anns]
        bad.append(_error_row(f"unknown-image-{image_id}", "unknown_image_id",
                              f"{name}: annotations {ids[:20]} name image_id {image_id!r}, which is not in 'images'",
                              image_id=image_id, annotation_ids=ids))
    yield from bad


def _iter_vg(path: Path, data_cfg: DataSource.Config) -> Iterator[InputRow]:
    """Visual Genome region descriptions: one row per image, one box per region, its phrase the reference."""
    doc = _load_json(path, "Visual Genome region descriptions")
    if not isinstance(doc, list):
        raise DataError(f"{path} is not a Visual Genome region descriptions file: expected a JSON list of "
                        f"{{'id', 'regions': [...]}} objects")
    folder, name, refs_key = images_dir(data_cfg, path), path.name, data_cfg.references_key
    for i, entry in enumerate(doc):
        regions = entry.get("regions") if isinstance(entry, dict) else None
        image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
        if image_id is None and isinstance(regions, list):
            image_id = next((r.get("image_id") for r in regions if isinstance(r, dict) and r.get("image_id")), None)
        if not isinstance(regions, list) or not _is_id(image_id):
            yield _error_row(f"entry-{i}", "invalid_entry",
                             f"{name} entry {i}: expected {{'id', 'regions': [...]}}, got {_quote(entry)}")
            continue
        boxes, refs, region_ids = [], [], []
        for reg in regions:
            reg = reg if isinstance(reg, dict) else {}
            boxes.append([reg.get("x"), reg.get("y"), reg.get("width"), reg.get("height")])
            phrase = reg.get("phrase")
            refs.append([phrase] if isinstance(phrase, str) and phrase.strip() else [])
            region_ids.append(reg.get("region_id", reg.get("id")))
        extra = {"image_id": image_id, "region_ids": region_ids}
        yield _image_row(str(image_id), f"{image_id}.jpg", folder, f"{name} entry {i} (image id {image_id})",
                         boxes, extra, refs_key, refs)


_REF_SUFFIX = re.compile(r"^(?P<stem>.+)_\d+(?P<ext>\.\w+)$")


def _sentences(ref: Dict[str, Any]) -> List[str]:
    """The referring expressions of one ref: ``sentences`` (strings or ``{"sent"|"raw"}``),
    else ``refs``, ``captions``, ``expressions`` or one ``sentence``."""
    for key in ("sentences", "refs", "captions", "expressions", "sentence"):
        value = ref.get(key)
        if value is None:
            continue
        items = [value] if isinstance(value, (str, dict)) else value if isinstance(value, list) else []
        out = []
        for item in items:
            text = item.get("sent", item.get("raw")) if isinstance(item, dict) else item
            if isinstance(text, str) and text.strip():
                out.append(text.strip())
        return out
    return []


def _ref_bbox(ref: Dict[str, Any]) -> Any:
    if "bbox" in ref:
        return ref["bbox"]
    ann = ref.get("ann") or ref.get("raw_anns")
    if isinstance(ann, str):
        try:
            ann = json.loads(ann)
        except (ValueError, RecursionError):
            return None
    return ann.get("bbox") if isinstance(ann, dict) else None


def _read_refs(path: Path) -> Tuple[List[Any], Dict[Any, Any]]:
    """``(refs, {image id: file_name})`` of a RefCOCO-style JSON, JSON-lines or ``{"refs", "images"}`` file."""
    if path.suffix.lower() == ".jsonl":
        require_file(path, "RefCOCO-style refs file", "give one refs file")
        refs: List[Any] = []
        with open(path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                if raw.strip():
                    try:
                        refs.append(json.loads(raw))
                    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, an int over 4300 digits
                        refs.append(_BadLine(line_no, str(exc) or type(exc).__name__))
        return refs, {}
    doc = _load_json(path, "RefCOCO-style refs")
    if isinstance(doc, list):
        return doc, {}
    if isinstance(doc, dict) and isinstance(doc.get("refs"), list):
        files: Dict[Any, Any] = {}
        for i, im in enumerate(doc.get("images") or []):
            if isinstance(im, dict) and _is_id(im.get("id")):
                files[im["id"]] = im.get("file_name")
            else:  # read as a bad line: one error row naming the entry
                doc["refs"].append(_BadLine(None, f"images[{i}]: expected an object with a number or string 'id', "
                                                  f"got {_quote(im)}", f"image-entry-{i}"))
        return doc["refs"], files
    raise DataError(f"{path} is not a RefCOCO-style refs file: expected a JSON list of refs, JSON lines, "
                    f"or an object with a 'refs' list (and optionally 'images')")


@dataclass
class _BadLine:
    #: Line number in a JSON-lines file; None for an entry of the ``images`` list.
    line: Optional[int]
    reason: str
    #: The error row's id when it is not ``ref-entry-<i>`` (an ``images`` entry).
    row_id: Optional[str] = None


def _iter_refcoco(path: Path, data_cfg: DataSource.Config) -> Iterator[InputRow]:
    """RefCOCO/RefCOCO+/RefCOCOg refs as JSON: refs grouped by image, one box per ref, its
    referring expressions the references (see docs/formats.md for the layout)."""
    refs, files = _read_refs(path)
    folder, name, refs_key = images_dir(data_cfg, path), path.name, data_cfg.references_key
    split = getattr(data_cfg, "ref_split", None)
    groups: Dict[Any, Dict[str, Any]] = {}
    order: List[Any] = []
    for i, ref in enumerate(refs):
        where = f"{name} line {ref.line}" if isinstance(ref, _BadLine) and ref.line is not None \
            else name if isinstance(ref, _BadLine) else f"{name} ref {i}"
        if isinstance(ref, _BadLine) or not isinstance(ref, dict) or not _is_id(ref.get("image_id")):
            reason = ref.reason if isinstance(ref, _BadLine) else f"expected an object with an 'image_id', got " \
                                                                   f"{_quote(ref)}"
            key = ("bad", i)
            row_id = (ref.row_id if isinstance(ref, _BadLine) else None) or f"ref-entry-{i}"
            groups[key] = {"error": _error_row(row_id, "invalid_ref", f"{where}: {reason}")}
            order.append(key)
            continue
        if split and ref.get("split") != split:
            continue
        image_id = ref["image_id"]
        if image_id not in groups:
            groups[image_id] = {"refs": [], "first": i}
            order.append(image_id)
        groups[image_id]["refs"].append(ref)
    for key in order:
        group = groups[key]
        if "error" in group:
            yield group["error"]
            continue
        members = group["refs"]
        file_name = next((r.get("file_name") for r in members if r.get("file_name")), None) or files.get(key)
        where = f"{name} image id {key} (ref {group['first']})"
        extra = {"image_id": key, "file_name": file_name,
                 "ref_ids": [r.get("ref_id") for r in members], "ann_ids": [r.get("ann_id") for r in members]}
        if file_name is None:
            yield _error_row(str(key), "unknown_image_id",
                             f"{where}: no 'file_name' on its refs and image id {key!r} is not in 'images'", **extra)
            continue
        if isinstance(file_name, str) and not (folder / file_name).is_file():
            # RefCOCO's refs name the image with the annotation id appended
            # (COCO_train2014_000000581857_16.jpg): the COCO file is without it.
            m = _REF_SUFFIX.match(file_name)
            if m and (folder / f"{m['stem']}{m['ext']}").is_file():
                file_name = f"{m['stem']}{m['ext']}"
        yield _image_row(str(key), file_name, folder, where, [_ref_bbox(r) for r in members], extra, refs_key,
                         [_sentences(r) for r in members])


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError, RecursionError):
        return False


def _quote(value: Any) -> str:
    """The start of ``value`` as JSON, for an error message (never fails)."""
    try:
        return json.dumps(value)[:_QUOTE]
    except (TypeError, ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def fingerprint_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a data file, for the run manifest."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ the sources


class DataSource(Component):
    """Base of every data source: a component named by ``_target_`` in ``conf/data/NAME.yaml``.

    A source reads its rows in source order (:meth:`read`); :func:`iter_rows`
    applies ``skip``, ``limit`` and the shard split to any source the same way.
    """

    @dataclass
    class Config(Component.Config):
        """What every source has: where the rows are, which fields hold what, which rows to read."""

        #: The option's name (``data=demo``).
        name: Optional[str] = None
        #: The file, folder or dataset the rows come from; ``pkg://regioncap/...`` points inside
        #: the installed package.
        path: Optional[str] = None
        #: Image and box fields; for ``hf`` a dotted path reads a nested field (``objects.bbox``).
        image_key: str = "image"
        bbox_key: str = "bbox"
        #: Field holding a stable row id; rows without it get ``row-<position>``.
        id_key: Optional[str] = "id"
        #: Field holding reference captions, one entry per box in ``bbox`` order
        #: (a string or a list of strings each); rows without it are not scored.
        references_key: Optional[str] = "references"
        #: ``xywh`` (DataFlow-MM), ``xyxy``, ``cxcywh``, ``xywh_norm``,
        #: ``xyxy_norm``, ``cxcywh_norm``, ``qwen1000`` (Qwen2-VL's 0-1000 grid).
        bbox_format: BboxFormat = BboxFormat.xywh
        #: Read at most this many rows (after ``skip``).
        limit: Optional[int] = None
        skip: int = 0
        #: Split the run into ``num_shards`` runs: shard ``shard_index`` reads the rows
        #: (after ``skip``/``limit``) whose index is ``shard_index`` modulo ``num_shards``.
        #: ``python -m regioncap.merge`` joins the shards' records.
        num_shards: int = 1
        shard_index: int = 0

    #: ``data.path`` is one file: the manifest fingerprints it (sha256 and line count); else a
    #: ``datasets`` folder or name, fingerprinted by ``datasets``.
    one_file: ClassVar[bool] = True
    #: Settings of this source's ``Config`` that decide which rows are read: in the run key
    #: (``run_key.json``) when set other than their default.
    key_fields: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, cfg: DataSource.Config) -> None:
        #: The ``data`` section: this class's ``Config`` (or anything with its fields as attributes).
        self.cfg = cfg

    def read(self) -> Iterator[InputRow]:
        """The rows in source order (indexes, skip, limit and shards are :func:`iter_rows`' work)."""
        raise NotImplementedError

    def count(self) -> Optional[int]:
        """How many rows :meth:`read` gives, where that is cheap to know; else None (progress bars only)."""
        return None

    @classmethod
    def key_defaults(cls) -> Dict[str, Any]:
        """``{field: default}`` of :attr:`key_fields`, from this source's ``Config``."""
        defaults = {f.name: f.default for f in fields(cls.Config)}
        return {k: defaults[k] for k in cls.key_fields}


class JsonlSource(DataSource):
    """DataFlow-MM JSONL (or a JSON array of rows): image paths resolve against the file's folder."""

    @dataclass
    class Config(DataSource.Config):
        #: Folder relative image paths resolve against: relative to the data file's folder (or
        #: absolute); unset: that folder itself. DataFlow-MM's own files name images relative to
        #: the folder its pipeline ran from (``../example_data/...``): point this there.
        images_dir: Optional[str] = None

    name = "jsonl"
    key_fields = ("images_dir",)

    def read(self) -> Iterator[InputRow]:
        return _iter_jsonl(resolve_path(str(self.cfg.path)), self.cfg)

    def count(self) -> Optional[int]:
        try:
            return file_rows(resolve_path(str(self.cfg.path)))
        except (OSError, DataError):
            return None


class HfSource(DataSource):
    """Hugging Face ``datasets``: a hub name, a saved dataset, a data folder or a data file."""

    @dataclass
    class Config(DataSource.Config):
        #: Builder name for local files (``json``, ``parquet``, ``imagefolder``...), config name,
        #: split, and extra ``load_dataset`` kwargs.
        hf_builder: Optional[str] = None
        hf_config: Optional[str] = None
        split: str = "train"
        hf_kwargs: Dict[str, Any] = field(default_factory=dict)
        #: Column holding one reference (or a list of them) per box, copied to
        #: ``references_key``; a dotted path reads a nested field (``objects.category``);
        #: class-label ids become their names.
        hf_references_key: Optional[str] = None

    name = "hf"
    one_file = False

    def read(self) -> Iterator[InputRow]:
        return _iter_hf(self.cfg)


class AnnotationSource(DataSource):
    """An annotation file (COCO, Visual Genome, RefCOCO): rows grouped by image, ids from the file."""

    @dataclass
    class Config(DataSource.Config):
        #: Rows take their ids from the annotation file.
        id_key: Optional[str] = None
        #: Folder holding the images the file names (for ``vg``, ``<image_id>.jpg``), relative to
        #: the annotation file's folder; unset: that folder itself.
        images_dir: Optional[str] = None

    key_fields = ("images_dir",)
    #: ``(path, data_cfg) -> rows``: the adapter of this file format.
    reader: ClassVar[Callable[[Path, Any], Iterator[InputRow]]]

    def read(self) -> Iterator[InputRow]:
        return type(self).reader(resolve_path(str(self.cfg.path)), self.cfg)


class CocoSource(AnnotationSource):
    """COCO instances JSON: one row per image with all its annotations' boxes."""

    @dataclass
    class Config(AnnotationSource.Config):
        #: ``keep`` crowd annotations (``iscrowd: 1``, a box around a group) as regions, or
        #: ``skip`` them (their ids listed in the row's ``crowd_annotation_ids``).
        coco_iscrowd: str = "keep"

    name = "coco"
    key_fields = ("images_dir", "coco_iscrowd")
    reader = staticmethod(_iter_coco)


class VgSource(AnnotationSource):
    """Visual Genome region descriptions: one row per image, one box per region, its phrase the reference."""

    name = "vg"
    reader = staticmethod(_iter_vg)


class RefcocoSource(AnnotationSource):
    """RefCOCO/RefCOCO+/RefCOCOg refs as JSON or JSON lines: one box per ref, its expressions the references."""

    @dataclass
    class Config(AnnotationSource.Config):
        #: Read only the refs whose ``split`` field is this (``train``, ``val``, ``testA``...); unset: every ref.
        ref_split: Optional[str] = None

    name = "refcoco"
    key_fields = ("images_dir", "ref_split")
    reader = staticmethod(_iter_refcoco)


def source_class(data_cfg: Any) -> Type[DataSource]:
    """The :class:`DataSource` subclass the ``data`` section names by ``_target_`` (its module imported).

    Raises:
        RunError: no ``_target_``, or one that does not import or is not a :class:`DataSource`
            (the message names ``data._target_``).
    """
    return class_of(data_cfg, DataSource, "data")


def source_name(data_cfg: Any) -> str:
    """The short name of the section's source (``jsonl``, ``coco``...): the manifest's ``data.source``
    and the run key's; for a section recorded before sources were classes, its ``source``."""
    if setting(data_cfg, TARGET) is None and setting(data_cfg, "source"):
        return str(setting(data_cfg, "source"))
    return short_name(source_class(data_cfg))
