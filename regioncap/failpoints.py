"""Crash points for tests: kill the process at a named point of a stage.

``REGIONCAP_FAILPOINT=NAME:N[:ACTION]`` arms one point: on its N-th hit the
process dies. ``ACTION`` is ``sigkill`` (default: the process is killed at
once, no handler or ``finally`` runs, the way an OOM killer or a lost node
ends it) or ``sigterm`` (the process sends itself SIGTERM and goes on, the
way a scheduler's polite stop arrives; the stage's handler takes it from there)
or ``slow`` (from the N-th hit on, each hit waits a quarter of a second: a run
that stays busy long enough for a test to act on it).

Points: ``visualize.before_commit``, ``visualize.mid_line`` (half of the
batch's last line is written, then the process dies), ``visualize.after_commit``
and the same three for ``caption``; ``export.row`` (each row an export builds) and
``export.before_rename`` (the export is written beside its final path, not yet moved there).

The variable is read once, at import: with it unset a point costs one
comparison. Tests only; nothing else sets it.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Callable, Optional, Tuple

from regioncap.stages import STAGE_NAMES

ENV = "REGIONCAP_FAILPOINT"
POINTS = tuple(f"{stage}.{when}" for stage in STAGE_NAMES
               for when in ("before_commit", "mid_line", "after_commit")) + ("export.row", "export.before_rename")


def _parse(spec: Optional[str]) -> Optional[Tuple[str, int, str]]:
    if not spec:
        return None
    parts = spec.split(":")
    name = parts[0]
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown point {name!r}; points are {', '.join(POINTS)}")
    nth = int(parts[1]) if len(parts) > 1 and parts[1] else 1
    action = parts[2] if len(parts) > 2 else "sigkill"
    if action not in ("sigkill", "sigterm", "slow"):
        raise ValueError(f"{ENV}={spec!r}: action must be sigkill, sigterm or slow, got {action!r}")
    return name, nth, action


_ARMED = _parse(os.environ.get(ENV))
_hits: Counter = Counter()


def failpoint(name: str, before_death: Optional[Callable[[], None]] = None) -> None:
    """Die here when ``REGIONCAP_FAILPOINT`` names this point and this is its N-th hit.

    ``before_death`` runs first (the ``mid_line`` points write half a line in it).
    """
    if _ARMED is None or _ARMED[0] != name:
        return
    _hits[name] += 1
    if _ARMED[2] == "slow":
        if _hits[name] >= _ARMED[1]:
            import time

            time.sleep(0.25)
        return
    if _hits[name] != _ARMED[1]:
        return
    if before_death is not None:
        before_death()
    if _ARMED[2] == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    """Whether ``name`` is the armed point (callers skip extra work when it is not)."""
    return _ARMED is not None and _ARMED[0] == name
