"""Install as a user does: a built wheel (not editable) in a fresh venv outside the checkout,
and an editable install; both give a working ``regioncap`` command with the shipped configs.

The fresh venv gets regioncap from the wheel and nothing else; its dependencies come from
the test interpreter's site-packages through a ``.pth`` line (no download, works offline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli

#: What a source checkout holds that a build must not see (outputs, venvs, caches).
_IGNORE = shutil.ignore_patterns(".git", ".venv*", "outputs", "multirun", "build", "dist", "*.egg-info",
                                 "__pycache__", ".pytest_cache", ".hypothesis", "wandb", ".cache")


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, cwd=str(cwd), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _fresh_venv(path: Path) -> Path:
    """A venv without pip whose site-packages also sees this interpreter's (for the dependencies)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Appended after the venv's own site-packages: the wheel's regioncap wins; a .pth file of the
    # outer site-packages (an editable regioncap there) is not processed from a .pth line.
    Path(site, "outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _run(cmd, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=str(cwd), env=_env(),
                          timeout=timeout)


@pytest.mark.cli
@pytest.mark.slow
def test_built_wheel_in_a_fresh_venv_runs_outside_the_checkout(tmp_path):
    started = time.monotonic()
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_IGNORE)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("regioncap-*.whl")
    built = time.monotonic()

    venv = tmp_path / "venv"
    python = _fresh_venv(venv)
    _pip("--python", str(python), "install", "--no-deps", "--ignore-installed", "-q", str(wheel), cwd=tmp_path)
    installed = time.monotonic()
    work = tmp_path / "elsewhere"
    work.mkdir()

    where = _run([python, "-c", "import regioncap, os; print(os.path.dirname(regioncap.__file__))"], work)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    assert (Path(where.stdout.strip()) / "conf" / "config.yaml").is_file()  # a real copy, not a link

    regioncap = venv / "bin" / "regioncap"
    job = _run([regioncap, "--cfg", "job"], work)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "name: shapes" in job.stdout and "metrics:" in job.stdout
    helped = _run([python, "-m", "regioncap", "--help"], work)
    assert helped.returncode == 0 and "== Examples ==" in helped.stdout

    out = work / "run"
    run = _run([regioncap, "engine=fake", "model=tiny", "data=demo", "progress=false", f"hydra.run.dir={out}"],
               work)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["regions_captioned"] == 18

    default = None
    if _has("torch") and _has("transformers"):
        # The offline default (shapes model shipped in the wheel) on two rows.
        default = work / "default"
        proc = _run([regioncap, "data.limit=2", "progress=false", f"hydra.run.dir={default}"], work, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((default / "metrics.json").read_text())
        assert metrics["rows"] == 2 and metrics["error_rows"] == 0
    ended = time.monotonic()
    print(f"\nwheel test: build {built - started:.1f} s, venv + install {installed - built:.1f} s, "
          f"runs {ended - installed:.1f} s (default run: {'yes' if default else 'skipped, no torch'}), "
          f"total {ended - started:.1f} s")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.cli
@pytest.mark.slow
def test_editable_install_finds_the_configs_from_any_folder(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_IGNORE)
    python = _fresh_venv(tmp_path / "venv")
    _pip("--python", str(python), "install", "--no-deps", "--ignore-installed", "--no-build-isolation", "-q",
         "-e", str(src), cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    job = _run([tmp_path / "venv" / "bin" / "regioncap", "--cfg", "job", "model=tiny"], work)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "name: tiny" in job.stdout


def _user_config_dir(tmp_path: Path) -> Path:
    user = tmp_path / "myconf"
    (user / "model").mkdir(parents=True)
    (user / "model" / "mymodel.yaml").write_text(
        "defaults:\n  - /schema/model/base@_here_\n  - _self_\nname: mymodel\npath: /models/my-qwen\n")
    return user


@pytest.mark.cli
def test_a_users_config_dir_composes_in(tmp_path):
    user = _user_config_dir(tmp_path)
    for flags in (["--config-dir", str(user)], [f"hydra.searchpath=[file://{user}]"]):
        proc = run_cli(["--cfg", "job", *flags, "model=mymodel"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "name: mymodel" in proc.stdout and "path: /models/my-qwen" in proc.stdout
        assert "patch_size: 14" in proc.stdout  # the schema's defaults fill in what the file leaves out
        # the shipped groups are still there
        assert "name: marked" in proc.stdout
