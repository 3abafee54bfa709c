"""Input rows from DataFlow-MM JSONL files or Hugging Face ``datasets``.

Every line or record becomes exactly one :class:`InputRow`, including the bad
ones (invalid JSON, not UTF-8, not an object): those carry an ``error`` so the
run can write them out as error rows instead of losing them.

Pure module: no Hydra, no W&B. ``datasets`` is imported only for the ``hf`` source.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from regioncap.errors import RunError

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


def resolve_path(path: str) -> Path:
    """Resolve ``pkg://package/relative/path`` into the installed package; else a plain path."""
    if path.startswith("pkg://"):
        package, _, rel = path[len("pkg://") :].partition("/")
        return Path(str(resources.files(package).joinpath(rel)))
    return Path(os.path.expanduser(path))


def check_shards(data_cfg: Any) -> tuple:
    """``(num_shards, shard_index)`` of ``data_cfg``; :class:`DataError` when they do not fit together."""
    num_shards, shard_index = getattr(data_cfg, "num_shards", 1), getattr(data_cfg, "shard_index", 0)
    if not isinstance(num_shards, int) or num_shards < 1:
        raise DataError(f"data.num_shards must be a whole number >= 1, got {num_shards!r}")
    if not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise DataError(f"data.shard_index must be in 0..{num_shards - 1} (data.num_shards={num_shards}), "
                        f"got {shard_index!r}")
    return num_shards, shard_index


def iter_rows(data_cfg: Any) -> Iterator[InputRow]:
    """Yield the rows selected by ``data_cfg``: ``skip``/``limit`` applied, then this shard's share.

    Shard ``k`` of ``n`` keeps the rows whose index (position after ``skip``)
    is ``k`` modulo ``n``; indexes are those of the unsharded run.
    """
    if not data_cfg.path:
        raise DataError("data.path is not set: give a JSONL file or dataset (data.path=FILE)")
    if data_cfg.source == "jsonl":
        rows = _iter_jsonl(resolve_path(data_cfg.path), data_cfg)
    elif data_cfg.source == "hf":
        rows = _iter_hf(data_cfg)
    else:
        raise DataError(f"unknown data.source {data_cfg.source!r}; use 'jsonl' or 'hf'")
    skip, limit = int(data_cfg.skip or 0), data_cfg.limit
    num_shards, shard_index = check_shards(data_cfg)
    for i, row in enumerate(rows):
        if i < skip:
            continue
        if limit is not None and i - skip >= limit:
            break
        # Shards split the rows an unsharded run would read (after skip/limit) and keep
        # its indexes, so file names never collide and a merge can check exactly-once.
        if (i - skip) % num_shards != shard_index:
            continue
        row.index = i - skip
        if not row.id_from_data:
            row.row_id = f"row-{row.index:07d}"
        yield row


def _iter_jsonl(path: Path, data_cfg: Any) -> Iterator[InputRow]:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data file {path} is not a regular file")
    base = path.resolve().parent
    image_key, bbox_key, id_key = data_cfg.image_key, data_cfg.bbox_key, data_cfg.id_key
    index = 0
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue  # blank lines are not rows
            row = InputRow(index=index, row_id=f"row-{index:07d}", line=line_no)
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
            problem = _unwritable(obj)
            if problem is not None:
                row.error = {"kind": problem[0], "message": f"{where}: {problem[1]}"}
                yield row
                continue
            if not isinstance(obj, dict):
                row.error = {"kind": "invalid_row", "message": f"{where}: expected a JSON object, got {type(obj).__name__}"}
                yield row
                continue
            _fill(row, obj, image_key, bbox_key, id_key, base, where)
            yield row


def _unwritable(obj: Any) -> Optional[tuple]:
    """``(kind, reason)`` when a parsed row cannot be carried to the output files, else None.

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
        else:
            p = Path(os.path.expanduser(row.image))
            row.image_path = str(p if p.is_absolute() or base is None else base / p)
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


def _iter_hf(data_cfg: Any) -> Iterator[InputRow]:
    import datasets

    path = str(data_cfg.path)
    local = resolve_path(path)
    base: Optional[Path] = None
    try:
        if local.is_dir() and any((local / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[data_cfg.split]
            base = local
        else:
            args = [data_cfg.hf_builder] if data_cfg.hf_builder else [str(local) if local.exists() else path]
            kwargs = dict(data_cfg.hf_kwargs or {})
            if data_cfg.hf_builder:
                kwargs.setdefault("data_files", str(local))
                base = local.parent if local.is_file() else local
            elif local.exists():
                base = local if local.is_dir() else local.parent
            if data_cfg.hf_config:
                args.append(data_cfg.hf_config)
            ds = datasets.load_dataset(*args, split=data_cfg.split, **kwargs)
    except Exception as exc:  # datasets raises many kinds; all mean "cannot open"
        raise DataError(f"cannot load dataset {path!r} (split {data_cfg.split!r}): {exc}") from exc
    image_key, bbox_key = data_cfg.image_key, data_cfg.bbox_key
    for column in (image_key, bbox_key):
        if column not in ds.column_names:
            raise DataError(f"dataset {path!r} has no column {column!r}; columns: {ds.column_names}")
    if isinstance(ds.features.get(image_key), datasets.Image):
        # Decode ourselves, with the same guards as files on disk.
        ds = ds.cast_column(image_key, datasets.Image(decode=False))
    for i, obj in enumerate(ds):
        row = InputRow(index=i, row_id=f"row-{i:07d}")
        _fill(row, obj, image_key, bbox_key, data_cfg.id_key, base, f"{path} row {i}")
        row.extra = {k: v for k, v in row.extra.items() if _jsonable(v)}
        yield row


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def fingerprint_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a data file, for the run manifest."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
