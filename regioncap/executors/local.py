"""``executor=local``: the caption stage in this process."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional

from regioncap.engines.base import Engine
from regioncap.executors import CaptionJob, Executor
from regioncap.records import read_jsonl
from regioncap.stages import StageStats, VisualizeStage, merge_startup
from regioncap.stages.caption import Captioner
from regioncap.stages.loop import StageLoop, progress

if TYPE_CHECKING:
    from regioncap.config import RegionCapConfig


class LocalExecutor(Executor):
    """The caption stage in this process; it takes the visualize records as a stream when both stages run."""

    name = "local"
    streams = True

    def __init__(self, cfg: RegionCapConfig, engine: Optional[Engine] = None) -> None:
        """``engine``: an engine already built, shared with other runs (see :class:`Captioner`)."""
        super().__init__(cfg)
        self.engine = engine
        self.captioner: Optional[Captioner] = None

    def caption(self, job: CaptionJob, records: Optional[Iterable[Dict[str, Any]]] = None) -> StageStats:
        cfg, stats = job.cfg, job.stats
        stats.pid = os.getpid()
        if cfg.resume and VisualizeStage.name not in cfg.stages:
            job.rundir.done_rows(VisualizeStage.name)  # cuts a torn tail a killed visualize stage left
        self.captioner = Captioner(cfg, job.rundir.path, model_path=job.model_path, start_hint=job.start_hint,
                                   engine=self.engine, threads=job.threads)
        loop = StageLoop(Captioner.name, job.rundir, stats, resume=cfg.resume, retry=cfg.retry_errors,
                         on_commit=job.on_commit)
        source = read_jsonl(job.rundir.visualize_file) if records is None else records
        try:
            return loop.run(progress(source, Captioner.name, cfg.progress, job.total), self.captioner.batches,
                            Captioner.identity)
        finally:
            job.engine_info.update(self.captioner.describe_engine() or {})
            merge_startup(stats.startup, self.captioner.startup)

    def warm_up(self) -> None:
        """Build the engine (:meth:`Captioner.start_engine`) of the stage under way."""
        if self.captioner is not None:
            self.captioner.start_engine()

    def close(self) -> None:
        if self.captioner is not None:
            self.captioner.close()

