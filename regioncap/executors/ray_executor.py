"""The caption stage over a Ray cluster (``executor=ray``): a pool of engine replicas (Ray actors).

The regioncap process (the *driver*) scans ``visualize.jsonl`` once and keeps,
for each row still to caption, its index and where its line is in the file.
It starts ``executor.num_replicas`` actors, each reserving ``num_cpus``/``num_gpus``
(spread over the nodes first), and hands them the rows ``executor.batch_size``
at a time, ``AHEAD`` batches queued on each replica so none waits for a round
trip. Each actor builds the configured engine once and captions with the local
stage's own code (:meth:`regioncap.stages.caption.Captioner.caption_batch`: the
same prompts, structured outputs, re-ask and error rows), so
``engine=transformers|vllm|openai|fake`` all work. The driver commits the
records it gets back through the stage loop every executor uses, in
``visualize.jsonl`` order, and checks that every row comes back exactly once
and in that order; a mismatch stops the run.

Plain actors, not Ray Data: a Ray Data plan imported pyarrow and Ray Data in
the driver and in every actor and started its streaming executor, several
seconds before the first batch, for a pipeline of one map step
(docs/scaling.md has the figures).

Resume works as in the local stage (``resume=true``: rows already in
``captions.jsonl`` are not sent again; ``retry_errors=true`` redoes the
error rows whose ``error.retryable`` is true). A stop signal stops the driver after its current commit; batches
still in flight on the cluster are dropped and redone by a resume.

Every actor reads ``visualize.jsonl``, the marked images and the model folder
at the driver's paths: one machine, or a filesystem all nodes share. Ray is
imported only here, only when ``executor=ray`` is picked.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional

from regioncap.errors import RunError
from regioncap.record_types import RECORD
from regioncap.rundir import resume_args
from regioncap.executors import CaptionJob, Executor
from regioncap.signals import stop_requested
from regioncap.stages import CaptionStage, StageStats, VisualizeStage, merge_startup
from regioncap.stages.loop import StageLoop, grouped

if TYPE_CHECKING:
    from regioncap.config import RegionCapConfig

log = logging.getLogger("regioncap")

_INSTALL_HINT = 'executor=ray needs Ray: pip install "regioncap[ray]" (or run with executor=local)'


class _Replica:
    """One engine replica (a Ray actor): reads its rows' records, captions them, returns the records."""

    def __init__(self, cfg: RegionCapConfig, model_path: Optional[str], visualize_path: str) -> None:
        from regioncap.stages.caption import Captioner

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        from regioncap.cpus import single_thread

        # The actor's CPUs are what it reserved (executor.num_cpus), not the node's: threads=N forces.
        threads = cfg.threads or max(1, math.ceil(cfg.executor.num_cpus))
        single_thread(threads)
        self.captioner = Captioner(cfg, cfg.output_dir, model_path=model_path, threads=threads)
        self.visualize = open(visualize_path, "rb")
        #: Whether this replica's engine start-up went back to the driver already.
        self.reported = False

    def where(self) -> Dict[str, Any]:
        """Where this replica runs: its Ray node, host and process (the driver waits on this to know it is up)."""
        import socket

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}

    def caption(self, offsets: List[int], lengths: List[int]) -> Dict[str, Any]:
        """Caption the records at ``offsets``/``lengths`` of ``visualize.jsonl``: ``{records, startup, engine}``.

        ``startup`` and ``engine`` (the engine's ``describe()``) come back once, with the
        first batch after the engine's first call. The records go back as the objects the
        local stage commits (Ray pickles them, types kept): JSON text made here and read
        back by the driver cost about four times as much on both sides.
        """
        records = []
        for offset, length in zip(offsets, lengths):
            self.visualize.seek(offset)
            records.append(json.loads(self.visualize.read(length)))
        out: List[Dict[str, Any]] = []
        # As in the local stage: a replica with nothing to caption never loads a model.
        for part in grouped(records, self.captioner.batch_size, self.captioner.max_rows):
            out += self.captioner.caption_batch(part)
        result: Dict[str, Any] = {"records": out}
        if out and not self.reported and "first_batch_s" in self.captioner.startup:
            result["startup"] = dict(self.captioner.startup)
            result["engine"] = self.captioner.describe_engine()
            self.reported = True
        return result

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
            index = rec.get(RECORD.index)
            if not isinstance(index, int):
                raise RunError(f"{path}: line {n} has no integer 'index'; it was not written by regioncap")
            # The row's identity under the record's own keys, and where its line is.
            yield {RECORD.index: index, RECORD.id: rec.get(RECORD.id), RECORD.digest: rec.get(RECORD.digest),
                   "offset": start, "length": len(raw)}


@contextmanager
def ray_cluster(executor_cfg: RayExecutor.Config) -> Iterator[Any]:
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
    kwargs.update(dict(executor_cfg.init_args or {}))
    if executor_cfg.address:
        kwargs["address"] = executor_cfg.address
    else:
        if executor_cfg.local_num_cpus is not None:
            kwargs["num_cpus"] = executor_cfg.local_num_cpus
        if executor_cfg.local_num_gpus is not None:
            kwargs["num_gpus"] = executor_cfg.local_num_gpus
        if executor_cfg.object_store_mb is not None:
            kwargs["object_store_memory"] = executor_cfg.object_store_mb * 1024 * 1024
    if executor_cfg.address:
        _check_reachable(executor_cfg.address)
    # ray.init makes SIGTERM exit the driver at once; the run's own handler (stop after
    # the batch being written, then exit 143) is put back after it.
    main = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main else None
    # Said before: Ray retries an address that does not answer for minutes without a word.
    log.info("caption: %s", f"joining the Ray cluster at {executor_cfg.address}" if executor_cfg.address
             else "starting a local Ray cluster for this run")
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
    try:
        yield ray
    finally:
        _shutdown(ray)


#: Seconds to wait for a TCP connection to ``executor.address`` before ``ray.init``.
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail at once, naming ``executor.address``, when its ``host:port`` takes no connection.

    ``ray.init`` retries an address that does not answer for minutes without a
    word (about 2.5 min here). ``auto`` and addresses that are not ``host:port``
    are left to Ray.
    """
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        raise RunError(f"executor.address={address!r}: nothing answers at {host}:{port} "
                       f"({type(exc).__name__}: {exc}); is the Ray head running there (`ray start --head`)? "
                       "null starts a local cluster; auto joins the one `ray start` made on this machine") from None


def _shutdown(ray: Any) -> None:
    """``ray.shutdown()`` with the cyclic garbage collector off.

    ``ray.shutdown`` stops the core worker first and forgets it after; an object
    reference released in between by the collector calls into the stopped worker,
    and Ray then ends the whole process with exit code 1 ("The core worker has
    already been shutdown"), which turned a SIGTERM's clean stop (exit 143) into a
    failure. So the garbage that holds references is collected first, and the
    collector stays off during the shutdown.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        ray.shutdown()
    finally:
        if enabled:
            gc.enable()


def _check_resources(ray: Any, ex: Any) -> bool:
    """Refuse a pool a local cluster can never place (Ray would wait for it forever).

    A cluster joined at ``executor.address`` may grow (an autoscaler): there a
    shortfall is only logged. Returns whether the cluster has room for the
    whole pool now (its free CPUs and GPUs), so every replica can start at once.
    """
    total, free = ray.cluster_resources(), ray.available_resources()
    room = True
    for name, per_replica in (("CPU", ex.num_cpus), ("GPU", ex.num_gpus)):
        need = per_replica * ex.num_replicas
        have = float(total.get(name, 0.0))
        room = room and need <= float(free.get(name, 0.0)) + 1e-9
        if need > have + 1e-9:
            if ex.address:
                log.warning("executor=ray: the pool needs %g %s and the cluster has %g now; the replicas wait "
                            "until the cluster has room (an autoscaler may add nodes)", need, name, have)
                continue
            raise RunError(
                f"executor=ray: {ex.num_replicas} replica(s) x {per_replica:g} {name} = {need:g} {name}, but the "
                f"Ray cluster has {have:g}; lower executor.num_replicas or executor.num_{name.lower()}s, or use a "
                f"bigger cluster")
    return room


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
        if cfg.resume and VisualizeStage.name not in cfg.stages:
            job.rundir.done_rows(VisualizeStage.name)  # cuts a torn tail a killed visualize stage left
        loop = StageLoop(CaptionStage.name, job.rundir, stats, resume=cfg.resume, retry=cfg.retry_errors,
                         on_commit=job.on_commit).begin()
        identity = _identity
        todo = list(loop.todo(_scan(job.rundir.visualize_file), identity))
        if not todo:  # nothing left: no cluster is started
            return loop.end()
        return loop.run(todo, functools.partial(_ray_batches, job), identity)


def _identity(item: Dict[str, Any]) -> Any:
    return item[RECORD.index], item[RECORD.id], item[RECORD.digest]


#: Batches queued on each replica at once: the next one is there when its current one ends,
#: so a replica never waits for a round trip to the driver.
AHEAD = 2


def _ray_batches(job: CaptionJob, items: Iterable[Dict[str, Any]]) -> Iterator[List[Dict[str, Any]]]:
    """The records of ``items`` (rows of ``visualize.jsonl``) captioned on the cluster, in order, in batches."""
    todo = [(r[RECORD.index], r["offset"], r["length"]) for r in items]
    if not todo:
        return
    cfg, ex, stats = job.cfg, job.cfg.executor, job.stats
    path = job.rundir.captions_file
    # The typed config goes pickled: an actor imports its classes by name (a user's own Config too),
    # as it must anyway to build the engine and model they name. Actors may run in another working
    # directory: the run dir as an absolute path.
    shipped = replace(cfg, output_dir=str(job.rundir.path.resolve()))
    batch = ex.batch_size
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    bar = None
    t0 = time.perf_counter()
    try:
        with ray_cluster(ex) as ray:
            stats.startup["cluster_start_s"] = time.perf_counter() - t0
            room = _check_resources(ray, ex)
            options: Dict[str, Any] = {
                "num_cpus": ex.num_cpus, "num_gpus": ex.num_gpus,
                # An actor process that dies (out of memory, a node lost) is started again and its
                # batch run again, as Ray Data's actor pools do; the driver commits each row once.
                "max_restarts": -1, "max_task_retries": -1,
                # One replica per node first: a cluster of GPU nodes fills every node.
                "scheduling_strategy": "SPREAD"}
            options.update(dict(ex.remote_args or {}))
            log.info("caption: %d row(s) over Ray: %d replica(s) x (%g CPU, %g GPU), %d row(s) per batch, "
                     "cluster %s", len(todo), ex.num_replicas, ex.num_cpus, ex.num_gpus, batch,
                     ray.cluster_resources())
            pool = _Pool(ray, ray.remote(**options)(_Replica), ex.num_replicas, {
                "cfg": shipped, "model_path": job.model_path,
                "visualize_path": str(job.rundir.visualize_file.resolve())})
            try:
                if cfg.progress:
                    from tqdm import tqdm

                    bar = tqdm(desc=CaptionStage.name, unit="row", dynamic_ncols=True, mininterval=1.0, total=len(todo))
                expected = iter(todo)
                for result in pool.run(chunks, wait_all=room):
                    records = result["records"]
                    if "startup" in result:
                        merge_startup(stats.startup, result["startup"])
                    if result.get("engine") and not job.engine_info:
                        job.engine_info.update(result["engine"])
                    for rec in records:
                        want = next(expected, None)
                        if want is None or rec.get(RECORD.index) != want[0]:
                            raise RunError(
                                f"executor=ray: row {rec.get(RECORD.index)} came back where row "
                                f"{None if want is None else want[0]} was due; the batches before "
                                f"it are committed in {path}: {resume_args(job.rundir.path)} "
                                f"goes on from there")
                    yield records
                    if bar is not None:
                        bar.update(len(records))
                    if stop_requested():
                        return
                left = sum(1 for _ in expected)
                if left:
                    raise RunError(f"executor=ray: {left} row(s) did not come back from the cluster; "
                                   f"{resume_args(job.rundir.path)} captions them")
            finally:
                if pool.started:
                    stats.startup["replicas_start_s"] = pool.started
                job.engine_info["replicas"] = pool.where()
                # Batches still in flight are dropped; the replicas go now, also on a cluster that stays up.
                pool.close()
                pool = None  # its object references, released while the cluster is still up
    except RunError:
        raise
    except GeneratorExit:
        raise
    except Exception as exc:  # noqa: BLE001 - an actor's error arrives wrapped by Ray
        raise RunError(f"the caption stage failed on the Ray cluster: {_user_error(exc)}") from None
    finally:
        if bar is not None:
            bar.close()


class _Pool:
    """``num`` replica actors; batches go to the replicas that are up, results come back in batch order."""

    def __init__(self, ray: Any, actor_class: Any, num: int, init: Dict[str, Any]) -> None:
        self.ray = ray
        self.t0 = time.perf_counter()
        self.actors = [actor_class.remote(**init) for _ in range(num)]
        #: Per replica: ``{node_id, host, pid}`` once it is up, plus the batches and rows it captioned.
        self.info: List[Optional[Dict[str, Any]]] = [None] * num
        #: Seconds from asking for the replicas to the last one up (0 until one is).
        self.started = 0.0
        self._waiting = {actor.where.remote(): k for k, actor in enumerate(self.actors)}

    def _up(self, ref: Any) -> None:
        k = self._waiting.pop(ref)
        self.info[k] = dict(self.ray.get(ref), batches=0, rows=0)
        self.started = time.perf_counter() - self.t0
        log.info("caption: replica %d/%d up after %.2f s on node %s (%s, pid %s)", k + 1, len(self.actors),
                 self.started, self.info[k]["node_id"][:12], self.info[k]["host"], self.info[k]["pid"])

    def run(self, chunks: List[List[Any]], wait_all: bool) -> Iterator[Dict[str, Any]]:
        """Each chunk's ``_Replica.caption`` result, in chunk order.

        With ``wait_all`` (the cluster has room for the whole pool) no batch is sent
        before every replica is up, so the first batches spread over all of them;
        otherwise the replicas that are up start and the others join when placed.
        At most ``AHEAD`` batches wait on a replica, and at most ``2 * AHEAD`` per
        replica are out at once: results wait here until their turn, so a slow
        replica holds the others back only after they are that far ahead.
        """
        ray, n = self.ray, len(self.actors)
        if wait_all:
            for ref in list(self._waiting):
                ray.get(ref)
                self._up(ref)
        load = [0] * n
        out: Dict[Any, Any] = {}  # in-flight ref -> (chunk number, replica)
        done: Dict[int, Dict[str, Any]] = {}
        sent = given = 0
        while given < len(chunks):
            while sent < len(chunks) and sent - given < 2 * AHEAD * n:
                free = [k for k in range(n) if self.info[k] is not None and load[k] < AHEAD]
                if not free:
                    break
                k = min(free, key=load.__getitem__)
                chunk = chunks[sent]
                ref = self.actors[k].caption.remote([c[1] for c in chunk], [c[2] for c in chunk])
                out[ref] = (sent, k)
                load[k] += 1
                sent += 1
            if given in done:
                yield done.pop(given)
                given += 1
                continue
            ready, _ = ray.wait([*out, *self._waiting], num_returns=1)
            for ref in ready:
                if ref in self._waiting:
                    self._up(ref)
                    continue
                number, k = out.pop(ref)
                load[k] -= 1
                done[number] = result = ray.get(ref)
                self.info[k]["batches"] += 1
                self.info[k]["rows"] += len(result["records"])

    def where(self) -> List[Dict[str, Any]]:
        """The replicas that came up: node, host, pid, and the batches and rows each captioned."""
        return [dict(info) for info in self.info if info is not None]

    def close(self) -> None:
        """End every replica (their engines with them); results still out are dropped."""
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - an actor already gone
                pass
        self.actors, self._waiting = [], {}
