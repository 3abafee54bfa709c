"""``executor=isolated``: the caption stage in one spawned child process.

The child builds the engine, runs the same stage loop as ``executor=local``
and exits, so everything the engine held (a vLLM engine's GPU memory above
all, which vLLM does not hand back inside one process) is released when the
stage ends. A stop signal to the parent is passed on; the child stops after
its batch in hand, like the local stage.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional

from regioncap.errors import RunError
from regioncap.executors import CaptionJob, Executor
from regioncap.rundir import LOG_FILE, RunDir
from regioncap.signals import Interrupted, stop_on_signals, stop_requested
from regioncap.stages import CaptionStage, StageStats

if TYPE_CHECKING:
    from regioncap.config import RegionCapConfig

log = logging.getLogger("regioncap")

_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class IsolatedExecutor(Executor):
    """The caption stage in a spawned process; this process waits for it."""

    name = "isolated"
    elsewhere = "in its own process"

    def caption(self, job: CaptionJob, records: Optional[Iterable[Dict[str, Any]]] = None) -> StageStats:
        import multiprocessing as mp
        import queue as queue_mod
        from dataclasses import replace

        if records is not None:
            raise RunError("executor=isolated reads visualize.jsonl; it does not take the records as a stream")
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        # The typed config goes pickled: the child imports its classes by name (a user's own Config
        # too), as it must anyway to build the engine and model they name.
        cfg = replace(job.cfg, output_dir=str(job.rundir.path))
        proc = ctx.Process(target=caption_child, args=(cfg, job.model_path, job.start_hint, results, job.threads),
                           name="regioncap-caption")
        start = time.perf_counter()
        started_at = time.time()
        proc.start()
        result = None
        forwarded = False
        while result is None:
            if stop_requested() and not forwarded and proc.is_alive():
                # A signal to this process only (a scheduler's SIGTERM): the child stops after its batch too.
                os.kill(proc.pid, signal.SIGTERM)
                forwarded = True
            try:
                result = results.get(timeout=0.5)
            except queue_mod.Empty:
                if not proc.is_alive():
                    break
        proc.join()
        if result is None:
            raise RunError(f"the caption stage's process died (exit code {proc.exitcode}); "
                           f"the visualize records are in {job.rundir.visualize_file}")
        if "error" in result:
            raise RunError(result["error"])
        stats = job.stats
        stats.update(result["stats"])
        stats.seconds = time.perf_counter() - start
        if stats.startup and result.get("loop_started_at") is not None:
            # The child's clock starts at its stage loop; the process start before it (spawn, imports)
            # is start-up too. Wall clocks of one machine: the same clock in both processes.
            process_s = max(0.0, float(result["loop_started_at"]) - started_at)
            stats.startup["process_start_s"] = process_s
            if stats.startup.get("time_to_first_caption_s") is not None:
                stats.startup["time_to_first_caption_s"] += process_s
        job.engine_info.update(result.get("engine_info") or {})
        if result.get("interrupted"):
            raise Interrupted(result["interrupted"], CaptionStage.name, stats.rows)
        return stats


def caption_child(cfg: RegionCapConfig, model_path: Optional[str], start_hint: str, results: Any,
                  threads: Optional[int] = None) -> None:
    """Entry of the spawned caption process: run the stage locally, report its stats, exit."""
    from regioncap.executors.local import LocalExecutor

    logging.basicConfig(level=logging.INFO, format=_FORMAT)
    handler = logging.FileHandler(Path(cfg.output_dir) / LOG_FILE)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger().addHandler(handler)
    executor = LocalExecutor(cfg)
    job = CaptionJob(cfg=cfg, rundir=RunDir(cfg.output_dir), stats=StageStats(CaptionStage.name),
                     model_path=model_path, start_hint=start_hint, threads=threads)
    try:
        # Ctrl-C reaches this process too, and the parent forwards a SIGTERM it gets:
        # either way, stop after the batch in hand (never at once: the parent decides that).
        with stop_on_signals(escalate=False):
            try:
                executor.caption(job)
            except Interrupted:
                pass
            clock = job.stats.clock_start
            results.put({"stats": job.stats.as_dict() | {"pid": os.getpid()}, "engine_info": job.engine_info,
                         "interrupted": stop_requested(),
                         # The loop's start on the wall clock the parent reads too.
                         "loop_started_at": None if clock is None else time.time() - (time.perf_counter() - clock)})
    except RunError as exc:
        results.put({"error": str(exc)})
    except Exception as exc:  # report anything else to the parent rather than dying silently
        log.exception("caption stage failed")
        results.put({"error": f"caption stage failed: {type(exc).__name__}: {exc}"})
    finally:
        executor.close()
