"""Where the caption stage runs (``executor=...``), resolved by name.

=========  ===============================================================
executor   the caption stage runs
=========  ===============================================================
local      in this process (streams with the visualize stage)
isolated   in one spawned child process, so the engine's memory (a vLLM
           engine's GPU memory above all) is released when the stage ends
ray        on a pool of engine replicas on a Ray cluster (Ray actors)
=========  ===============================================================

Each executor only decides where a :class:`regioncap.stages.caption.Captioner`
runs; every one of them commits through the same
:class:`regioncap.stages.loop.StageLoop`, so records, resume and stop signals
are the same whichever runs. An executor's module is imported only when it is
picked (Ray only for ``ray``). A new executor is one module with a class like
:class:`Executor` and one line in :data:`EXECUTORS`, plus ``conf/executor/NAME.yaml``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterable, Optional, Type

from regioncap.rundir import RunDir
from regioncap.stages import OnCommit, StageStats

#: ``executor.name`` -> "module:Class".
EXECUTORS = {
    "local": "regioncap.executors.local:LocalExecutor",
    "isolated": "regioncap.executors.isolated:IsolatedExecutor",
    "ray": "regioncap.executors.ray_executor:RayExecutor",
}


@dataclass
class CaptionJob:
    """What an executor needs to run the caption stage of a run."""

    cfg: Any
    rundir: RunDir
    stats: StageStats
    model_path: Optional[str] = None
    #: Called after each commit (progress to the experiment logger).
    on_commit: Optional[OnCommit] = None
    #: Appended to the error when the engine cannot start (how to go on).
    start_hint: str = ""
    #: What the engine was, for the manifest (filled by the executor).
    engine_info: Dict[str, Any] = field(default_factory=dict)
    #: Rows the stage will see, where known (progress bar total and ETA).
    total: Optional[int] = None
    #: CPU threads of the engine (``regioncap.cpus.choose_threads``); None leaves the engine's own default.
    threads: Optional[int] = None


class Executor:
    """Runs the caption stage of a :class:`CaptionJob` somewhere."""

    name: ClassVar[str] = ""
    #: Takes the visualize stage's records as a stream (both stages at once in this process).
    streams: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def caption(self, job: CaptionJob, records: Optional[Iterable[Dict[str, Any]]] = None) -> StageStats:
        """Caption the rows of ``records`` (default: ``visualize.jsonl``) not done yet; return the stage's stats."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor holds (an engine); safe to call twice."""


def executor_class(name: str) -> Type[Executor]:
    """The class of executor ``name`` (its module imported now)."""
    if name not in EXECUTORS:
        from regioncap.errors import RunError

        raise RunError(f"unknown executor {name!r}; choose one of {sorted(EXECUTORS)}")
    module_name, cls_name = EXECUTORS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)
