"""Image preparation in worker processes: the visualize stage's per-row work off the main process.

Each row's work (decode with JPEG draft mode, EXIF, validate boxes, resize to
the model's pixel budget, draw marks, encode and write the images) is
independent of the others, so a pool of processes does it in parallel while
the main process commits records and, when both stages run, drives the
engine. :class:`RowPool` hands rows out and gives the records back in input
order, with a bounded number of rows in flight (memory does not grow with the
data set).

The pool is a ``forkserver`` pool (``spawn`` where there is none): no worker is
ever forked from a process that has imported torch or started engine threads.
Workers ignore SIGINT and SIGTERM (the main process decides when a run stops,
after its last commit) and exit on their own within a second when the main
process is gone (a SIGKILL leaves no stray workers behind, nor pipes held open).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import types
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, Iterator, Optional

from regioncap.stages import CaptionStage, VisualizeStage

if TYPE_CHECKING:
    from regioncap.config import RegionCapConfig

log = logging.getLogger("regioncap")

#: The worker process's own visualize stage (built once per worker from the config).
_WORKER_STAGE: Any = None


def available_cores() -> int:
    """CPUs this process may use (affinity mask, cgroup quota, ``SLURM_CPUS_PER_TASK``), at least 1."""
    from regioncap.cpus import usable_cpus

    return usable_cpus().usable


#: Most preparation workers per usable CPU that an explicit ``workers`` starts (beyond it they only queue).
MAX_WORKERS_PER_CPU = 4


def resolve_workers(cfg: RegionCapConfig) -> int:
    """Preparation worker processes for a run: ``cfg.workers``, or a default from the engine.

    ``workers: null`` picks the CPUs the engine does not use, out of those this
    process may use (:func:`regioncap.cpus.usable_cpus`): all but one for
    an engine whose work is elsewhere (vLLM on a GPU, an OpenAI-compatible
    server, the fake engine), and one for the transformers engine unless its
    device is CUDA (on the CPU, the engine's threads take the other CPUs and
    caption generation is far slower than preparation, so more workers would
    only slow the engine). ``workers: 0`` prepares in the main process.
    """
    workers = cfg.workers
    if workers is not None:
        if workers < 0:
            from regioncap.errors import RunError

            raise RunError(f"workers must be 0 (prepare in the main process) or more, got {workers}")
        cap = MAX_WORKERS_PER_CPU * available_cores()
        if workers > cap:
            # A typo (workers=10000) started ten thousand processes and took a minute before the
            # first row; the images are the same with fewer, so the run goes on with the cap.
            log.warning("workers=%d is more than %d per usable CPU (%d CPUs): starting %d preparation workers",
                        workers, MAX_WORKERS_PER_CPU, cap // MAX_WORKERS_PER_CPU, cap)
            return cap
        return workers
    if VisualizeStage.name not in cfg.stages:
        return 0
    import multiprocessing as mp

    if mp.current_process().daemon:
        # A daemonic process (a launcher's worker) cannot start processes of its own.
        log.info("image preparation in the main process: this is a daemonic process (workers=0)")
        return 0
    cores = available_cores()
    if CaptionStage.name in cfg.stages:
        from regioncap.engines import engine_of

        if engine_of(cfg.engine).cpu_bound(cfg.engine):
            return 1 if cores > 1 else 0
    return max(1, cores - 1) if cores > 1 else 0


def _foreign_start_method() -> Optional[str]:
    """This process's default start method when it is none of multiprocessing's own (loky's,
    inside a joblib worker), else None."""
    import multiprocessing as mp

    method = mp.get_start_method(allow_none=True)
    return method if method is not None and method not in mp.get_all_start_methods() else None


def _context() -> Any:
    import multiprocessing as mp

    method = _foreign_start_method()
    if method is not None:
        # Inside a joblib worker (hydra/launcher=joblib) the process-wide start method is
        # loky's own; every child is told to use its parent's method and fails with
        # "cannot find context for 'loky'". Back to the platform's default for this process.
        log.info("image preparation: this process's multiprocessing start method is %r (a joblib/loky worker); "
                 "using the platform default for the preparation workers", method)
        mp.set_start_method(None, force=True)
    if mp.current_process().daemon:
        # A daemonic process cannot have children: ProcessPoolExecutor will fail to start workers.
        log.warning("image preparation: this is a daemonic process, which cannot start worker processes; "
                    "run with workers=0")
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # no forkserver on this platform (Windows)
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


#: What the fork server imports once; every worker forked from it starts with them loaded.
_PRELOAD = ("regioncap.stages.visualize", "PIL.Image", "PIL.ImageDraw", "PIL.JpegImagePlugin", "PIL.PngImagePlugin")


def start_fork_server(cfg: RegionCapConfig) -> None:
    """Start the fork server the run's preparation workers will come from, without waiting for it.

    Starting it costs a Python start-up and the imports of :data:`_PRELOAD`
    (about a quarter of a second), which the first worker's start would
    otherwise wait for; started when the job begins, it loads them on another
    CPU while the job sets up. Nothing happens when the run will have no
    workers, when their start method is not the fork server, or when the
    settings are wrong (the pool reports that when it starts).
    """
    import multiprocessing as mp

    # The pool asks for the fork server whatever this process's default start method is; in a
    # daemonic process or a joblib/loky worker (which _context reports) nothing is started early.
    if mp.current_process().daemon or _foreign_start_method():
        return
    # An explicit count is checked (and capped, with a warning) where the pool starts; only the
    # default needs resolving here, and resolving it says nothing.
    workers = cfg.workers if cfg.workers is not None else resolve_workers(cfg)
    if workers <= 0 or _context().get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    with _main_module_hidden():
        forkserver.ensure_running()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _watch_run(pid: int) -> None:
    """Exit when the run's main process is gone (killed with SIGKILL, say).

    Watching the parent is not enough: a forkserver worker's parent is the fork
    server, which itself lives as long as any worker holds its pipe.
    """
    while True:
        time.sleep(0.5)
        if not _alive(pid):
            os._exit(1)


def _init_worker(cfg: RegionCapConfig, main_pid: int) -> None:
    global _WORKER_STAGE
    from regioncap.stages.visualize import Visualizer

    from regioncap.cpus import single_thread

    # One CPU per worker: the workers' count is already sized to the CPUs the engine leaves free.
    single_thread()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_run, args=(main_pid,), name="regioncap-run-watch", daemon=True).start()
    _WORKER_STAGE = Visualizer(cfg)


def _prepare_row(row: Any) -> Dict[str, Any]:
    return _WORKER_STAGE.process_row(row)


def _ready() -> int:
    return os.getpid()


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start processes that do not import the caller's ``__main__``.

    A spawn or forkserver child normally re-imports the main module (the
    script, or ``regioncap.__main__`` with Hydra and the config schemas) before
    it runs anything: time lost for every worker, and a script without an
    ``if __name__ == "__main__":`` guard would run again in each of them. The
    workers need only ``regioncap.prepare``, which they import by name.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class RowPool:
    """Prepare rows (``Visualizer.process_row``) in ``workers`` processes, records in input order.

    Use as a context manager; ``workers == 0`` runs every row in the calling
    process through ``local`` (no pool, no pickling).
    """

    def __init__(self, cfg: RegionCapConfig, workers: int, local: Any, *, window: Optional[int] = None,
                 on_first_wait: Optional[Callable[[], None]] = None) -> None:
        """``on_first_wait``: called once, when the first rows are handed to the workers and before the
        first wait for one: the caller's own slow start (the engine) then runs while the workers start
        and prepare those rows, not after them. Never called when no row is handed out."""
        self.workers = int(workers)
        self.local = local
        self.on_first_wait = on_first_wait
        #: Rows in flight: enough to keep every worker busy while the main
        #: process is away (an engine batch), small enough to keep memory flat.
        self.window = int(window or max(4 * self.workers, 8))
        self._cfg = cfg
        self._executor: Any = None

    def __enter__(self) -> "RowPool":
        if self.workers > 0:
            from concurrent.futures import ProcessPoolExecutor

            # The typed config goes pickled: its classes (a user's own Config too) are imported by name
            # in the worker, which needs them anyway to build the proposer and strategy they name.
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=_context(),
                                                 initializer=_init_worker, initargs=(self._cfg, os.getpid()))
            # Start every worker now (a submit with no idle worker starts one), main module hidden.
            # Not waited for: the workers start up while the caller goes on (a worker that fails to
            # start breaks the pool, which :meth:`map` reports).
            with _main_module_hidden():
                for _ in range(self.workers):
                    self._executor.submit(_ready)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._executor is not None:
            # Rows not started are dropped (a stop or an error); the few being prepared finish first.
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _first_wait(self) -> None:
        hook, self.on_first_wait = self.on_first_wait, None
        if hook is not None:
            hook()

    def map(self, rows: Iterable[Any]) -> Iterator[Dict[str, Any]]:
        """The record of each row, in the order of ``rows``."""
        if self._executor is None:
            for row in rows:
                yield self.local(row)
            return
        from concurrent.futures.process import BrokenProcessPool

        pending: Deque[Any] = deque()
        try:
            for row in rows:
                pending.append(self._executor.submit(_prepare_row, row))
                if len(pending) >= self.window:
                    self._first_wait()
                    yield pending.popleft().result()
            if pending:
                self._first_wait()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as exc:
            from regioncap.errors import RunError

            raise RunError(f"an image preparation worker process died ({exc}); the rows committed so far are kept "
                           f"(resume=true goes on). Running out of memory on a large image is the usual cause: "
                           f"lower limits.max_image_pixels or workers, or set workers=0 to prepare in the main "
                           f"process") from None
        finally:
            for fut in pending:
                fut.cancel()
