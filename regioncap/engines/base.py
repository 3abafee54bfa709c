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
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Mapping, Optional, Sequence

from regioncap.components import SEEDS, Component, check, optional, real, whole
from regioncap.errors import RunError

if TYPE_CHECKING:
    from regioncap.families.base import Family


class EngineError(RunError):
    """The engine as a whole cannot go on (bad model path, server unreachable...).

    A :class:`~regioncap.errors.RunError`: wherever it surfaces (engine start,
    a batch), the job reports it as one line and exits non-zero."""


@dataclass
class Sampling:
    """How a request is decoded; also the schema of the config's ``sampling`` section."""

    temperature: float = field(default=0.0, metadata=check(real(0)))
    top_p: float = field(default=1.0, metadata=check(real(0, 1, above=True)))
    #: Most tokens of one answer.
    max_tokens: int = field(default=512, metadata=check(whole(1)))
    #: Per-request sampling seed; in the config, ``null`` uses the run's ``seed``.
    seed: Optional[int] = field(default=None, metadata=check(optional(SEEDS)))


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


#: Largest token count kept (int64); anything above is not a count, it is junk.
MAX_COUNT = 2**63 - 1
#: Longest ``finish_reason`` / error kind kept (they are short words).
_MAX_WORD = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
_DIGITS = re.compile(r"\+?[0-9]{1,19}")


def clean_text(value: str) -> str:
    """``value`` with each lone surrogate replaced by U+FFFD (a str that can be UTF-8 encoded)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", value)
    return value


def as_count(value: Any) -> Optional[int]:
    """A token count as an ``int >= 0``, or None for anything that is not one.

    Ints and integral finite floats are kept; a string of digits (``"12"``, as
    some servers send) is read; negative, huge, fractional, boolean and any
    other value give None. Never raises.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_COUNT else None
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and 0 <= value <= MAX_COUNT:
            return int(value)
        return None
    if isinstance(value, (str, bytes)):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        text = text.strip()
        if len(text) <= 20 and _DIGITS.fullmatch(text):
            n = int(text)
            return n if n <= MAX_COUNT else None
    return None


def as_seconds(value: Any) -> Optional[float]:
    """A duration as a finite ``float >= 0``, or None. Never raises."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except (OverflowError, ValueError):
        return None
    return f if math.isfinite(f) and f >= 0 else None


def as_word(value: Any) -> Optional[str]:
    """A short label (``finish_reason``) as a clean str, or None when it is not a str."""
    if not isinstance(value, str):
        return None
    return clean_text(value[:_MAX_WORD])


def _as_error(value: Any) -> Optional[Dict[str, str]]:
    if value is None:
        return None
    if isinstance(value, Mapping):
        kind, message = value.get("kind"), value.get("message")
    else:
        kind, message = None, value
    kind = as_word(kind) or "engine_error"
    if not isinstance(message, str):
        message = f"(an error of type {type(message).__name__})"
    return {"kind": kind, "message": clean_text(message)}


def validate_answer(
    *,
    text: Any = None,
    error: Any = None,
    prompt_tokens: Any = None,
    output_tokens: Any = None,
    latency_s: Any = None,
    finish_reason: Any = None,
) -> Dict[str, Any]:
    """The one place an engine's answer becomes typed values; never raises.

    ``text``: a str (lone surrogates replaced by U+FFFD; bytes decoded as
    UTF-8) or None; any other value is not an answer and becomes a
    ``bad_response`` error. ``error``: ``{"kind": str, "message": str}`` or
    None. Token counts: ``int >= 0`` or None (see :func:`as_count`).
    ``latency_s``: finite ``float >= 0`` or None. ``finish_reason``: str or None.
    """
    err = _as_error(error)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if isinstance(text, str):
        text = clean_text(text)
    elif text is not None:
        if err is None:
            err = {"kind": "bad_response", "message": f"answer text is a {type(text).__name__}, not a string"}
        text = None
    return {
        "text": text,
        "error": err,
        "prompt_tokens": as_count(prompt_tokens),
        "output_tokens": as_count(output_tokens),
        "latency_s": as_seconds(latency_s),
        "finish_reason": as_word(finish_reason),
    }


@dataclass
class Response:
    """One engine answer. Every field is checked on construction by
    :func:`validate_answer`, so whatever an engine passes in, what the pipeline
    reads is typed: ``text`` a str or None, counts ``int >= 0`` or None..."""

    key: str
    text: Optional[str] = None
    #: ``{"kind": ..., "message": ...}`` when the request failed.
    error: Optional[Dict[str, str]] = None
    prompt_tokens: Optional[int] = None
    output_tokens: Optional[int] = None
    #: Seconds from submission to answer (for a batch, the batch time).
    latency_s: Optional[float] = None
    finish_reason: Optional[str] = None

    def __post_init__(self) -> None:
        self.key = clean_text(self.key) if isinstance(self.key, str) else str(self.key)
        for name, value in validate_answer(
            text=self.text, error=self.error, prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens, latency_s=self.latency_s, finish_reason=self.finish_reason,
        ).items():
            setattr(self, name, value)

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


def make_response(key: str, **answer: Any) -> Response:
    """Build a :class:`Response` from raw answer values (what a server or model gave),
    through :func:`validate_answer`. Engines call this (or ``error_response``)."""
    return Response(key=key, **validate_answer(**answer))


def error_response(key: str, kind: str, message: str, **kw: Any) -> Response:
    return make_response(key, error={"kind": kind, "message": message}, **kw)


#: Error kinds of a failed request that the same request meets again: the request itself is what
#: is wrong (a prompt over the model's context, a request the engine refuses), not the engine.
REQUEST_FAULT_KINDS = frozenset({"too_long", "invalid_request"})


def retryable_answer(kind: Optional[str]) -> bool:
    """Whether a request that failed with error ``kind`` may pass another time (``error.retryable``
    of its row): an engine or server failure, a timeout, a file read; not a fault of the request."""
    return kind not in REQUEST_FAULT_KINDS


class EngineInfo(dict):
    """What ``Engine.describe()`` returns: a plain dict (for the manifest) that
    prints as one readable line: ``openai base_url=... model=... concurrency=8``."""

    def __str__(self) -> str:
        parts = [str(self.get("engine", "engine"))]
        for k, v in self.items():
            if k == "engine" or v is None or isinstance(v, (dict, list, tuple)):
                continue
            if isinstance(v, str) and any(c.isspace() for c in v):
                continue  # sentences belong in the manifest, not in the one-line summary
            parts.append(f"{k}={v}")
        return " ".join(parts)


class Engine(Component, abc.ABC):
    """Base class of all engines; a subclass is named in ``conf/engine/*.yaml`` by ``_target_``."""

    @dataclass
    class Config(Component.Config):
        """Settings every engine has; an engine's own ``Config`` derives from this one."""

        #: Requests handed to the engine at once (a vLLM ``generate`` call, a
        #: transformers batch, the in-flight window of the OpenAI client).
        batch_size: int = field(default=8, metadata=check(whole(1)))
        #: With ``executor=local``: true runs the caption stage in a spawned child
        #: process (``executor=isolated``), false in this one; null: isolated for an
        #: engine that keeps its memory until its process ends (vLLM) in each job of a
        #: sweep, else local.
        isolate: Optional[bool] = None

    #: Short name (``transformers``, ``vllm``, ``openai``, ``fake``), also in ``describe()``.
    name: ClassVar[str] = "engine"
    #: Capabilities the run reads from the class, without building an engine:
    #: the engine loads ``model.path`` itself (so the run resolves the model before any stage starts);
    needs_model_path: ClassVar[bool] = True
    #: in a sweep, each job's caption stage runs in its own process (``executor=isolated``) by
    #: default, because the engine does not hand its (GPU) memory back inside one process.
    isolate_in_sweeps: ClassVar[bool] = False
    #: how the run's ``threads`` reach the engine (:func:`regioncap.cpus.apply_engine_threads`):
    #: ``torch`` (torch's pools in this process), ``vllm`` (vLLM's CPU OpenMP binding, and torch's
    #: pools), None (no torch in this process: a server's client, the fake engine).
    cpu_threads: ClassVar[Optional[str]] = None

    #: ``requires`` / ``extra`` (see :class:`~regioncap.components.Component`) are
    #: checked before any work by :func:`regioncap.requirements.check_requirements`.

    @classmethod
    def preflight(cls, engine_cfg: Engine.Config, model_cfg: Family.Config) -> None:
        """Check before the first row what can be checked without loading a model (a server answers);
        raise :class:`EngineError` naming the cause. Nothing to check by default."""

    @classmethod
    def cpu_bound(cls, engine_cfg: Engine.Config) -> bool:
        """Whether the engine computes on this machine's CPU cores (then few preparation workers help)."""
        return False

    @abc.abstractmethod
    def generate(self, requests: Sequence[Request]) -> List[Response]:
        """Answer ``requests``; one response per request, in the same order."""

    def close(self) -> None:
        """Release the model / connections. Safe to call twice."""

    def describe(self) -> Dict[str, Any]:
        """What was built, for the log and the run manifest (an :class:`EngineInfo`:
        a dict that prints as one line)."""
        return EngineInfo(engine=self.name)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
