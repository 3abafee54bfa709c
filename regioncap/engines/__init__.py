"""Engines resolved by name; each one's heavy imports happen only when it is built."""

from __future__ import annotations

import importlib
from typing import Any

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


def build_engine(engine_cfg: Any, model_cfg: Any, model_path: str | None) -> Engine:
    """Build the engine named by ``engine_cfg.name`` for the model ``model_cfg``.

    ``model_path`` is the resolved local folder or hub id (see ``regioncap.models``).
    """
    name = resolve_engine_name(engine_cfg.name)
    module_name, cls_name = ENGINES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(model_cfg=model_cfg, engine_cfg=engine_cfg, model_path=model_path)


def preflight(engine_cfg: Any, model_cfg: Any) -> None:
    """Check, before the first row, what can be checked of the engine without loading a model.

    ``engine=openai`` (with ``engine.preflight``): the server at ``base_url``
    answers ``GET /models`` and serves the model (see ``OpenAIEngine.check``).
    Other engines: nothing here (their model path is resolved before the run).
    Raises :class:`EngineError` (a ``RunError``) with a message naming the cause.
    """
    if resolve_engine_name(engine_cfg.name) != "openai" or not getattr(engine_cfg, "preflight", True):
        return
    from regioncap.engines.openai_engine import OpenAIEngine

    OpenAIEngine.preflight(engine_cfg, model_cfg)


__all__ = [
    "ENGINES", "Engine", "EngineError", "EngineInfo", "Request", "Response", "Sampling",
    "build_engine", "error_response", "make_response", "preflight", "resolve_engine_name", "validate_answer",
]
