"""Stop signals: SIGINT/SIGTERM ask the run to stop after the batch in hand is committed."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from regioncap.errors import RunError

log = logging.getLogger("regioncap")


class Interrupted(RunError):
    """SIGINT or SIGTERM stopped the run after its last commit; ``resume=true`` goes on."""

    def __init__(self, signum: int, stage: str, rows: int) -> None:
        self.signum, self.stage, self.rows = signum, stage, rows
        super().__init__(f"stopped by {signal.Signals(signum).name} in the {stage} stage "
                         f"after committing {rows} row(s) of this run")

    def __reduce__(self) -> Any:
        return (Interrupted, (self.signum, self.stage, self.rows))


class _StopFlag:
    """Set by the SIGINT/SIGTERM handler; stages look at it after each commit."""

    signum: Optional[int] = None


_STOP = _StopFlag()


def stop_requested() -> Optional[int]:
    """The signal that asked the run to stop, or None."""
    return _STOP.signum


@contextmanager
def stop_on_signals(*, escalate: bool = True) -> Iterator[None]:
    """SIGINT/SIGTERM set a flag instead of killing the run; the old handlers come back after.

    The stages stop after committing the batch in hand, so the records files
    never end in a half-written line. With ``escalate``, a second signal stops
    at once (SIGINT raises ``KeyboardInterrupt``, SIGTERM exits 143): a person
    pressing Ctrl-C twice means it. Outside the main thread (where Python
    cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if _STOP.signum is not None and escalate:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        if _STOP.signum is None:
            log.warning("%s: stopping after the current batch is written%s", signal.Signals(signum).name,
                        " (send it again to stop at once)" if escalate else "")
        _STOP.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _STOP.signum = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _STOP.signum = None
