"""Shared fixtures: the real config tree composed with Hydra's compose API."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]

# The vLLM fixtures (one server for the whole session, shared by every module).
pytest_plugins = ["vllm_helpers"]
CONF_DIR = REPO / "conf"

# The tests never reach a model hub; make libraries fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


#: Most tests run on the bundled photos with the random-weight tiny model: the
#: counts they check (5 rows, 18 regions) are the photo demo's. Tests of the
#: shipped default (model=shapes, data=shapes) pass ``pin=False``.
TEST_GROUPS = {"model": "tiny", "data": "demo"}


def pinned(overrides: List[str]) -> List[str]:
    """``overrides`` with ``model=tiny`` / ``data=demo`` added where they choose no model / data."""
    overrides = list(overrides)
    if any(o.startswith("experiment=") for o in overrides):
        return overrides
    chosen = {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}
    return [f"{g}={v}" for g, v in TEST_GROUPS.items() if g not in chosen] + overrides


def compose(overrides: List[str] = (), output_dir: str | None = None, pin: bool = True):
    """Compose ``conf/config.yaml`` as the CLI would, with ``overrides`` (see :func:`pinned`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from regioncap.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=pinned(overrides) if pin else list(overrides))
    if output_dir is not None:
        # ${hydra:runtime.output_dir} does not resolve under the compose API.
        cfg.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def compose_cfg():
    return compose


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The offline tiny Qwen2.5-VL, built once per test session."""
    from regioncap.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl")


def run_cli(args: List[str], *, python: str = sys.executable, env: dict | None = None, timeout: int = 300,
            cwd: str | Path | None = None, pin: bool = True):
    """Run ``python -m regioncap ARGS`` in a subprocess, like a user would (see :func:`pinned`)."""
    import subprocess

    full_env = dict(os.environ)
    full_env.setdefault("PYTHONPATH", str(REPO))
    full_env.update(env or {})
    if pin and "--help" not in args and not any(a.startswith("--cfg") for a in args):
        flags = [a for a in args if a.startswith("-")]
        args = flags + pinned([a for a in args if not a.startswith("-")])
    return subprocess.run([python, "-m", "regioncap", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(cwd or REPO))
