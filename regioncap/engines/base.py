"""The one small interface every engine implements.

Engines receive requests whose image is already at the model's input size (the
visualize stage resized it with the model family's own rule) and return one
response per request, in order. A failure of one request is a response with an
``error``; it never raises out of ``generate`` and never fails its neighbours.
Only a failure of the engine as a whole (it cannot load, the server is gone for
good) raises :class:`EngineError`.

No heavy imports here: torch, transformers, vllm and openai are imported inside
the engine that needs them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple


class EngineError(RuntimeError):
    """The engine as a whole cannot go on (bad model path, server unreachable...)."""


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: Optional[int] = None


@dataclass
class Request:
    """One chat turn: an image plus user text, answered by one completion."""

    #: Unique within a run (``<row_id>/c<chunk>`` or ``.../r<n>``); used in logs and errors.
    key: str
    #: Path of the image to send, already at the model's input size.
    image_path: str
    #: User text (the image comes first in the user turn).
    prompt: str
    system: Optional[str] = None
    sampling: Sampling = field(default_factory=Sampling)
    #: Optional constraint on the answer for engines with structured decoding:
    #: a regular expression the whole answer must match, or a JSON schema.
    regex: Optional[str] = None
    json_schema: Optional[Dict[str, Any]] = None
    #: Image size (width, height) in pixels, when known (saves a file open).
    image_size: Optional[tuple] = None
    #: What the pipeline knows about the request (region numbers, answer
    #: format...). Real engines ignore it; the fake engine answers from it.
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Response:
    key: str
    text: Optional[str] = None
    #: ``{"kind": ..., "message": ...}`` when the request failed.
    error: Optional[Dict[str, str]] = None
    prompt_tokens: Optional[int] = None
    output_tokens: Optional[int] = None
    #: Seconds from submission to answer (for a batch, the batch time).
    latency_s: Optional[float] = None
    finish_reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


def error_response(key: str, kind: str, message: str, **kw: Any) -> Response:
    return Response(key=key, error={"kind": kind, "message": message}, **kw)


class Engine(abc.ABC):
    """Base class of all engines."""

    #: Registry name (``transformers``, ``vllm``, ``openai``, ``fake``).
    name: str = "engine"
    #: Capabilities the run reads from the class, without building an engine:
    #: the engine loads ``model.path`` itself (so the run resolves the model before any stage starts);
    needs_model_path: ClassVar[bool] = True
    #: in a sweep, each job's caption stage runs in its own process (``executor=isolated``) by
    #: default, because the engine does not hand its (GPU) memory back inside one process.
    isolate_in_sweeps: ClassVar[bool] = False

    #: Modules the engine imports when it is built, and the extra of the
    #: ``regioncap`` package that installs them (``pip install "regioncap[EXTRA]"``);
    #: checked before any work by :func:`regioncap.engines.check_requirements`.
    requires: ClassVar[Tuple[str, ...]] = ()
    extra: ClassVar[Optional[str]] = None

    @classmethod
    def cpu_bound(cls, engine_cfg: Any) -> bool:
        """Whether the engine computes on this machine's CPU cores (then few preparation workers help)."""
        return False

    @abc.abstractmethod
    def generate(self, requests: Sequence[Request]) -> List[Response]:
        """Answer ``requests``; one response per request, in the same order."""

    def close(self) -> None:
        """Release the model / connections. Safe to call twice."""

    def describe(self) -> Dict[str, Any]:
        """What was built, for the log and the run manifest."""
        return {"engine": self.name}

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
