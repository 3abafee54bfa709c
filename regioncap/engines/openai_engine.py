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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

from regioncap.components import check, real, whole
from regioncap.engines.base import Engine, EngineError, EngineInfo, Request, Response, error_response, make_response

if TYPE_CHECKING:
    from regioncap.families.base import Family

log = logging.getLogger(__name__)

#: The HTTP client libraries log one INFO line per request; a run sends thousands.
QUIET_LOGGERS = ("httpx", "httpcore", "httpx2", "httpcore2", "openai")

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


# ------------------------------------------------------------ per-request deadline
#: The wall-clock deadline (``time.monotonic()``) of the HTTP call made by this thread, or None.
_deadline = threading.local()


def _remaining(timeout: Optional[float], expired: type) -> Optional[float]:
    """The socket timeout for the next network operation: the library's own
    per-operation ``timeout``, cut to what is left of this thread's deadline.
    Raises ``expired`` (the HTTP core library's ``ReadTimeout``) once it has passed."""
    end = getattr(_deadline, "end", None)
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise expired("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream:
    """An httpcore network stream whose every read, write and TLS handshake waits
    at most until the calling thread's deadline (see :func:`_remaining`)."""

    def __init__(self, stream: Any, expired: type) -> None:
        self._stream = stream
        self._expired = expired

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        return self._stream.read(max_bytes, _remaining(timeout, self._expired))

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        self._stream.write(buffer, _remaining(timeout, self._expired))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: Optional[str] = None,
                  timeout: Optional[float] = None) -> "_DeadlineStream":
        stream = self._stream.start_tls(ssl_context, server_hostname, _remaining(timeout, self._expired))
        return _DeadlineStream(stream, self._expired)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend:
    """httpcore's network backend with :class:`_DeadlineStream` connections.

    httpx's timeouts bound each socket operation, not the request: a server
    that sends one byte a second never trips a 3 s read timeout. Bounding every
    operation by what is left of the deadline makes ``timeout_s`` a deadline
    for the whole HTTP exchange (connect, headers, body)."""

    def __init__(self, backend: Any, expired: type) -> None:
        self._backend = backend
        self._expired = expired

    def connect_tcp(self, host: str, port: int, timeout: Optional[float] = None, local_address: Optional[str] = None,
                    socket_options: Any = None) -> _DeadlineStream:
        stream = self._backend.connect_tcp(host, port, _remaining(timeout, self._expired), local_address, socket_options)
        return _DeadlineStream(stream, self._expired)

    def connect_unix_socket(self, path: str, timeout: Optional[float] = None, socket_options: Any = None) -> Any:
        stream = self._backend.connect_unix_socket(path, _remaining(timeout, self._expired), socket_options)
        return _DeadlineStream(stream, self._expired)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _http_client(openai: Any, timeout_s: float) -> Any:
    """The openai package's own default HTTP client, its connections bounded by the
    calling thread's deadline (whichever httpx/httpcore flavour the package uses)."""
    import importlib

    client = openai.DefaultHttpxClient(timeout=timeout_s)
    pool = getattr(getattr(client, "_transport", None), "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    expired = None
    if backend is not None:
        core = importlib.import_module(type(backend).__module__.split(".")[0])
        expired = getattr(core, "ReadTimeout", None)
    if expired is None:  # a client without that layout: per-operation timeouts only
        log.warning("openai %s: engine.timeout_s bounds each socket read, not the whole request",
                    getattr(openai, "__version__", "?"))
        return client
    pool._network_backend = _DeadlineBackend(backend, expired)
    return client


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

    @dataclass
    class Config(Engine.Config):
        batch_size: int = field(default=64, metadata=check(whole(1)))
        base_url: str = "http://127.0.0.1:8000/v1"
        #: Name of the environment variable holding the API key (the key itself is
        #: never part of the config, so it never reaches an output file).
        api_key_env: str = "OPENAI_API_KEY"
        #: Model name sent to the server; defaults to ``model.path``.
        served_model: Optional[str] = None
        concurrency: int = field(default=8, metadata=check(whole(1)))
        timeout_s: float = field(default=120.0, metadata=check(real(0, above=True)))
        max_retries: int = field(default=5, metadata=check(whole(0)))
        backoff_s: float = field(default=1.0, metadata=check(real(0)))
        max_backoff_s: float = field(default=30.0, metadata=check(real(0)))
        #: Send vLLM's structured-output constraint in ``extra_body`` (vLLM servers only).
        structured_outputs: bool = False
        #: Check the server when the engine starts: ``GET {base_url}/models`` answers
        #: and lists ``served_model`` (a clear error before the first row, not after).
        preflight: bool = True

    name = "openai"
    needs_model_path = False
    requires = ("openai",)
    extra = "openai"

    def __init__(self, model_cfg: Family.Config, engine_cfg: OpenAIEngine.Config, model_path: Optional[str] = None) -> None:
        try:
            import openai
        except ImportError as e:
            raise EngineError(f"engine=openai needs the openai package ({e}): pip install 'openai>=1.40'") from e

        self._openai = openai
        self.model_cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.base_url = engine_cfg.base_url
        self.model = str(engine_cfg.served_model or model_cfg.path)
        self.concurrency = max(1, engine_cfg.concurrency)
        self.timeout_s = engine_cfg.timeout_s
        self.max_retries = max(0, engine_cfg.max_retries)
        self.backoff_s = max(0.0, engine_cfg.backoff_s)
        self.max_backoff_s = max(0.0, engine_cfg.max_backoff_s)
        self.structured_outputs = engine_cfg.structured_outputs
        self.api_key_env = engine_cfg.api_key_env
        key = os.environ.get(self.api_key_env) or ""
        self._key_set = bool(key)
        # Kept only to scrub it out of messages; never stored in anything described.
        self._secret = key
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=key or NO_KEY,
            timeout=self.timeout_s,
            max_retries=0,
            http_client=_http_client(openai, self.timeout_s),
        )
        #: Whether the server has answered anything yet (a completion or an HTTP error).
        self._contact = False
        self._pool: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="regioncap-openai"
        )
        self._lock = threading.Lock()
        # The run logs describe() as its one engine line; this one is for debugging.
        log.debug(
            "openai engine: %s model=%s concurrency=%d timeout=%.0fs retries=%d key from $%s (%s)",
            _redact_url(self.base_url), self.model, self.concurrency, self.timeout_s,
            self.max_retries, self.api_key_env, "set" if self._key_set else "unset, sending EMPTY",
        )
        if engine_cfg.preflight:
            try:
                self.check()
            except BaseException:
                self.close()
                raise

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
        if out and not self._contact and all((r.error or {}).get("kind") == "connection_error" for r in out):
            # Nothing ever reached the server: every further row would wait out its
            # retries the same way. One clear error instead of a file of error rows.
            raise EngineError(
                f"cannot connect to the server at {_redact_url(self.base_url)}: all {len(out)} requests of the "
                f"first batch failed ({out[0].error['message']}). Is the server running there? "
                "(engine.base_url sets the address)")
        return out

    def check(self) -> None:
        """Preflight: ``GET {base_url}/models`` answers and lists the served model.

        Raises :class:`EngineError` naming ``base_url`` (and the models the
        server does serve) when the server cannot be reached, refuses the key,
        or does not serve ``engine.served_model``. A server without a models
        endpoint (404/405) only gets a warning: the first request will tell.
        """
        oa = self._openai
        where = _redact_url(self.base_url)
        _deadline.end = time.monotonic() + min(self.timeout_s, 30.0)
        try:
            page = self._client.models.list()
            served = [str(getattr(m, "id", m)) for m in getattr(page, "data", None) or []]
        except oa.APIStatusError as e:
            code = int(e.status_code)
            if code in (404, 405, 501):
                log.warning("%s/models answered HTTP %d: cannot check that it serves %r", where, code, self.model)
                self._contact = True
                return
            raise EngineError(self._scrub(f"the server at {where} refused GET /models with HTTP {code}: {e}"
                                          + (f" (is ${self.api_key_env} the right key?)" if code in (401, 403) else ""))
                              ) from None
        except oa.APITimeoutError:
            raise EngineError(f"the server at {where} did not answer GET /models within "
                              f"{min(self.timeout_s, 30.0):g} s") from None
        except oa.APIConnectionError as e:
            cause = e.__cause__ or e.__context__
            detail = f"{type(cause).__name__}: {cause}" if cause else str(e)
            raise EngineError(self._scrub(f"cannot connect to the server at {where} ({detail}). Is it running? "
                                          "(engine.base_url sets the address)")) from None
        except Exception as e:  # a body that is not a model list
            raise EngineError(self._scrub(f"the server at {where} gave an unreadable answer to GET /models: "
                                          f"{type(e).__name__}: {e}")) from None
        finally:
            _deadline.end = None
        self._contact = True
        if self.model not in served:
            shown = ", ".join(served[:20]) + (f" (+{len(served) - 20} more)" if len(served) > 20 else "")
            raise EngineError(f"the server at {where} does not serve model {self.model!r}; it serves: "
                              f"{shown or 'no models'} (set engine.served_model to one of them)")

    @classmethod
    def preflight(cls, engine_cfg: OpenAIEngine.Config, model_cfg: Family.Config) -> None:
        """Build the engine, :meth:`check` the server, close it: for a run to call before its first row."""
        if not engine_cfg.preflight:
            return
        with cls(model_cfg=model_cfg, engine_cfg=engine_cfg, model_path=None):
            pass

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
        from regioncap.manifest import redact_string

        return EngineInfo(
            engine=self.name,
            base_url=redact_string(_redact_url(self.base_url)),
            model=self.model,
            concurrency=self.concurrency,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            api_key_env=self.api_key_env,
            api_key_set=self._key_set,
            backoff_s=self.backoff_s,
            max_backoff_s=self.max_backoff_s,
            structured_outputs=self.structured_outputs,
            openai_version=getattr(self._openai, "__version__", None),
        )

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
        _deadline.end = time.monotonic() + self.timeout_s
        try:
            completion = self._client.chat.completions.create(**kw)
        except oa.APIStatusError as e:
            self._contact = True
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
        except (oa.APIResponseValidationError, ValueError, RecursionError) as e:
            # A 200 whose body is not a chat completion (truncated, HTML from a proxy, a
            # 5000-digit number, JSON nested past the parser's recursion limit...).
            raise _Failure("bad_response", self._scrub(f"{type(e).__name__}: {e}"), True) from None
        finally:
            _deadline.end = None
        self._contact = True
        choices = getattr(completion, "choices", None)
        if not choices:
            raise _Failure("bad_response", self._scrub(f"no choices in the answer: {str(completion)[:200]}"), True)
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        if not isinstance(text, (str, bytes)):
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
                # Before the server has answered anything, a refused connection is not
                # a hiccup to wait out: fail at once (generate then stops the run).
                first_contact = f.kind == "connection_error" and not self._contact
                if not f.retry or attempt >= self.max_retries or first_contact:
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
            # Raw values from the server: make_response validates them into typed ones.
            return make_response(
                req.key,
                text=text,
                prompt_tokens=getattr(usage, "prompt_tokens", None),
                output_tokens=getattr(usage, "completion_tokens", None),
                finish_reason=getattr(completion.choices[0], "finish_reason", None),
                # From the first attempt to the answer, retries and waits included.
                latency_s=time.monotonic() - start,
            )
