"""scripts/setup.sh: which torch it picks (cpu or cuda) and what it would install, tested without installing.

The choice lives in scripts/torch_flavour.py (standard library only, it runs
before the venv exists); ``setup.sh --print-plan`` prints the choice and the
pip steps and stops.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import torch_flavour  # noqa: E402


def _fake_smi(folder: Path, rc: int) -> Path:
    """A folder with an ``nvidia-smi`` that exits ``rc`` (0: lists a GPU; else: no device, as in containers)."""
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho 'GPU 0: NVIDIA Fake (UUID: GPU-0)'\nexit {rc}\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    return folder


def _venv_with_torch(folder: Path, version: str) -> Path:
    (folder / "lib" / "python3.11" / "site-packages" / f"torch-{version}.dist-info").mkdir(parents=True)
    return folder


@pytest.fixture
def no_driver(tmp_path) -> dict:
    """An environment without a GPU, whatever machine runs the test."""
    return {"PATH": str(_fake_smi(tmp_path / "nogpu", 1)), "REGIONCAP_NVIDIA_DRIVER_DIR": str(tmp_path / "none")}


def test_no_gpu_picks_cpu(no_driver, tmp_path):
    flavour, why = torch_flavour.pick(no_driver, tmp_path / "venv")
    assert flavour == "cpu" and "no NVIDIA GPU" in why


def test_no_nvidia_smi_at_all_picks_cpu(tmp_path):
    env = {"PATH": str(tmp_path / "empty"), "REGIONCAP_NVIDIA_DRIVER_DIR": str(tmp_path / "none")}
    assert torch_flavour.pick(env, tmp_path / "venv")[0] == "cpu"


def test_working_nvidia_smi_picks_cuda(no_driver, tmp_path):
    env = dict(no_driver, PATH=str(_fake_smi(tmp_path / "gpu", 0)))
    assert torch_flavour.pick(env, tmp_path / "venv") == ("cuda", "nvidia-smi lists a GPU")


def test_loaded_driver_picks_cuda_without_nvidia_smi(no_driver, tmp_path):
    (tmp_path / "driver").mkdir()
    env = dict(no_driver, REGIONCAP_NVIDIA_DRIVER_DIR=str(tmp_path / "driver"))
    flavour, why = torch_flavour.pick(env, tmp_path / "venv")
    assert flavour == "cuda" and str(tmp_path / "driver") in why


@pytest.mark.parametrize("forced", ["cpu", "cuda", " CUDA "])
def test_regioncap_torch_forces_either_way(forced, no_driver, tmp_path):
    (tmp_path / "driver").mkdir()
    for env in (no_driver, dict(no_driver, REGIONCAP_NVIDIA_DRIVER_DIR=str(tmp_path / "driver"))):
        flavour, why = torch_flavour.pick(dict(env, REGIONCAP_TORCH=forced), tmp_path / "venv")
        assert flavour == forced.strip().lower() and "REGIONCAP_TORCH" in why


def test_bad_regioncap_torch_names_the_setting(no_driver, tmp_path):
    with pytest.raises(ValueError, match="REGIONCAP_TORCH=gpu is not one of auto, cpu, cuda"):
        torch_flavour.pick(dict(no_driver, REGIONCAP_TORCH="gpu"), tmp_path / "venv")


@pytest.mark.parametrize("version, flavour", [("2.13.0+cpu", "cpu"), ("2.14.1", "cuda")])
def test_an_existing_venv_keeps_its_torch(version, flavour, no_driver, tmp_path):
    venv = _venv_with_torch(tmp_path / "venv", version)
    assert torch_flavour.installed_flavour(venv) == flavour
    got, why = torch_flavour.pick(no_driver, venv)
    assert got == flavour and "already holds" in why


def test_forcing_the_other_flavour_on_an_existing_venv_says_to_remove_it(no_driver, tmp_path):
    venv = _venv_with_torch(tmp_path / "venv", "2.14.1")
    with pytest.raises(ValueError, match=r"holds a cuda torch; remove it \(rm -rf"):
        torch_flavour.pick(dict(no_driver, REGIONCAP_TORCH="cpu"), venv)


def test_cpu_extra_is_the_transformers_extra_without_torchvision():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(extras["transformers"]) == ["regioncap[transformers-cpu]", "torchvision"]
    names = [req.split(">")[0].split("=")[0].split("[")[0] for req in extras["transformers-cpu"]]
    assert "torch" in names and "transformers" in names and "torchvision" not in names


def _setup(env: dict, venv: Path, *args: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("REGIONCAP_")}
    full.update(env, REGIONCAP_VENV=str(venv), PATH=env["PATH"] + os.pathsep + os.environ["PATH"],
                PYTHON=sys.executable)
    return subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), *args], capture_output=True,
                          text=True, env=full, timeout=60)


def _plan(env: dict, venv: Path, *args: str) -> subprocess.CompletedProcess:
    return _setup(env, venv, "--print-plan", *args)


RUN_EXTRAS = "openai,wandb,trackers,ray,slurm,metrics"


@pytest.mark.cli
def test_print_plan_on_a_machine_without_a_gpu_installs_no_cuda_and_no_test_tools(no_driver, tmp_path):
    venv = tmp_path / "venv"
    proc = _plan(no_driver, venv)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("setup: cpu torch, because no NVIDIA GPU found")
    assert lines[1].startswith("setup: for runs (scripts/test.sh adds the test tools: setup.sh --dev)")
    assert any(line.endswith("install -q torch==2.13.0+cpu") for line in lines)
    assert any(line.endswith(f"-e .[transformers-cpu,{RUN_EXTRAS}]") for line in lines)
    assert not any("torchvision" in line or ".[transformers," in line or "dev]" in line for line in lines)
    assert lines[-1].endswith("uninstall -q -y triton")
    assert all(line.startswith(f"{venv}/bin/python") for line in lines[2:])
    assert not venv.exists()  # the plan installs nothing


@pytest.mark.cli
def test_print_plan_with_dev_adds_the_test_tools_in_the_same_pip_step(no_driver, tmp_path):
    proc = _plan(no_driver, tmp_path / "venv", "--dev")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == "setup: for runs and tests (--dev: the test tools too)"
    installs = [line for line in lines if " -e ." in line]
    # One step: a second pip install after the uninstall would bring triton back (xgrammar requires it).
    assert len(installs) == 1 and installs[0].endswith(f"-e .[transformers-cpu,{RUN_EXTRAS},dev]")
    assert lines[-1].endswith("uninstall -q -y triton qwen-vl-utils av")


@pytest.mark.cli
@pytest.mark.parametrize("dev", [False, True])
def test_print_plan_with_a_gpu_is_the_cuda_pair(dev, no_driver, tmp_path):
    proc = _plan(dict(no_driver, PATH=str(_fake_smi(tmp_path / "gpu", 0))), tmp_path / "venv",
                 *(["--dev"] if dev else []))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("setup: cuda torch, because nvidia-smi lists a GPU\n")
    assert "install -q torch==2.14.1 torchvision==0.29.1\n" in proc.stdout
    assert f"-e .[transformers,{RUN_EXTRAS}{',dev' if dev else ''}]\n" in proc.stdout
    assert "triton" not in proc.stdout


@pytest.mark.cli
def test_print_plan_refuses_a_bad_setting(no_driver, tmp_path):
    proc = _plan(dict(no_driver, REGIONCAP_TORCH="rocm"), tmp_path / "venv")
    assert proc.returncode == 2 and "REGIONCAP_TORCH=rocm is not one of auto, cpu, cuda" in proc.stderr


@pytest.mark.cli
def test_an_unknown_argument_is_refused(no_driver, tmp_path):
    proc = _setup(no_driver, tmp_path / "venv", "--tests")
    assert proc.returncode == 2 and "unknown argument '--tests'" in proc.stderr


def _fake_venv(folder: Path) -> Path:
    """A venv whose python logs its pip calls instead of installing (and answers the final version line)."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1" = -m ]; then echo "$*" >> {folder}/pip.log; else echo torch x; fi\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.mark.cli
def test_stamp_runs_then_tests_gets_both_and_tests_then_runs_installs_nothing(no_driver, tmp_path):
    """The real script (not the plan) over a fake venv: each call installs what its stamp lacks, only that."""
    venv = _fake_venv(tmp_path / "venv")
    log = venv / "pip.log"

    def steps(*args: str) -> list:
        log.write_text("")
        proc = _setup(no_driver, venv, *args)
        assert proc.returncode == 0, proc.stderr
        return log.read_text().splitlines()

    run = steps()
    assert any(line.endswith(f"-e .[transformers-cpu,{RUN_EXTRAS}]") for line in run)
    assert (venv / ".regioncap-setup").read_text().split()[1] == "run"
    assert steps() == []  # set up for runs already
    dev = steps("--dev")  # set up for runs, then for tests: the test tools come on top
    assert any(line.endswith(f"-e .[transformers-cpu,{RUN_EXTRAS},dev]") for line in dev)
    assert dev[-1].endswith("uninstall -q -y triton qwen-vl-utils av")
    assert steps("--dev") == [] and steps() == []  # a venv with the test tools serves runs too
