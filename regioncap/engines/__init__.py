"""Engines named by ``_target_`` (``conf/engine/*.yaml``); each one's heavy imports happen only when it is built.

:mod:`regioncap.components` resolves, types and checks the class; this module
builds it and asks what can be asked of it before the first row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from regioncap.components import class_of, node_name
from regioncap.engines.base import (
    Engine, EngineError, EngineInfo, Request, Response, Sampling, error_response, make_response, validate_answer,
)

if TYPE_CHECKING:
    from regioncap.families.base import Family


def engine_of(engine_cfg: Engine.Config) -> type:
    """The engine class ``engine_cfg._target_`` names (``engine=auto``: :class:`~regioncap.engines.auto.AutoEngine`,
    whose capabilities hold for either engine it may become)."""
    return class_of(engine_cfg, Engine, "engine")


def engine_name(engine_cfg: Engine.Config) -> str:
    """The engine's short name (``transformers``), as runs, the log and the manifest show it."""
    return node_name(engine_cfg) or "engine"


def engine_choice(engine_cfg: Engine.Config) -> str:
    """The engine as the run's log line names it: its name, and for ``engine=auto`` what it
    picked here and why (``auto -> transformers (vllm not installed)``)."""
    describe = getattr(engine_of(engine_cfg), "describe_choice", None)
    return describe(engine_cfg) if describe is not None else engine_name(engine_cfg)


def build_engine(engine_cfg: Engine.Config, model_cfg: Family.Config, model_path: str | None) -> Engine:
    """Build the engine ``engine_cfg`` names for the model ``model_cfg``.

    ``model_path`` is the resolved local folder or hub id (see ``regioncap.models``).
    """
    cls = engine_of(engine_cfg)
    return cls.chosen(engine_cfg)(model_cfg=model_cfg, engine_cfg=engine_cfg, model_path=model_path)


def preflight(engine_cfg: Engine.Config, model_cfg: Family.Config) -> None:
    """Check, before the first row, what can be checked of the engine without loading a model.

    ``engine=openai`` (with ``engine.preflight``): the server at ``base_url``
    answers ``GET /models`` and serves the model (see ``OpenAIEngine.check``).
    Other engines: nothing here (their model path is resolved before the run).
    Raises :class:`EngineError` (a ``RunError``) with a message naming the cause.
    """
    engine_of(engine_cfg).preflight(engine_cfg, model_cfg)


__all__ = [
    "Engine", "EngineError", "EngineInfo", "Request", "Response", "Sampling", "build_engine", "engine_choice",
    "engine_name",
    "engine_of", "error_response", "make_response", "preflight", "validate_answer",
]
