"""regioncap.cpus: the CPUs a process may use (affinity, cgroup quota, SLURM) and the engine's threads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import compose
from regioncap import cpus
from regioncap.cpus import CpuLimits, cgroup_quota_cpus, choose_threads, slurm_cpus, usable_cpus, vllm_cpu_env
from regioncap.errors import RunError
from regioncap.settings import check_settings


def v2(root: Path, cpu_max: Optional[str], relative: str = "/user.slice/job", parent: Optional[str] = None) -> Path:
    """A cgroup v2 tree under ``root`` with ``cpu.max`` in the process's cgroup (and its parent); the listing file."""
    folder = root / relative.strip("/")
    folder.mkdir(parents=True, exist_ok=True)
    if cpu_max is not None:
        (folder / "cpu.max").write_text(cpu_max + "\n")
    if parent is not None:
        (folder.parent / "cpu.max").write_text(parent + "\n")
    listing = root / "proc-self-cgroup"
    listing.write_text(f"0::{relative}\n")
    return listing


def v1(root: Path, quota: Optional[str], period: Optional[str] = "100000", relative: str = "/docker/abc",
       mount: str = "cpu,cpuacct", at_root: bool = False) -> Path:
    """A cgroup v1 ``cpu`` hierarchy under ``root``; the quota files in the listed cgroup or at the mount's root."""
    folder = root / mount if at_root else root / mount / relative.strip("/")
    folder.mkdir(parents=True, exist_ok=True)
    if quota is not None:
        (folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    if period is not None:
        (folder / "cpu.cfs_period_us").write_text(period + "\n")
    listing = root / "proc-self-cgroup"
    listing.write_text(f"12:memory:/docker/abc\n4:{mount}:{relative}\n1:name=systemd:/docker/abc\n")
    return listing


# ------------------------------------------------------------- cgroup quota
@pytest.mark.parametrize("cpu_max,expected", [
    ("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1), ("1 100000", 1), ("400000 100000", 4),
    ("max 100000", None), ("max", None), ("", None), ("abc def", None), ("100000", None), ("0 100000", None),
    ("-5 100000", None), ("100000 0", None), ("1e5 100000", None), ("\x00\xff", None), (None, None),
])
def test_cgroup_v2_quota(tmp_path, cpu_max, expected):
    listing = v2(tmp_path, cpu_max)
    assert cgroup_quota_cpus(tmp_path, listing) == expected


def test_cgroup_v2_the_smallest_quota_of_the_cgroup_and_its_ancestors(tmp_path):
    assert cgroup_quota_cpus(tmp_path, v2(tmp_path, "400000 100000", parent="100000 100000")) == 1
    assert cgroup_quota_cpus(tmp_path / "b", v2(tmp_path / "b", "max 100000", parent="300000 100000")) == 3
    # A quota at the hierarchy's root (a container's own namespace lists "/") applies too.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cpu.max").write_text("250000 100000\n")
    (tmp_path / "c" / "listing").write_text("0::/\n")
    assert cgroup_quota_cpus(tmp_path / "c", tmp_path / "c" / "listing") == 3


@pytest.mark.parametrize("quota,period,expected", [
    ("300000", "100000", 3), ("-1", "100000", None), ("50000", "100000", 1), ("", "100000", None),
    ("max", "100000", None), ("200000", "", None), ("200000", "abc", None), (None, "100000", None),
    ("200000", None, None),
])
def test_cgroup_v1_quota(tmp_path, quota, period, expected):
    assert cgroup_quota_cpus(tmp_path, v1(tmp_path, quota, period)) == expected


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_cgroup_v1_listed_path_absent_in_a_container(tmp_path, mount):
    """Inside a container /proc/self/cgroup lists the host's path; the mount's root holds the container's quota."""
    listing = v1(tmp_path, "200000", "100000", mount=mount, at_root=True)
    assert cgroup_quota_cpus(tmp_path, listing) == 2


@pytest.mark.parametrize("listing", ["", "garbage", "0::", "::::\n", "1:cpu\n", "\n\n"])
def test_cgroup_listing_garbage_means_no_quota(tmp_path, listing):
    (tmp_path / "listing").write_text(listing)
    assert cgroup_quota_cpus(tmp_path, tmp_path / "listing") is None


def test_no_cgroup_files_at_all(tmp_path):
    assert cgroup_quota_cpus(tmp_path / "absent", tmp_path / "absent" / "cgroup") is None


def test_this_machine_reads_without_error():
    limits = usable_cpus()
    assert 1 <= limits.usable <= max(limits.machine, limits.slurm or 0)


# -------------------------------------------------------------------- SLURM
@pytest.mark.parametrize("value,expected", [("4", 4), (" 2 ", 2), ("1", 1), ("0", None), ("-3", None), ("", None),
                                            ("four", None), ("2.5", None), ("2(x3)", None), (None, None)])
def test_slurm_cpus_per_task(value, expected):
    env = {} if value is None else {"SLURM_CPUS_PER_TASK": value}
    assert slurm_cpus(env) == expected


# ---------------------------------------------------------- the smallest wins
def test_usable_is_the_smallest_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    listing = v2(tmp_path, "300000 100000")
    limits = usable_cpus(root=tmp_path, proc_cgroup=listing, environ={"SLURM_CPUS_PER_TASK": "4"})
    assert (limits.affinity, limits.quota, limits.slurm, limits.usable) == (6, 3, 4, 3)
    limits = usable_cpus(root=tmp_path, proc_cgroup=listing, environ={"SLURM_CPUS_PER_TASK": "2"})
    assert limits.usable == 2
    limits = usable_cpus(root=tmp_path / "none", proc_cgroup=tmp_path / "none", environ={})
    assert (limits.quota, limits.slurm, limits.usable) == (None, None, 6)


def test_affinity_unavailable_falls_back_to_the_machine(monkeypatch):
    def fails(pid):
        raise OSError("not here")

    monkeypatch.setattr(os, "sched_getaffinity", fails, raising=False)
    assert cpus.affinity_cpus() is None
    assert CpuLimits(None, None, None, machine=8).usable == 8


limit = st.one_of(st.none(), st.integers(1, 512))


@settings(max_examples=200, deadline=None)
@given(limit, limit, limit, st.integers(1, 512), st.integers(0, 600), st.one_of(st.none(), st.integers(1, 64)))
def test_threads_property(affinity, quota, slurm, machine, workers, setting):
    limits = CpuLimits(affinity, quota, slurm, machine)
    set_limits = [n for n in (affinity, quota, slurm) if n is not None]
    assert limits.usable == (min(set_limits) if set_limits else machine)
    choice = choose_threads(setting, workers, limits)
    assert choice.engine >= 1
    if setting is None:
        assert choice.source == "auto" and choice.engine == max(1, limits.usable - workers)
    elif setting <= 4 * limits.usable:
        assert choice.source == "threads" and choice.engine == setting
    else:  # more threads than 4 per CPU only contend (and 100000 aborted libgomp): 4 per CPU
        assert choice.source == "capped" and choice.engine == 4 * limits.usable
    assert choice.as_dict()["engine"] == choice.engine and json.loads(json.dumps(choice.as_dict()))


# ------------------------------------------------------------------ choice
def test_choice_line_names_every_limit():
    choice = choose_threads(None, 1, CpuLimits(2, None, None, 2))
    assert choice.describe() == ("threads: 1 for the engine (automatic; 2 CPUs usable: affinity 2, quota none, "
                                 "SLURM unset; 1 preparation worker beside it)")
    choice = choose_threads(3, 0, CpuLimits(16, 4, 8, 64))
    assert choice.describe() == ("threads: 3 for the engine (set by threads=3; 4 CPUs usable: affinity 16, quota 4, "
                                 "SLURM 8; 0 preparation workers beside it)")


def test_a_huge_threads_setting_is_capped_and_says_so():
    """threads=100000 made torch's OpenMP abort the process ("Thread creation failed")."""
    choice = choose_threads(100000, 1, CpuLimits(2, None, None, 2))
    assert (choice.engine, choice.source) == (8, "capped")
    assert choice.describe().startswith("threads: 8 for the engine (the threads setting capped at 4 per usable CPU;")


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_choose_threads_refuses_nonsense(bad):
    with pytest.raises(ValueError, match="threads must be null"):
        choose_threads(bad, 0, CpuLimits(2, None, None, 2))


def test_threads_setting_range_check():
    cfg = compose(["engine=fake", "threads=2"])
    for value in (None, 1, 2, 64):
        cfg.threads = value
        check_settings(cfg)
    for value in (0, -2):
        cfg.threads = value
        with pytest.raises(RunError, match="threads must be null or a whole number >= 1"):
            check_settings(cfg)


def test_threads_setting_must_be_a_number():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose(["threads=two"])


# ------------------------------------------------------------ applying it
def test_vllm_cpu_env_binds_the_last_cpus_unless_the_user_chose():
    assert vllm_cpu_env(2, {}, cpus=[0, 1, 2, 3]) == {"VLLM_CPU_OMP_THREADS_BIND": "2,3", "OMP_NUM_THREADS": "2"}
    assert vllm_cpu_env(8, {}, cpus=[4, 5]) == {"VLLM_CPU_OMP_THREADS_BIND": "4,5", "OMP_NUM_THREADS": "2"}
    assert vllm_cpu_env(1, {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, cpus=[0, 1]) == {}


def test_single_thread_sets_the_runtimes_unless_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OPENCV_FOR_THREADS_NUM", raising=False)
    cpus.single_thread()
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert os.environ["OPENCV_FOR_THREADS_NUM"] == "1"
    assert os.environ["MKL_NUM_THREADS"] == "3"  # the user's own choice stays


@pytest.mark.slow  # imports torch: seconds
def test_apply_engine_threads_sizes_torch():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        from regioncap.engines.fake import FakeEngine
        from regioncap.engines.transformers_engine import TransformersEngine

        cpus.apply_engine_threads(1, TransformersEngine, "cpu")
        assert torch.get_num_threads() == 1
        cpus.apply_engine_threads(None, TransformersEngine, "cpu")  # None: left as it is
        assert torch.get_num_threads() == 1
        cpus.apply_engine_threads(2, FakeEngine, "cpu")  # no torch in the engine: left as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_every_shipped_engine_says_how_its_threads_are_set():
    """A torch engine without ``cpu_threads`` would spin every core against the preparation workers."""
    from conftest import CONF_DIR

    from regioncap.components import group_base, resolve, shipped_targets

    seen = {}
    for group, _option, target in shipped_targets(CONF_DIR):
        if group == "engine":
            cls = resolve(target, group_base("engine"), "engine._target_")
            seen[cls.name] = cls.cpu_threads
    assert seen["transformers"] == "torch" and seen["vllm"] == "vllm"
    assert seen["fake"] is None and seen["openai"] is None


# -------------------------------------------------------------- in a run
def test_run_logs_the_choice_and_writes_it_to_the_manifest(tmp_path, caplog):
    from regioncap.job import execute

    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="regioncap"):
        execute(compose(["engine=fake", "progress=false", "workers=0"], output_dir=out))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("threads: "))
    threads = json.loads((out / "manifest.json").read_text())["threads"]
    assert threads["source"] == "auto" and threads["workers_beside"] == 0  # workers=0: none beside the engine
    assert threads["engine"] == threads["usable"] == usable_cpus().usable
    assert line.startswith(f"threads: {threads['engine']} for the engine (automatic; ")


def test_threads_setting_forces_the_figure(tmp_path):
    from regioncap.job import execute

    out = tmp_path / "run"
    execute(compose(["engine=fake", "progress=false", "threads=3", "workers=0"], output_dir=out))
    threads = json.loads((out / "manifest.json").read_text())["threads"]
    assert (threads["engine"], threads["source"], threads["workers_beside"]) == (3, "threads", 0)


def test_visualize_only_run_chooses_no_threads(tmp_path):
    from regioncap.job import execute

    out = tmp_path / "run"
    execute(compose(["engine=fake", "progress=false", "stages=[visualize]", "workers=0"], output_dir=out))
    assert json.loads((out / "manifest.json").read_text())["threads"] is None


@pytest.mark.slow  # starts the preparation pool (a fork server and a worker): seconds
@pytest.mark.parametrize("overlap,beside", [("true", 1), ("false", 0)])
def test_the_worker_beside_the_engine_counts_only_when_the_stages_overlap(tmp_path, overlap, beside):
    from regioncap.job import execute

    out = tmp_path / "run"
    execute(compose(["engine=fake", "progress=false", "workers=1", f"overlap={overlap}"], output_dir=out))
    threads = json.loads((out / "manifest.json").read_text())["threads"]
    assert threads["workers_beside"] == beside and threads["engine"] == max(1, threads["usable"] - beside)
