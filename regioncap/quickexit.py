"""End the command without the interpreter's teardown once its work is done and written.

After a run that imported torch and transformers, Python's own teardown
(freeing hundreds of thousands of module objects one by one, then the
libraries' static destructors) took 1.6-2.0 s on a quiet 2-core machine and
3.5-4.7 s on a loaded one: a fifth of the default run, after its last file
was written. :func:`arm` registers an exit handler before anything else is
imported, so it runs after every other one (logging's flush, multiprocessing's
clean-up of its helper processes, W&B, Ray); when the command has said its exit
code with :func:`done`, that handler flushes the standard streams and ends the
process with it at once. Without :func:`done` (an exception nobody caught) the
interpreter ends as usual. ``REGIONCAP_FULL_TEARDOWN=1`` keeps the usual end
(a profiler or coverage tool that writes its data from a finaliser).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any, Optional

#: The exit code :func:`done` recorded; None: end as usual.
_code: Optional[int] = None


def exit_code(value: Any) -> int:
    """The process exit code ``sys.exit(value)`` gives (None: 0, a number: itself, anything else: 1)."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value & 0xFF
    return 1


def _end() -> None:
    if _code is None or os.environ.get("REGIONCAP_FULL_TEARDOWN") == "1":
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream: nothing left to say on it
            pass
    os._exit(_code)


def arm() -> None:
    """Register the quick end; call before importing anything that registers exit handlers of its own."""
    atexit.register(_end)


def done(code: int) -> None:
    """The command finished with ``code``: end with it once the other exit handlers ran."""
    global _code
    _code = int(code)


__all__ = ["arm", "done", "exit_code"]
