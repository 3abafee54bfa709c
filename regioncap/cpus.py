"""How many CPUs this process may use, and how many threads the engine gets.

A process often may use fewer CPUs than the machine has: a CPU affinity mask
(``taskset``, a container's cpuset), a cgroup CPU quota (a container's
``--cpus``, systemd's ``CPUQuota``), a SLURM task (``--cpus-per-task``), a Ray
actor's ``num_cpus``. torch sizes its thread pool to every core of the machine
regardless, and on a shared machine, or beside the run's own preparation
workers, its threads then spin against each other: the default run's
``generate`` took 0.66x the wall time and 0.60x the CPU with one thread
instead of two on a 2-core machine with one preparation worker beside it.

:func:`usable_cpus` reads the three limits (the smallest wins);
:func:`choose_threads` takes the preparation workers running beside the
engine off it (at least 1 is left), or keeps the ``threads`` setting when one
is given; :func:`apply_engine_threads` sets it where the engine reads it
(torch's pools, vLLM's CPU build's OpenMP binding); :func:`single_thread`
makes a helper process (a preparation worker) single-threaded. Nothing here
imports torch unless the engine that is about to be built does.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

#: Where the cgroup file systems are mounted, and where this process's cgroups are listed.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")

#: Environment variables that size the thread pools of the OpenMP, MKL and OpenBLAS runtimes and
#: OpenCV's own (read when each library loads; the contour proposer imports OpenCV in the workers).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENCV_FOR_THREADS_NUM")


def affinity_cpus() -> Optional[int]:
    """CPUs in this process's affinity mask; None where the platform cannot say (not Linux)."""
    try:
        return len(os.sched_getaffinity(0)) or None
    except (AttributeError, OSError):
        return None


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except (OSError, ValueError):
        return None


def _quota(quota: Optional[str], period: Optional[str]) -> Optional[int]:
    """CPUs of a quota of ``quota`` microseconds per ``period``, rounded up; None for no limit or garbage."""
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:  # "max" (no limit), an empty or unreadable file
        return None
    if q <= 0 or p <= 0:  # -1: no limit (cgroup v1)
        return None
    return max(1, math.ceil(q / p))


def _cgroup_dirs(root: Path, relative: str) -> Iterator[Path]:
    """The cgroup folder ``root/relative`` and its ancestors up to ``root``: a limit on any of them applies."""
    parts = [p for p in relative.strip().split("/") if p and p not in (".", "..")]
    for n in range(len(parts), -1, -1):
        yield root.joinpath(*parts[:n])


def cgroup_quota_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Optional[int]:
    """The cgroup CPU quota of this process in CPUs (rounded up, at least 1), or None when it has none.

    cgroup v2: ``cpu.max`` (``"QUOTA PERIOD"`` or ``"max PERIOD"``); v1:
    ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` under the ``cpu`` controller's
    mount. The smallest quota of the process's cgroup and its ancestors. Files
    that are missing, unreadable or hold garbage count as no limit.
    """
    listing = _read(proc_cgroup) or ""
    limits: List[int] = []
    for line in listing.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, relative = fields
        if controllers == "":  # v2: one unified hierarchy
            dirs = list(_cgroup_dirs(root, relative))
            for folder in dirs:
                text = _read(folder / "cpu.max")
                if text:
                    quota, _, period = text.partition(" ")
                    limits.append(_quota(quota, period) or 0)
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                if not mount.is_dir():
                    continue
                # In a container the listed path is the host's and often absent: the mount's root is ours.
                for folder in _cgroup_dirs(mount, relative):
                    limits.append(_quota(_read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us"))
                                  or 0)
                break
    found = [n for n in limits if n > 0]
    return min(found) if found else None


def slurm_cpus(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """``SLURM_CPUS_PER_TASK`` as a positive number; None when unset or not a positive whole number."""
    value = (os.environ if environ is None else environ).get("SLURM_CPUS_PER_TASK")
    try:
        n = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


@dataclass(frozen=True)
class CpuLimits:
    """The limits on the CPUs this process may use (None: that limit is not set) and the machine's count."""

    affinity: Optional[int]
    quota: Optional[int]
    slurm: Optional[int]
    machine: int

    @property
    def usable(self) -> int:
        """The smallest limit (the machine's CPU count when none is set), at least 1."""
        return max(1, min([n for n in (self.affinity, self.quota, self.slurm) if n] or [self.machine]))

    def describe(self) -> str:
        """``affinity 2, quota none, SLURM unset``."""
        return (f"affinity {self.affinity if self.affinity else 'none'}, quota {self.quota or 'none'}, "
                f"SLURM {self.slurm or 'unset'}")


def usable_cpus(*, root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP,
                environ: Optional[Mapping[str, str]] = None) -> CpuLimits:
    """The CPU limits of this process: affinity mask, cgroup quota, ``SLURM_CPUS_PER_TASK``."""
    return CpuLimits(affinity=affinity_cpus(), quota=cgroup_quota_cpus(root, proc_cgroup),
                     slurm=slurm_cpus(environ), machine=max(1, os.cpu_count() or 1))


@dataclass(frozen=True)
class ThreadChoice:
    """The engine's CPU threads and why (the log line and the manifest's ``threads``)."""

    #: Threads the engine's process gets (torch's intra-op pool, vLLM CPU's OpenMP threads).
    engine: int
    #: ``auto`` (from the CPUs usable) or ``threads`` (the setting forced it).
    source: str
    #: CPUs this process may use, and each limit behind the figure.
    usable: int
    affinity: Optional[int]
    quota: Optional[int]
    slurm: Optional[int]
    machine: int
    #: Preparation worker processes running beside the engine.
    workers_beside: int

    def describe(self) -> str:
        """One line for the log: the figure and where it comes from."""
        limits = CpuLimits(self.affinity, self.quota, self.slurm, self.machine)
        why = (f"{self.usable} CPU{'s' if self.usable != 1 else ''} usable: {limits.describe()}; "
               f"{self.workers_beside} preparation worker{'s' if self.workers_beside != 1 else ''} beside it")
        head = {"threads": f"set by threads={self.engine}",
                "capped": f"the threads setting capped at {MAX_THREADS_PER_CPU} per usable CPU"}.get(self.source, "automatic")
        return f"threads: {self.engine} for the engine ({head}; {why})"

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready, for the manifest."""
        return asdict(self)


#: Most engine threads per usable CPU that an explicit ``threads`` gets (more only contend for the CPUs).
MAX_THREADS_PER_CPU = 4


def choose_threads(setting: Any, workers_beside: int, limits: Optional[CpuLimits] = None) -> ThreadChoice:
    """The engine's threads: ``setting`` when it is a number, else the usable CPUs minus
    ``workers_beside`` (the preparation workers that run while the engine does), at least 1.

    Raises ``ValueError`` naming the setting for anything but null or a whole number >= 1.
    """
    limits = limits or usable_cpus()
    if setting is not None and (isinstance(setting, bool) or not isinstance(setting, int) or setting < 1):
        raise ValueError(f"threads must be null (automatic) or a whole number >= 1, got {setting!r}")
    beside = max(0, int(workers_beside))
    engine = int(setting) if setting is not None else max(1, limits.usable - beside)
    source = "auto" if setting is None else "threads"
    if engine > MAX_THREADS_PER_CPU * limits.usable:
        # threads=100000: libgomp aborted the process ("Thread creation failed") at the first matmul.
        engine, source = MAX_THREADS_PER_CPU * limits.usable, "capped"
    return ThreadChoice(engine=engine, source=source, usable=limits.usable,
                        affinity=limits.affinity, quota=limits.quota, slurm=limits.slurm, machine=limits.machine,
                        workers_beside=beside)


def vllm_cpu_env(threads: int, environ: Optional[Mapping[str, str]] = None,
                 cpus: Optional[List[int]] = None) -> Dict[str, str]:
    """The environment that sizes vLLM's CPU build to ``threads`` OpenMP threads; empty when the user set it.

    vLLM's CPU worker binds one OpenMP thread to each CPU of
    ``VLLM_CPU_OMP_THREADS_BIND`` (``auto``: every physical core of a NUMA node
    but one it reserves); an explicit list of ``threads`` CPUs of the affinity
    mask (the last ones: the preparation workers are started first and the
    scheduler is not pinned) sizes it. A value the user set is left alone.
    """
    env = os.environ if environ is None else environ
    if "VLLM_CPU_OMP_THREADS_BIND" in env:
        return {}
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = list(range(os.cpu_count() or 1))
    chosen = cpus[-threads:] if threads < len(cpus) else cpus
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in chosen), "OMP_NUM_THREADS": str(len(chosen))}


def set_torch_threads(threads: int) -> Tuple[int, Optional[int]]:
    """Size torch's intra-op pool (and its inter-op pool, where that is still possible) to ``threads``.

    The inter-op pool can be sized only once and before any inter-op work;
    later calls leave it as it is. Returns ``(intra, interop)`` as torch now has them.
    """
    import torch

    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(int(threads))
    except RuntimeError:  # already started, or already set once in this process
        pass
    return torch.get_num_threads(), torch.get_num_interop_threads()


def apply_engine_threads(threads: Optional[int], engine_cls: Any, device: Optional[str] = None) -> None:
    """Give the engine about to be built in this process ``threads`` CPU threads (None: leave it).

    ``engine_cls`` says how with its ``cpu_threads`` capability
    (:class:`regioncap.engines.base.Engine`):

    transformers: torch's pools, on the CPU and on a GPU alike (there they run
    only the CPU side: the processor, sampling); vLLM on the CPU: its OpenMP
    binding (:func:`vllm_cpu_env`) in the environment its engine process
    reads, and torch's pools for this process. Engines without torch (an
    OpenAI-compatible server, the fake engine) are left alone.
    """
    if threads is None:
        return
    how = getattr(engine_cls, "cpu_threads", None)
    if how == "vllm" and not str(device or "").startswith("cuda"):
        if _vllm_on_cpu():
            os.environ.update(vllm_cpu_env(threads))
    if how in ("torch", "vllm"):
        set_torch_threads(threads)


def _vllm_on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
    except Exception:  # noqa: BLE001 - no vLLM (its own error comes when the engine is built)
        return False
    return bool(current_platform.is_cpu())


def single_thread(threads: int = 1) -> None:
    """Make this helper process use ``threads`` threads in the OpenMP/MKL/OpenBLAS runtimes and torch/OpenCV.

    The environment variables are set only where the user did not set them
    (they apply to what is imported later); torch and OpenCV, when already
    imported, are sized now.
    """
    for name in THREAD_ENV:
        os.environ.setdefault(name, str(threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(threads)


__all__ = ["CGROUP_ROOT", "CpuLimits", "PROC_CGROUP", "THREAD_ENV", "ThreadChoice", "affinity_cpus",
           "apply_engine_threads", "cgroup_quota_cpus", "choose_threads", "set_torch_threads", "single_thread",
           "slurm_cpus", "usable_cpus", "vllm_cpu_env"]
