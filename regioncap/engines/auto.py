"""``engine=auto``: vLLM where CUDA and vLLM are usable, else transformers.

A class of its own so the option is named like every other (``_target_``): its
``Config`` has the settings of both engines, and :meth:`AutoEngine.chosen`
picks the class that is built. The pick imports torch (to ask for CUDA), so it
happens only when the engine is built or its packages are checked.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, List, Sequence, Tuple

from regioncap.components import check, whole
from regioncap.engines.base import Engine, Request, Response
from regioncap.engines.transformers_engine import TransformersEngine
from regioncap.engines.vllm_engine import VllmEngine


class AutoEngine(Engine):
    """Stands for :class:`VllmEngine` or :class:`TransformersEngine`; never built itself."""

    @dataclass
    class Config(VllmEngine.Config, TransformersEngine.Config):
        batch_size: int = field(default=8, metadata=check(whole(1)))

    name = "auto"
    # Whichever it becomes: a capability holds when either of the two has it.
    needs_model_path = VllmEngine.needs_model_path or TransformersEngine.needs_model_path
    isolate_in_sweeps = VllmEngine.isolate_in_sweeps or TransformersEngine.isolate_in_sweeps

    @classmethod
    def cpu_bound(cls, engine_cfg: AutoEngine.Config) -> bool:
        # Not known before the pick (which imports torch): the preparation workers take every other core.
        return False

    @classmethod
    def chosen(cls, node: Any) -> type:
        return cls.pick()[0]

    @classmethod
    def pick(cls) -> Tuple[type, str]:
        """The engine class built here and why (the run's log line says both)."""
        missing = [m for m in ("vllm", "torch") if importlib.util.find_spec(m) is None]
        if missing:
            return TransformersEngine, f"{' and '.join(missing)} not installed"
        import torch

        if not torch.cuda.is_available():
            return TransformersEngine, "vllm installed, but no CUDA device (torch.cuda.is_available() is false)"
        return VllmEngine, f"CUDA ({torch.cuda.device_count()} device(s)) and vllm installed"

    @classmethod
    def describe_choice(cls, node: Any) -> str:
        """``auto -> vllm (CUDA (1 device(s)) and vllm installed)``: the pick, for the log."""
        engine, why = cls.pick()
        return f"{cls.name} -> {engine.name} ({why})"

    def generate(self, requests: Sequence[Request]) -> List[Response]:  # pragma: no cover - never built
        raise NotImplementedError("AutoEngine is resolved to vLLM or transformers before it is built")
