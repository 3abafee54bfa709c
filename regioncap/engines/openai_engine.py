"""Engine for any OpenAI-compatible chat completions server (``vllm serve``, hosted APIs).

Why the ``openai`` client and not raw httpx: it is the reference implementation
of the protocol (auth headers, base-URL handling, typed ``usage``), hosted
providers test against it, and ``extra_body`` passes vLLM-only fields through
untouched. Its own retry loop is switched off (``max_retries=0``): retries,
backoff and the error kinds of a failed request are decided here, in one
place, so they are the same whatever the client version does.

Each request is one chat completion; at most ``engine.concurrency`` are in
flight (a thread pool: the client is synchronous and thread-safe), and the
responses come back in request order. A request that fails becomes an error
row; ``generate`` itself never raises for a request's failure.

The API key is read from the environment variable named by
``engine.api_key_env`` and is never logged, described, or put into an error
message (messages are scrubbed of it as a second line of defence).
"""

from __future__ import annotations

import base64
import email.utils
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

from regioncap.engines.base import Engine, EngineError, Request, Response, error_response

log = logging.getLogger(__name__)

#: Used when the key variable is unset: local servers (``vllm serve``) accept any key.
NO_KEY = "EMPTY"

#: Leading bytes of the image formats a chat API accepts -> MIME type.
_MAGIC: Tuple[Tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)

#: HTTP statuses worth another try: rate limit, request timeout, server errors.
_RETRY_STATUSES = {408, 429}


def sniff_mime(data: bytes) -> Optional[str]:
    """MIME type of an image from its first bytes (``None`` when unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    return None


def image_data_url(path: str) -> str:
    """The file's bytes as a ``data:`` URL (no re-encode: the server sees exactly the file)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("file is empty")
    mime = sniff_mime(data)
    if mime is None:
        raise ValueError("not a JPEG, PNG, WebP, GIF or BMP file (unknown leading bytes)")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def parse_retry_after(headers: Any) -> Optional[float]:
    """Seconds to wait from ``Retry-After`` (seconds or HTTP date) or ``retry-after-ms``."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
    except (TypeError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _redact_url(url: str) -> str:
    """Drop ``user:password@`` from a URL before it is logged or described."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class _Failure(Exception):
    """One failed attempt: its error kind, message, whether to retry, and the server's wait hint."""

    def __init__(self, kind: str, message: str, retry: bool, retry_after: Optional[float] = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry = retry
        self.retry_after = retry_after


class OpenAIEngine(Engine):
    """Chat completions against an OpenAI-compatible server, ``concurrency`` at a time."""

    name = "openai"
    needs_model_path = False
    requires = ("openai",)
    extra = "openai"

    def __init__(self, model_cfg: Any, engine_cfg: Any, model_path: Optional[str] = None) -> None:
        try:
            import openai
        except ImportError as e:
            raise EngineError(f"engine=openai needs the openai package ({e}): pip install 'openai>=1.40'") from e

        self._openai = openai
        self.model_cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.base_url = str(engine_cfg.base_url)
        self.model = str(engine_cfg.served_model or model_cfg.path)
        self.concurrency = max(1, int(engine_cfg.concurrency))
        self.timeout_s = float(engine_cfg.timeout_s)
        self.max_retries = max(0, int(engine_cfg.max_retries))
        self.backoff_s = max(0.0, float(engine_cfg.backoff_s))
        self.max_backoff_s = max(0.0, float(engine_cfg.max_backoff_s))
        self.structured_outputs = bool(engine_cfg.structured_outputs)
        self.api_key_env = str(engine_cfg.api_key_env)
        key = os.environ.get(self.api_key_env) or ""
        self._key_set = bool(key)
        # Kept only to scrub it out of messages; never stored in anything described.
        self._secret = key
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=key or NO_KEY,
            timeout=self.timeout_s,
            max_retries=0,
        )
        self._pool: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="regioncap-openai"
        )
        self._lock = threading.Lock()
        log.info(
            "openai engine: %s model=%s concurrency=%d timeout=%.0fs retries=%d key from $%s (%s)",
            _redact_url(self.base_url), self.model, self.concurrency, self.timeout_s,
            self.max_retries, self.api_key_env, "set" if self._key_set else "unset, sending EMPTY",
        )

    # ------------------------------------------------------------------ public

    def generate(self, requests: Sequence[Request]) -> List[Response]:
        """One chat completion per request, at most ``concurrency`` in flight, results in order."""
        with self._lock:
            pool = self._pool
        if pool is None:
            raise EngineError("the openai engine was closed")
        futures = [pool.submit(self._one, r) for r in requests]
        out: List[Response] = []
        for req, fut in zip(requests, futures):
            try:
                out.append(fut.result())
            except Exception as e:  # a bug in _one must still cost only its own row
                out.append(error_response(req.key, "engine_error", self._scrub(f"{type(e).__name__}: {e}")))
        return out

    def close(self) -> None:
        """Stop the worker threads and close the HTTP connections. Safe to call twice."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.shutdown(wait=True)
        try:
            self._client.close()
        except Exception:  # closing is best effort
            log.debug("closing the openai client failed", exc_info=True)

    def describe(self) -> Dict[str, Any]:
        """Settings for the run manifest: the key's variable name, never its value."""
        return {
            "engine": self.name,
            "openai_version": getattr(self._openai, "__version__", None),
            "base_url": _redact_url(self.base_url),
            "model": self.model,
            "api_key_env": self.api_key_env,
            "api_key_set": self._key_set,
            "concurrency": self.concurrency,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "backoff_s": self.backoff_s,
            "max_backoff_s": self.max_backoff_s,
            "structured_outputs": self.structured_outputs,
        }

    # ------------------------------------------------------------- internals

    def _scrub(self, text: str) -> str:
        if self._secret and self._secret in text:
            text = text.replace(self._secret, "***")
        return text

    def _payload(self, req: Request) -> Dict[str, Any]:
        """Keyword arguments of ``chat.completions.create`` for one request."""
        messages: List[Dict[str, Any]] = []
        if req.system:
            messages.append({"role": "system", "content": req.system})
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(req.image_path)}},
                    {"type": "text", "text": req.prompt},
                ],
            }
        )
        s = req.sampling
        kw: Dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        }
        if s.seed is not None:
            kw["seed"] = int(s.seed)
        if self.structured_outputs and (req.regex or req.json_schema):
            # vLLM >= 0.10 reads `structured_outputs` (the old `guided_regex` /
            # `guided_json` fields are gone in 0.32); other servers ignore it.
            so = {"regex": req.regex} if req.regex else {"json": req.json_schema}
            kw["extra_body"] = {"structured_outputs": so}
        return kw

    def _attempt(self, kw: Dict[str, Any]) -> Tuple[str, Any]:
        """One HTTP call; returns (text, completion) or raises :class:`_Failure`."""
        oa = self._openai
        try:
            completion = self._client.chat.completions.create(**kw)
        except oa.APIStatusError as e:
            code = int(e.status_code)
            retry = code in _RETRY_STATUSES or code >= 500
            after = parse_retry_after(getattr(e.response, "headers", None)) if retry else None
            raise _Failure(f"http_{code}", self._scrub(str(e)), retry, after) from None
        except oa.APITimeoutError:
            raise _Failure("timeout", f"no answer within {self.timeout_s:g} s", True) from None
        except oa.APIConnectionError as e:
            cause = e.__cause__ or e.__context__
            detail = f"{type(cause).__name__}: {cause}" if cause else str(e)
            raise _Failure("connection_error", self._scrub(f"{_redact_url(self.base_url)}: {detail}"), True) from None
        except (oa.APIResponseValidationError, ValueError) as e:
            # A 200 whose body is not a chat completion (truncated, HTML from a proxy...).
            raise _Failure("bad_response", self._scrub(f"{type(e).__name__}: {e}"), True) from None
        choices = getattr(completion, "choices", None)
        if not choices:
            raise _Failure("bad_response", self._scrub(f"no choices in the answer: {str(completion)[:200]}"), True)
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        if not isinstance(text, str):
            reason = getattr(choices[0], "finish_reason", None)
            raise _Failure("bad_response", f"answer has no text content (finish_reason={reason!r})", False)
        return text, completion

    def _delay(self, attempt: int, failure: _Failure) -> float:
        """Exponential backoff with jitter; the server's Retry-After wins (capped at ``max_backoff_s``)."""
        if failure.retry_after is not None:
            return min(failure.retry_after, self.max_backoff_s)
        ceiling = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
        # "Equal jitter": at least half the step, so retries never bunch up at 0.
        return ceiling / 2 + random.uniform(0.0, ceiling / 2)

    def _one(self, req: Request) -> Response:
        """Answer one request with retries; never raises."""
        try:
            kw = self._payload(req)
        except (OSError, ValueError) as e:
            return error_response(req.key, "image_error", f"cannot read image {req.image_path}: {e}")
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                text, completion = self._attempt(kw)
            except _Failure as f:
                if not f.retry or attempt >= self.max_retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    return error_response(
                        req.key, f.kind, f"{f.message}{tries}", latency_s=time.monotonic() - start
                    )
                delay = self._delay(attempt, f)
                log.debug("request %s: %s, retry %d in %.2fs", req.key, f.kind, attempt + 1, delay)
                time.sleep(delay)
                attempt += 1
                continue
            usage = getattr(completion, "usage", None)
            return Response(
                key=req.key,
                text=text,
                prompt_tokens=getattr(usage, "prompt_tokens", None),
                output_tokens=getattr(usage, "completion_tokens", None),
                finish_reason=completion.choices[0].finish_reason,
                # From the first attempt to the answer, retries and waits included.
                latency_s=time.monotonic() - start,
            )
