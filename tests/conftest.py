"""Shared fixtures: the real config tree composed with Hydra's compose API."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]

# The vLLM fixtures (one server for the whole session, shared by every module).
pytest_plugins = ["vllm_helpers"]
CONF_DIR = REPO / "conf"

# ------------------------------------------------------------------ test tiers
#
#   unit    -n 2 -m "not slow and not cli and not vllm"   in-process, under two minutes on 2 cores
#   cli     tests that start `python -m regioncap` (or another command) in a subprocess
#   slow    tests that start a real model, a server or a browser
#   vllm    tests that need .venv-vllm
#
# A test whose source (or a helper of its module it calls) starts a subprocess
# is marked `cli` at collection, so the unit tier never starts a process by
# accident; run_cli also refuses to run in a test that is not marked.

_SPAWNS = re.compile(r"\brun_cli\(|\bsubprocess\.|\bPopen\(|_server\b|vllm_python|chromium|sys\.executable")

#: Optional packages and the extra that installs them (see pyproject.toml).
OPTIONAL = {
    "torch": "transformers", "transformers": "transformers", "torchvision": "transformers",
    "openai": "openai", "wandb": "wandb", "mlflow": "trackers", "tensorboard": "trackers", "ray": "ray", "submitit": "slurm",
    "hydra_plugins.hydra_submitit_launcher": "slurm", "skimage": "dev", "matplotlib": "dev",
    "hypothesis": "dev", "qwen_vl_utils": "dev", "pycocoevalcap": "metrics",
}
#: scripts/test.sh (and so CI) sets this: a missing optional package fails its tests instead of skipping them.
REQUIRE_ALL = os.environ.get("REGIONCAP_REQUIRE_ALL") == "1"


def requires(*modules: str):
    """Mark a test (or a module, as ``pytestmark``) that needs optional packages.

    Skips it where one is missing, naming the extra to install, except under
    ``REGIONCAP_REQUIRE_ALL=1`` (CI), where nothing is skipped and the test
    fails on the missing import instead.
    """
    missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]
    extras = sorted({OPTIONAL.get(m, "dev") for m in missing})
    reason = f"needs {', '.join(missing)} (pip install -e \".[{','.join(extras)}]\")"
    return pytest.mark.skipif(bool(missing) and not REQUIRE_ALL, reason=reason)


def _module_helpers_spawning(module) -> set:
    names = set()
    for name, obj in vars(module).items():
        unwrap = getattr(obj, "_get_wrapped_function", None)  # a pytest fixture (pytest >= 8.4)
        if unwrap is not None:
            obj = unwrap()
        if inspect.isfunction(obj) and getattr(obj, "__module__", None) == module.__name__ \
                and not name.startswith("test_"):
            try:
                if _SPAWNS.search(inspect.getsource(obj)):
                    names.add(name)
            except (OSError, TypeError):
                pass
    return names


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the markers added here count
def pytest_collection_modifyitems(config, items):
    helpers: dict = {}
    for item in items:
        fn = getattr(item, "function", None)
        if fn is None or item.get_closest_marker("cli"):
            continue
        module = item.module
        if module not in helpers:
            helpers[module] = _module_helpers_spawning(module)
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        fixtures = set(getattr(item, "fixturenames", ()))
        if _SPAWNS.search(source) or any(re.search(rf"\b{h}\(", source) or h in fixtures
                                         for h in helpers[module]):
            item.add_marker(pytest.mark.cli)
    _CLI_TESTS.update(i.nodeid for i in items if i.get_closest_marker("cli"))
    # Under xdist (`--dist loadfile --no-loadscope-reorder`, .ci/run) files are handed out in this
    # order, the longest first, so the two workers finish close together (a long file handed out
    # last keeps one worker busy while the other has nothing left).
    rank = {name: i for i, name in enumerate(_RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_RUN_FIRST)))


#: Test files handed out first, in this order (see pytest_collection_modifyitems); the rest keep theirs.
#: The two 3B tests (about 11 GB and 9 GB of RAM) go to the same worker, one after the other: xdist's
#: loadfile scheduler gives the first worker file 1 and, as that file holds under 3 tests, file 3 at
#: once; file 2 (over 2 tests) goes to the other worker. :func:`big_model_slot` keeps them apart
#: whatever the scheduler does.
_RUN_FIRST = ("test_full_arch_vllm.py", "test_pipeline_properties.py", "test_full_arch.py")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    # The unit tier on a machine with only the core dependencies: a test that
    # imports a missing optional package skips, naming the extra (not in CI).
    outcome = yield
    exc = outcome.excinfo[1] if outcome.excinfo else None
    if REQUIRE_ALL or not isinstance(exc, ModuleNotFoundError):
        return
    top = (exc.name or "").split(".")[0]
    extra = next((e for m, e in OPTIONAL.items() if m.split(".")[0] == top), None)
    if extra is not None:
        outcome.force_exception(pytest.skip.Exception(f"needs {top} (pip install -e \".[{extra}]\")",
                                                      _use_item_location=True))


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


def typed(overrides: List[str] = (), output_dir: str = "unused-run-dir", pin: bool = True):
    """:func:`compose`, then typed as the job types it (``settings.typed_config``): what the code below
    the job receives. ``output_dir`` is only read, never written, by the functions that take it."""
    from regioncap.settings import typed_config

    return typed_config(compose(overrides, output_dir=output_dir, pin=pin))


def family(name: str):
    """The family object named ``name`` (``qwen2_5_vl``, ``qwen2_vl``...) with its class's default settings."""
    from regioncap.families.base import shipped_families

    return shipped_families()[name]()


def ground(text, width, height, family_name: str = "qwen2_5_vl", **kw):
    """``family_name``'s reading of a grounding answer (``Family.parse_grounding``)."""
    return family(family_name).parse_grounding(text, width, height, **kw)


@pytest.fixture
def compose_cfg():
    return compose


@pytest.fixture(scope="session")
def big_model_slot(tmp_path_factory):
    """A context manager to hold while a full-size (3B) model is in memory: one at a time across the
    xdist workers of a run, as two need about 20 GB of RAM."""
    import contextlib
    import fcntl

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    # The workers' temp folders share a parent that belongs to this run; one process needs no lock.
    lock_path = tmp_path_factory.getbasetemp().parent / "big-model.lock" if worker else None

    @contextlib.contextmanager
    def slot():
        if lock_path is None:
            yield
            return
        with open(lock_path, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # closing the file lets go
            yield

    return slot


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The offline tiny Qwen2.5-VL, built once per test session."""
    from regioncap.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def tiny_internvl_dir(tmp_path_factory) -> Path:
    """The offline tiny InternVL3.5, built once per test session."""
    from regioncap.families.internvl_files import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-internvl3.5")


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    """The offline tiny Gemma 3 (``model=gemma3_tiny``), built once per test session."""
    from regioncap.families.gemma import Gemma3

    return Gemma3.build_tiny(tmp_path_factory.mktemp("models") / "tiny-gemma3")


@pytest.fixture(scope="session")
def tiny_florence_dir(tmp_path_factory) -> Path:
    """The offline tiny Florence-2 (random weights), built once per test session."""
    from regioncap.families.florence import Florence2

    return Florence2.build_tiny(tmp_path_factory.mktemp("models") / "tiny-florence2")


def run_cli(args: List[str], *, python: str = sys.executable, env: dict | None = None, timeout: int = 300,
            cwd: str | Path | None = None, pin: bool = True):
    """Run ``python -m regioncap ARGS`` in a subprocess, like a user would (see :func:`pinned`)."""
    import subprocess

    current = os.environ.get("PYTEST_CURRENT_TEST")
    if current and os.environ.get("REGIONCAP_CLI_GUARD", "1") == "1" and not _marked_cli(current):
        raise AssertionError(f"{current.split(' ')[0]} starts a subprocess: mark it @pytest.mark.cli")
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONPATH", str(REPO))
    full_env.update(env or {})
    if pin and "--help" not in args and not any(a.startswith("--cfg") for a in args):
        flags = [a for a in args if a.startswith("-")]
        args = flags + pinned([a for a in args if not a.startswith("-")])
    return subprocess.run([python, "-m", "regioncap", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(cwd or REPO))


#: node ids of the tests marked ``cli`` (filled at collection; run_cli checks it).
_CLI_TESTS: set = set()


def _marked_cli(current: str) -> bool:
    nodeid = current.rsplit(" (", 1)[0]
    return nodeid in _CLI_TESTS
