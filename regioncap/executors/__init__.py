"""Where the caption stage runs (``executor=...``): the class ``executor._target_`` names.

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
picked (Ray only for ``ray``). A new executor is one module with a subclass of
:class:`Executor` and ``conf/executor/NAME.yaml`` naming it (``_target_``),
in the package or in a user's own (docs/plugins.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Iterable, Optional, Type

from regioncap.components import Component, class_of
from regioncap.rundir import RunDir
from regioncap.stages import OnCommit, StageStats

if TYPE_CHECKING:
    from regioncap.config import RegionCapConfig


@dataclass
class CaptionJob:
    """What an executor needs to run the caption stage of a run."""

    cfg: RegionCapConfig
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


class Executor(Component):
    """Runs the caption stage of a :class:`CaptionJob` somewhere; built as ``cls(cfg)`` with the whole config."""

    #: Takes the visualize stage's records as a stream (both stages at once in this process).
    streams: ClassVar[bool] = False
    #: Where the stage reads ``visualize.jsonl`` when it does not stream (``in its own process``), for the log.
    elsewhere: ClassVar[str] = ""

    def __init__(self, cfg: RegionCapConfig) -> None:
        self.cfg = cfg

    def caption(self, job: CaptionJob, records: Optional[Iterable[Dict[str, Any]]] = None) -> StageStats:
        """Caption the rows of ``records`` (default: ``visualize.jsonl``) not done yet; return the stage's stats."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Start what the stage will need (its engine) now, while the preparation workers prepare the
        first rows of a streaming run (called once, before the first record arrives). Default: nothing."""

    def close(self) -> None:
        """Release what the executor holds (an engine); safe to call twice."""


def executor_of(executor_cfg: Executor.Config) -> Type[Executor]:
    """The executor class ``executor_cfg._target_`` names (its module imported now)."""
    return class_of(executor_cfg, Executor, "executor")
