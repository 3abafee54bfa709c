"""A missing optional package is one line naming the extra to install, found before any work."""

from __future__ import annotations

import os
import sys

import pytest
from dataclasses import replace

from conftest import typed as compose
from regioncap.errors import RunError
from regioncap.requirements import check_requirements, missing_requirements


def check_engine(cfg):
    """The requirements of ``cfg``'s engine alone (the caption stage's)."""
    check_requirements(replace(cfg, stages=["caption"], model=None, data=None, prompt=None, logger=None,
                               executor=None, propose=None))


def _hide(monkeypatch, *modules):
    # A None entry in sys.modules is how Python marks a module as not importable:
    # find_spec returns None for it and `import` raises ModuleNotFoundError.
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_installed_engine_passes():
    check_engine(compose(["engine=transformers"]))
    check_engine(compose(["engine=fake"]))
    assert missing_requirements(compose(["engine=transformers"])) == []


def test_missing_torch_names_the_extra(monkeypatch):
    _hide(monkeypatch, "torch")
    with pytest.raises(RunError) as exc:
        check_engine(compose(["engine=transformers"]))
    msg = str(exc.value)
    assert "torch" in msg and 'pip install "regioncap[transformers]"' in msg and "\n" not in msg


def test_auto_without_torch_falls_to_transformers_and_says_so(monkeypatch):
    _hide(monkeypatch, "torch", "vllm")
    with pytest.raises(RunError, match=r"engine=auto \(here: transformers\) needs torch"):
        check_engine(compose(["engine=auto"]))


def test_missing_vllm_and_openai(monkeypatch):
    _hide(monkeypatch, "vllm", "openai")
    with pytest.raises(RunError, match=r'regioncap\[vllm\]'):
        check_engine(compose(["engine=vllm"]))
    with pytest.raises(RunError, match=r'regioncap\[openai\]'):
        check_engine(compose(["engine=openai"]))


def test_logger_and_executor_extras(monkeypatch):
    _hide(monkeypatch, "wandb", "ray")
    cfg = compose(["engine=fake", "logger=wandb", "executor=ray"])
    problems = missing_requirements(cfg)
    assert problems == ['logger=wandb needs wandb, which is not installed: pip install "regioncap[wandb]"',
                        'executor=ray needs ray, which is not installed: pip install "regioncap[ray]"']
    with pytest.raises(RunError, match="regioncap\\[wandb\\].*regioncap\\[ray\\]"):
        check_requirements(cfg)


def test_visualize_only_needs_no_engine(monkeypatch):
    _hide(monkeypatch, "torch")
    assert missing_requirements(compose(["engine=transformers", "stages=[visualize]"])) == []


def test_the_check_imports_nothing_heavy():
    """engine=auto only looks torch up (it imports it where vLLM is installed too, to ask for CUDA)."""
    import subprocess

    from conftest import REPO

    code = ("from regioncap.config import RegionCapConfig; from regioncap.engines.auto import AutoEngine; "
            "from regioncap.loggers import WandbLogger; from regioncap.executors.ray_executor import RayExecutor; "
            "from regioncap.requirements import check_requirements; "
            "named = lambda cls, **kw: cls.Config(_target_=f'{cls.__module__}.{cls.__qualname__}', **kw); "
            "check_requirements(RegionCapConfig(model=None, data=None, prompt=None, propose=None, "
            "stages=['visualize', 'caption'], engine=named(AutoEngine), logger=named(WandbLogger), "
            "executor=named(RayExecutor)))")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    heavy = imported & {"transformers", "vllm", "wandb", "ray", "openai", "datasets"}
    assert not heavy, heavy
