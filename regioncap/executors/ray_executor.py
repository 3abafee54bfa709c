"""The caption stage over a Ray cluster (``executor=ray``): a pool of engine replicas fed by Ray Data.

The regioncap process (the *driver*) scans ``visualize.jsonl`` once and keeps,
for each row still to caption, its index and where its line is in the file.
Ray Data hands those rows, ``executor.batch_size`` at a time, to a fixed pool
of ``executor.num_replicas`` actors (``map_batches`` with a callable class and
``ActorPoolStrategy``), each reserving ``num_cpus``/``num_gpus``. Each actor
builds the configured engine once and captions with the local stage's own code
(:meth:`regioncap.stages.caption.Captioner.caption_batch`: the same prompts, structured outputs, re-ask
and error rows), so ``engine=transformers|vllm|openai|fake`` all work. The
driver commits the records it gets back through the stage loop every executor uses,
in ``visualize.jsonl`` order (Ray Data's ``preserve_order``), and checks that
every row comes back exactly once and in that order; a mismatch stops the run.

Resume works as in the local stage (``resume=true``: rows already in
``captions.jsonl`` are not sent again; ``retry_errors=true`` redoes caption
error rows). A stop signal stops the driver after its current commit; batches
still in flight on the cluster are dropped and redone by a resume.

Every actor reads ``visualize.jsonl``, the marked images and the model folder
at the driver's paths: one machine, or a filesystem all nodes share. Ray is
imported only here, only when ``executor=ray`` is picked.
"""

from __future__ import annotations

import json
import logging
import functools
import gc
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

from regioncap.errors import RunError
from regioncap.rundir import resume_args
from regioncap.executors import CaptionJob, Executor
from regioncap.signals import stop_requested
from regioncap.stages import StageStats, merge_startup
from regioncap.stages.loop import StageLoop, grouped

log = logging.getLogger("regioncap")

_INSTALL_HINT = 'executor=ray needs Ray: pip install "regioncap[ray]" (or run with executor=local)'


class _Replica:
    """One engine replica (a Ray actor): reads its rows' records, captions them, returns the records as JSON."""

    def __init__(self, cfg: Dict[str, Any], model_path: Optional[str], visualize_path: str) -> None:
        from omegaconf import OmegaConf

        from regioncap.stages.caption import Captioner

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        self.captioner = Captioner(OmegaConf.create(cfg), cfg["output_dir"], model_path=model_path)
        self.visualize = open(visualize_path, "rb")
        #: Whether this replica's engine start-up went back to the driver already.
        self.reported = False

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[Any]]:
        from regioncap.records import dumps

        records = []
        for offset, length in zip(batch["offset"], batch["length"]):
            self.visualize.seek(int(offset))
            records.append(json.loads(self.visualize.read(int(length))))
        out: List[Dict[str, Any]] = []
        # As in the local stage: a replica with nothing to caption never loads a model.
        for part in grouped(records, self.captioner.batch_size, self.captioner.max_rows):
            out += self.captioner.caption_batch(part)
        # This replica's start-up goes back once, on the first row of the first batch after its engine's first call.
        startup = [""] * len(out)
        if out and not self.reported and "first_batch_s" in self.captioner.startup:
            startup[0] = json.dumps(self.captioner.startup)
            self.reported = True
        return {"index": [r["index"] for r in out], "record": [dumps(r) for r in out], "startup": startup}

    def __del__(self) -> None:
        try:
            self.captioner.close()
            self.visualize.close()
        except Exception:  # noqa: BLE001 - an actor going away must not raise
            pass


def _scan(path: Path) -> Iterator[Dict[str, Any]]:
    """``{index, id, digest, offset, length}`` of every record of ``visualize.jsonl``, in file order."""
    offset = 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError as exc:
                raise RunError(f"{path}: line {n} is not JSON ({exc}); run the visualize stage again "
                               f"into a new hydra.run.dir") from None
            index = rec.get("index")
            if not isinstance(index, int):
                raise RunError(f"{path}: line {n} has no integer 'index'; it was not written by regioncap")
            yield {"index": index, "id": rec.get("id"), "digest": rec.get("digest"), "offset": start,
                   "length": len(raw)}


@contextmanager
def ray_cluster(executor_cfg: Any) -> Iterator[Any]:
    """Join (or start) the cluster ``executor_cfg`` names; leave it at the end.

    Inside a process that has already called ``ray.init`` (a notebook, a test
    fixture) that cluster is used and left running. With ``address: null`` a
    local cluster is started for the run (``local_num_cpus``,
    ``local_num_gpus``, ``object_store_mb`` size it) and shut down at the end.
    """
    try:
        import ray
    except ImportError:
        raise RunError(_INSTALL_HINT) from None
    if ray.is_initialized():
        yield ray
        return
    kwargs: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    kwargs.update(dict(executor_cfg.get("init_args") or {}))
    if executor_cfg.address:
        kwargs["address"] = executor_cfg.address
    else:
        if executor_cfg.local_num_cpus is not None:
            kwargs["num_cpus"] = int(executor_cfg.local_num_cpus)
        if executor_cfg.local_num_gpus is not None:
            kwargs["num_gpus"] = int(executor_cfg.local_num_gpus)
        if executor_cfg.object_store_mb is not None:
            kwargs["object_store_memory"] = int(executor_cfg.object_store_mb) * 1024 * 1024
    # ray.init makes SIGTERM exit the driver at once; the run's own handler (stop after
    # the batch being written, then exit 143) is put back after it.
    main = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001
            # Ray gives a new local node a fixed 30 s to register; a machine busy with
            # other work can miss that once. One more try; a cluster to join gets none.
            if executor_cfg.address or "timed out during startup" not in str(exc):
                raise
            log.warning("the local Ray cluster did not start in time (%s); trying once more", exc)
            ray.shutdown()
            ray.init(**kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; the user needs the message
        where = f"the Ray cluster at {executor_cfg.address!r}" if executor_cfg.address else "a local Ray cluster"
        raise RunError(f"could not start or join {where}: {type(exc).__name__}: {exc}. Check executor.address "
                       f"(null starts a local cluster; auto joins the one `ray start` made)") from None
    finally:
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)
    known = {t.ident for t in threading.enumerate()}
    try:
        yield ray
    finally:
        _shutdown(ray, known)


# Threads Ray Data starts to run a dataset and to feed its iterator. They may hold
# object references and call into the core worker until they finish.
_RAY_DATA_THREADS = ("StreamingExecutor", "iter_threaded", "ray-data")


def _shutdown(ray: Any, known: set, timeout: float = 30.0) -> None:
    """``ray.shutdown()`` once nothing in this process can touch the core worker during it.

    ``ray.shutdown`` stops the core worker first and forgets it after; an object
    reference released in between, by a Ray Data thread still winding down or by
    the cyclic garbage collector, calls into the stopped worker, and Ray then ends
    the whole process with exit code 1 ("The core worker has already been shutdown"),
    which turned a SIGTERM's clean stop (exit 143) into a failure. So: wait for the
    Ray Data threads started while the cluster was up (those not in ``known``), collect
    the garbage that holds references, and keep the collector off during the shutdown.
    Ray Data's block prefetcher thread is not waited for: it stays parked once its
    iterator is closed.
    """
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.ident in known or not thread.name.startswith(_RAY_DATA_THREADS):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("Ray Data thread %r still runs %.0f s after the stage ended; shutting Ray down anyway",
                        thread.name, timeout)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        ray.shutdown()
    finally:
        if enabled:
            gc.enable()


def _check_resources(ray: Any, ex: Any) -> None:
    """Refuse a pool a local cluster can never place (Ray would wait for it forever).

    A cluster joined at ``executor.address`` may grow (an autoscaler): there a
    shortfall is only logged.
    """
    total = ray.cluster_resources()
    for name, per_replica in (("CPU", float(ex.num_cpus)), ("GPU", float(ex.num_gpus))):
        need = per_replica * int(ex.num_replicas)
        have = float(total.get(name, 0.0))
        if need > have + 1e-9:
            if ex.address:
                log.warning("executor=ray: the pool needs %g %s and the cluster has %g now; the replicas wait "
                            "until the cluster has room (an autoscaler may add nodes)", need, name, have)
                continue
            raise RunError(
                f"executor=ray: {ex.num_replicas} replica(s) x {per_replica:g} {name} = {need:g} {name}, but the "
                f"Ray cluster has {have:g}; lower executor.num_replicas or executor.num_{name.lower()}s, or use a "
                f"bigger cluster")


def _user_error(exc: BaseException) -> str:
    """The message of the exception an actor raised, without Ray's wrapping where it can be found."""
    seen = set()
    todo: List[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RunError):
            return str(e)
        for nxt in (getattr(e, "cause", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return f"{type(exc).__name__}: {exc}"


class RayExecutor(Executor):
    """The caption stage over a Ray cluster; same records file, stats and resume as the local stage."""

    @dataclass
    class Config(Executor.Config):
        """Needs the ``ray`` extra; every replica must see the run dir and the model folder at
        the same paths (one machine, or a shared filesystem)."""

        #: Cluster to join: ``auto`` (a running ``ray start`` cluster), ``ray://host:10001``;
        #: null starts a local cluster for the run and stops it at the end.
        address: Optional[str] = None
        #: Engine replicas (Ray actors), each with its own copy of the model.
        num_replicas: int = 1
        #: CPUs and GPUs Ray reserves for each replica (``num_gpus=1``: one GPU per replica).
        num_cpus: float = 1.0
        num_gpus: float = 0.0
        #: Rows handed to a replica at once (a replica splits them into ``engine.batch_size`` engine calls).
        batch_size: int = 64
        #: A local cluster only (``address: null``): CPUs and GPUs it may use (null: all
        #: of the machine) and the size of its object store in MiB (null: Ray's default).
        local_num_cpus: Optional[int] = None
        local_num_gpus: Optional[int] = None
        object_store_mb: Optional[int] = None
        #: Extra keyword arguments for ``ray.init`` (``runtime_env``, ``namespace``...).
        init_args: Dict[str, Any] = field(default_factory=dict)
        #: Extra Ray options for each replica actor (``max_restarts``, ``resources``, ``memory``...).
        remote_args: Dict[str, Any] = field(default_factory=dict)

    name = "ray"
    elsewhere = "on the cluster"
    requires = ("ray",)
    extra = "ray"

    def caption(self, job: CaptionJob, records: Optional[Iterable[Dict[str, Any]]] = None) -> StageStats:
        if records is not None:
            raise RunError("executor=ray reads visualize.jsonl; it does not take the records as a stream")
        cfg, ex, stats = job.cfg, job.cfg.executor, job.stats
        if int(ex.num_replicas) < 1 or int(ex.batch_size) < 1:
            raise RunError(f"executor.num_replicas and executor.batch_size must be at least 1, got "
                           f"{ex.num_replicas} and {ex.batch_size}")
        stats.pid = os.getpid()
        if cfg.resume and "visualize" not in cfg.stages:
            job.rundir.done_rows("visualize")  # cuts a torn tail a killed visualize stage left
        loop = StageLoop("caption", job.rundir, stats, resume=bool(cfg.resume), retry=bool(cfg.retry_errors),
                         on_commit=job.on_commit).begin()
        identity = _identity
        todo = list(loop.todo(_scan(job.rundir.visualize_file), identity))
        if not todo:  # nothing left: no cluster is started
            return loop.end()
        return loop.run(todo, functools.partial(_ray_batches, job), identity)


def _identity(item: Dict[str, Any]) -> Any:
    return item["index"], item["id"], item["digest"]


def _ray_batches(job: CaptionJob, items: Iterable[Dict[str, Any]]) -> Iterator[List[Dict[str, Any]]]:
    """The records of ``items`` (rows of ``visualize.jsonl``) captioned on the cluster, in order, in batches."""
    todo = [{"index": r["index"], "offset": r["offset"], "length": r["length"]} for r in items]
    if not todo:
        return
    cfg, ex = job.cfg, job.cfg.executor
    from omegaconf import OmegaConf

    path = job.rundir.captions_file
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    plain["output_dir"] = str(job.rundir.path.resolve())  # actors may run in another working directory
    try:
        with ray_cluster(ex) as ray:
            import ray.data

            _check_resources(ray, ex)
            ctx = ray.data.DataContext.get_current()
            old = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
            ctx.execution_options.preserve_order = True  # records come back in visualize.jsonl order
            ctx.enable_progress_bars = bool(cfg.progress)
            try:
                batch = int(ex.batch_size)
                ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / batch)))
                ds = ds.map_batches(
                    _Replica, batch_size=batch, batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=int(ex.num_replicas)),
                    num_cpus=float(ex.num_cpus), num_gpus=float(ex.num_gpus) or None,
                    fn_constructor_kwargs={"cfg": plain, "model_path": job.model_path,
                                           "visualize_path": str(job.rundir.visualize_file.resolve())},
                    **dict(ex.get("remote_args") or {}))
                log.info("caption: %d row(s) over Ray: %d replica(s) x (%g CPU, %g GPU), %d row(s) per batch, "
                         "cluster %s", len(todo), ex.num_replicas, ex.num_cpus, ex.num_gpus, batch,
                         ray.cluster_resources())
                expected = iter(todo)
                # Closed before the cluster shuts down, also when a stop breaks out of it: an open
                # iterator's threads can touch the Ray worker after ray.shutdown(), and Ray then
                # ends the process with exit code 1 (seen once in 8 SIGTERM runs).
                batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
                try:
                    for out in batches:
                        records = [json.loads(r) for r in out["record"]]
                        for startup in out.get("startup", ()):
                            if startup:
                                merge_startup(job.stats.startup, json.loads(startup))
                        for rec in records:
                            want = next(expected, None)
                            if want is None or rec.get("index") != want["index"]:
                                raise RunError(
                                    f"executor=ray: row {rec.get('index')} came back where row "
                                    f"{None if want is None else want['index']} was due; the batches before "
                                    f"it are committed in {path}: {resume_args(job.rundir.path)} "
                                    f"goes on from there")
                        yield records
                        if stop_requested():
                            return
                    left = sum(1 for _ in expected)
                    if left:
                        raise RunError(f"executor=ray: {left} row(s) did not come back from the cluster; "
                                       f"{resume_args(job.rundir.path)} captions them")
                finally:
                    close = getattr(batches, "close", None)
                    if close is not None:
                        close()
                    # The dataset, its iterator and the last batch hold object references:
                    # released here, while the cluster is still up.
                    ds = batches = out = None  # noqa: F841
            finally:
                ctx.execution_options.preserve_order, ctx.enable_progress_bars = old
    except RunError:
        raise
    except GeneratorExit:
        raise
    except Exception as exc:  # noqa: BLE001 - an actor's error arrives wrapped by Ray
        raise RunError(f"the caption stage failed on the Ray cluster: {_user_error(exc)}") from None
