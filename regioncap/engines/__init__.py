"""Engines resolved by name; each one's heavy imports happen only when it is built."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, List, Optional, Sequence

from regioncap.engines.base import (
    Engine, EngineError, EngineInfo, Request, Response, Sampling, error_response, make_response, validate_answer,
)

#: name -> "module:Class"; modules are imported only when that engine is picked.
ENGINES = {
    "transformers": "regioncap.engines.transformers_engine:TransformersEngine",
    "vllm": "regioncap.engines.vllm_engine:VllmEngine",
    "openai": "regioncap.engines.openai_engine:OpenAIEngine",
    "fake": "regioncap.engines.fake:FakeEngine",
}


def resolve_engine_name(name: str) -> str:
    """Map ``auto`` to ``vllm`` where CUDA and vLLM are both usable, else ``transformers``."""
    if name != "auto":
        if name not in ENGINES:
            raise EngineError(f"unknown engine {name!r}; choose one of {sorted(ENGINES) + ['auto']}")
        return name
    import importlib.util

    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("torch") is None:
        return "transformers"
    import torch

    return "vllm" if torch.cuda.is_available() else "transformers"


def engine_class(name: str) -> type:
    """The engine class registered as ``name`` (its module is light to import: heavy imports are inside).

    ``auto`` is not resolved here (that needs torch): it has no class of its own,
    see :func:`engine_capability`.
    """
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose one of {sorted(ENGINES) + ['auto']}")
    module_name, cls_name = ENGINES[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def engine_capability(engine_cfg: Any, capability: str) -> bool:
    """A capability of the configured engine (:class:`Engine` class attributes and ``cpu_bound``).

    For ``auto``, which becomes vLLM or transformers only when the engine is
    built, true when either of the two has it.
    """
    names = ["vllm", "transformers"] if engine_cfg.name == "auto" else [str(engine_cfg.name)]
    for name in names:
        cls = engine_class(name)
        value = cls.cpu_bound(engine_cfg) if capability == "cpu_bound" else getattr(cls, capability)
        if value:
            return True
    return False


def missing_modules(modules: Sequence[str]) -> List[str]:
    """The top-level modules of ``modules`` that cannot be imported here (looked up, never imported)."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or half-installed package
            found = False
        if not found:
            missing.append(module)
    return missing


def install_hint(extra: Optional[str]) -> str:
    return f'pip install "regioncap[{extra}]"' if extra else "install them"


def check_requirements(engine_cfg: Any) -> None:
    """Raise :class:`EngineError` with one line naming the extra to install when
    a module the engine ``engine_cfg.name`` needs is missing.

    Cheap: the engine's module is imported (it imports nothing heavy at module
    level) and its ``requires`` are only looked up with ``importlib.util.find_spec``.
    Call it before any work starts.
    """
    name = resolve_engine_name(engine_cfg.name)
    module_name, cls_name = ENGINES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    missing = missing_modules(getattr(cls, "requires", ()))
    if missing:
        picked = f"engine={engine_cfg.name}" + (f" (here: {name})" if name != engine_cfg.name else "")
        raise EngineError(f"{picked} needs {', '.join(missing)}, which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: {install_hint(cls.extra)}")


def build_engine(engine_cfg: Any, model_cfg: Any, model_path: str | None) -> Engine:
    """Build the engine named by ``engine_cfg.name`` for the model ``model_cfg``.

    ``model_path`` is the resolved local folder or hub id (see ``regioncap.models``).
    """
    cls = engine_class(resolve_engine_name(engine_cfg.name))
    return cls(model_cfg=model_cfg, engine_cfg=engine_cfg, model_path=model_path)


def preflight(engine_cfg: Any, model_cfg: Any) -> None:
    """Check, before the first row, what can be checked of the engine without loading a model.

    ``engine=openai`` (with ``engine.preflight``): the server at ``base_url``
    answers ``GET /models`` and serves the model (see ``OpenAIEngine.check``).
    Other engines: nothing here (their model path is resolved before the run).
    Raises :class:`EngineError` (a ``RunError``) with a message naming the cause.
    """
    if str(engine_cfg.name) == "auto":  # vLLM or transformers: local models, resolved before the run
        return
    engine_class(str(engine_cfg.name)).preflight(engine_cfg, model_cfg)


__all__ = [
    "ENGINES", "Engine", "EngineError", "EngineInfo", "Request", "Response", "Sampling", "build_engine",
    "check_requirements", "engine_capability", "engine_class", "error_response", "make_response",
    "missing_modules", "preflight", "resolve_engine_name", "validate_answer",
]
