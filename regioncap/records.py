"""Streaming JSONL output: one record per line, written as it is produced."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator


def _default(value: Any) -> Any:
    # Tuples, paths, numpy scalars and the like: write something readable rather than fail the row.
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def dumps(record: Dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, default=_default)


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


def read_jsonl(path: Path) -> Iterator[Dict[str, Any]]:
    """Yield the records of a JSONL file written by :class:`JsonlWriter`."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
