"""OpenAIEngine: fault injection against a small real HTTP server, and the real vLLM server.

The fault-injection tests (unmarked, a few seconds) run an ``http.server`` on
127.0.0.1 in a thread whose behaviour is picked by the request's prompt text
(``429-once``, ``hang``, ``drop``...), so retries, backoff, error kinds and
request order are checked over real sockets without vLLM. The tests marked
``vllm`` talk to ``python -m vllm.entrypoints.openai.api_server`` serving the
tiny model (see ``tests/vllm_helpers.py``).
"""

from __future__ import annotations

import base64
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))


from regioncap.families.qwen import Qwen25VL  # noqa: E402
from regioncap.engines.base import Request, Sampling  # noqa: E402
from regioncap.engines.openai_engine import OpenAIEngine  # noqa: E402

SECRET = "sk-regioncap-planted-secret-0123456789"
KEY_ENV = "REGIONCAP_TEST_OPENAI_KEY"


# --------------------------------------------------------------- fake server


@dataclass
class ServerState:
    """What the fault server saw; behaviour is keyed by the prompt text."""

    hits: Dict[str, int] = field(default_factory=dict)
    bodies: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    auth: List[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    #: What ``GET /v1/models`` lists.
    models: List[str] = field(default_factory=lambda: ["tiny", "org/model"])


def _completion(text: str, prompt_tokens: int = 11, completion_tokens: int = 3) -> bytes:
    return json.dumps(
        {
            "id": "cmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": "tiny",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    ).encode()


def make_handler(state: ServerState) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, code: int, body: bytes, headers: Optional[Dict[str, str]] = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass

        def do_GET(self) -> None:  # noqa: N802 - the models list the engine's preflight reads
            if self.path.rstrip("/").endswith("/models"):
                models = [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in state.models]
                self._send(200, json.dumps({"object": "list", "data": models}).encode())
            else:
                self._send(404, b'{"error": {"message": "not found"}}')

        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = body["messages"][-1]["content"]
            prompt = next(p["text"] for p in user if p["type"] == "text")
            url = next(p["image_url"]["url"] for p in user if p["type"] == "image_url")
            with state.lock:
                n = state.hits.get(prompt, 0) + 1
                state.hits[prompt] = n
                state.bodies[prompt] = body
                state.auth.append(self.headers.get("Authorization", ""))
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                self._behave(prompt, n, url, body)
            finally:
                with state.lock:
                    state.in_flight -= 1

        def _behave(self, prompt: str, n: int, url: str, body: Dict[str, Any]) -> None:
            mode = prompt.split("#")[0]
            if mode == "ok":
                mime, b64 = url[len("data:"):].split(";base64,")
                size = len(base64.b64decode(b64))
                self._send(200, _completion(f"{prompt}|{mime}|{size}"))
            elif mode == "slow":
                state.stop.wait(0.15)
                self._send(200, _completion(prompt))
            elif mode == "429-once" and n == 1:
                self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0.3"})
            elif mode == "500-once" and n == 1:
                self._send(500, b'{"error": {"message": "boom"}}')
            elif mode == "500":
                self._send(500, b'{"error": {"message": "boom"}}')
            elif mode == "400":
                self._send(400, b'{"error": {"message": "context too long"}}')
            elif mode == "400-echo-auth":
                msg = json.dumps({"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
                self._send(400, msg.encode())
            elif mode == "hang":
                state.stop.wait(5.0)
                self._send(200, _completion(prompt))
            elif mode in ("drip", "drip-head"):
                # One byte every 0.2 s (bounded: 60 bytes, or until the test ends): every
                # read succeeds well within any per-read timeout, the whole never ends in time.
                body = _completion(prompt)
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
                data = head + body
                if mode == "drip":
                    self.wfile.write(head[:-1])
                    self.wfile.flush()
                    data = head[-1:] + body
                for b in data[:60]:
                    if state.stop.wait(0.2):
                        break
                    try:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                    except OSError:
                        break
                self.close_connection = True
            elif mode == "malformed":
                # A 200 whose answer is typed wrong everywhere a server can get it wrong.
                doc = json.loads(_completion("x"))
                doc["choices"][0]["message"]["content"] = "caption \udc80 with a lone surrogate"
                doc["choices"][0]["finish_reason"] = 7
                doc["usage"] = {"prompt_tokens": "12", "completion_tokens": "lots", "total_tokens": [1]}
                self._send(200, json.dumps(doc).encode())
            elif mode == "malformed-usage":
                doc = json.loads(_completion("y"))
                doc["usage"] = "not an object"
                doc["choices"][0]["message"]["content"] = "\ud800"
                self._send(200, json.dumps(doc).encode())
            elif mode == "deepjson":  # an answer nested 100,000 deep: the JSON parser's recursion limit
                body = _completion("d")
                self._send(200, body[:-1] + b', "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
            elif mode == "hugecount":
                self._send(200, _completion("z").replace(b'"prompt_tokens": 11', b'"prompt_tokens": ' + b"9" * 5000))
            elif mode == "badjson":
                self._send(200, b'{"choices": [ this is not json')
            elif mode in ("drop", "drop-once") and (mode == "drop" or n == 1):
                # Close the socket without a status line: the client sees a dropped connection.
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            else:
                self._send(200, _completion(prompt))

    return Handler


@pytest.fixture()
def fault_server() -> Iterator[tuple]:
    state = ServerState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        state.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    d = tmp_path_factory.mktemp("openai_images")
    jpg, png = d / "a.jpg", d / "b.png"
    Image.new("RGB", (112, 84), (200, 30, 30)).save(jpg, quality=90)
    Image.new("RGB", (56, 56), (30, 30, 200)).save(png)
    bad = d / "not_an_image.jpg"
    bad.write_bytes(b"hello, not an image")
    return {"jpg": str(jpg), "png": str(png), "bad": str(bad), "missing": str(d / "missing.jpg")}


def make_engine(base_url: str, monkeypatch: pytest.MonkeyPatch, **kw: Any):
    monkeypatch.setenv(KEY_ENV, SECRET)
    cfg = OpenAIEngine.Config(
        base_url=base_url,
        api_key_env=KEY_ENV,
        served_model=kw.pop("served_model", "tiny"),
        concurrency=kw.pop("concurrency", 4),
        timeout_s=kw.pop("timeout_s", 2.0),
        max_retries=kw.pop("max_retries", 2),
        backoff_s=kw.pop("backoff_s", 0.01),
        max_backoff_s=kw.pop("max_backoff_s", 0.5),
        **kw,
    )
    return OpenAIEngine(model_cfg=Qwen25VL.config(name="tiny", path="tiny"), engine_cfg=cfg, model_path=None)


def req(key: str, prompt: str, image: str, **kw: Any) -> Request:
    return Request(key=key, image_path=image, prompt=prompt, sampling=Sampling(max_tokens=8), **kw)


# ------------------------------------------------------------ fault injection


def test_retries_and_error_kinds(fault_server, images, monkeypatch):
    base_url, state = fault_server
    eng = make_engine(base_url, monkeypatch, timeout_s=0.4, max_retries=2)
    plan = [
        ("ok", "ok#1", None),
        ("429-once", "429-once#1", None),
        ("500-once", "500-once#1", None),
        ("drop-once", "drop-once#1", None),
        ("400", "400#1", "http_400"),
        ("500", "500#1", "http_500"),
        ("hang", "hang#1", "timeout"),
        ("badjson", "badjson#1", "bad_response"),
        ("drop", "drop#1", "connection_error"),
        ("ok2", "ok#2", None),
    ]
    t0 = time.monotonic()
    with eng:
        out = eng.generate([req(k, p, images["jpg"]) for k, p, _ in plan])
    elapsed = time.monotonic() - t0

    assert [r.key for r in out] == [k for k, _, _ in plan], "responses must keep request order"
    for (key, prompt, kind), r in zip(plan, out):
        if kind is None:
            assert r.ok, (key, r.error)
            assert r.text.startswith(prompt)
            assert (r.prompt_tokens, r.output_tokens, r.finish_reason) == (11, 3, "stop")
            assert r.latency_s is not None and r.latency_s >= 0
        else:
            assert not r.ok and r.error["kind"] == kind, (key, r.error)
            assert r.text is None
    # Each transient failure was retried exactly until it succeeded ...
    for p in ("429-once#1", "500-once#1", "drop-once#1"):
        assert state.hits[p] == 2, p
    # ... a 400 was not retried, and persistent failures used every retry.
    assert state.hits["400#1"] == 1
    for p in ("500#1", "hang#1", "badjson#1", "drop#1"):
        assert state.hits[p] == 3, p
    # Retry-After: 0.3 was honoured (jittered backoff alone would be ~0.01 s).
    assert out[1].latency_s >= 0.3
    assert "after 3 attempts" in out[5].error["message"]
    # Bounded: three 0.4 s timeouts plus tiny backoffs.
    assert elapsed < 8
    assert all(a == f"Bearer {SECRET}" for a in state.auth)


def test_ok_request_payload_and_mime(fault_server, images, monkeypatch):
    base_url, state = fault_server
    eng = make_engine(base_url, monkeypatch, structured_outputs=True)
    rx = r"1: [a-z ]{1,20}"
    schema = {"type": "object", "properties": {"regions": {"type": "array"}}}
    out = eng.generate(
        [
            Request(key="j", image_path=images["jpg"], prompt="ok#jpg", system="be brief",
                    sampling=Sampling(temperature=0.5, top_p=0.9, max_tokens=7, seed=3), regex=rx),
            req("p", "ok#png", images["png"], json_schema=schema),
            req("n", "ok#none", images["png"]),
        ]
    )
    eng.close()
    eng.close()  # safe twice
    assert all(r.ok for r in out), [r.error for r in out]
    jpg_size = Path(images["jpg"]).stat().st_size
    png_size = Path(images["png"]).stat().st_size
    # The file's bytes went out unchanged, with the MIME type of its content.
    assert out[0].text == f"ok#jpg|image/jpeg|{jpg_size}"
    assert out[1].text == f"ok#png|image/png|{png_size}"
    body = state.bodies["ok#jpg"]
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert [p["type"] for p in body["messages"][1]["content"]] == ["image_url", "text"]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.5, 0.9, 7, 3)
    assert body["model"] == "tiny"
    assert body["structured_outputs"] == {"regex": rx}
    assert state.bodies["ok#png"]["structured_outputs"] == {"json": schema}
    assert "structured_outputs" not in state.bodies["ok#none"]
    assert "seed" not in state.bodies["ok#none"]


def test_structured_outputs_off_sends_nothing(fault_server, images, monkeypatch):
    base_url, state = fault_server
    eng = make_engine(base_url, monkeypatch, structured_outputs=False)
    (r,) = eng.generate([req("a", "ok#so-off", images["jpg"], regex="x")])
    eng.close()
    assert r.ok
    assert "structured_outputs" not in state.bodies["ok#so-off"]


def test_image_errors_never_reach_the_server(fault_server, images, monkeypatch):
    base_url, state = fault_server
    eng = make_engine(base_url, monkeypatch)
    out = eng.generate(
        [req("m", "ok#m", images["missing"]), req("b", "ok#b", images["bad"]), req("g", "ok#g", images["jpg"])]
    )
    eng.close()
    assert [r.key for r in out] == ["m", "b", "g"]
    assert out[0].error["kind"] == "image_error" and "missing.jpg" in out[0].error["message"]
    assert out[1].error["kind"] == "image_error"
    assert out[2].ok
    assert set(state.hits) == {"ok#g"}


def test_concurrency_is_bounded(fault_server, images, monkeypatch):
    base_url, state = fault_server
    eng = make_engine(base_url, monkeypatch, concurrency=2)
    out = eng.generate([req(str(i), f"slow#{i}", images["jpg"]) for i in range(6)])
    eng.close()
    assert [r.text for r in out] == [f"slow#{i}" for i in range(6)]
    assert state.max_in_flight == 2


def test_api_key_never_leaks(fault_server, images, monkeypatch):
    base_url, state = fault_server
    eng = make_engine(base_url, monkeypatch)
    (r,) = eng.generate([req("k", "400-echo-auth#1", images["jpg"])])
    desc = eng.describe()
    eng.close()
    assert state.auth == [f"Bearer {SECRET}"]  # the key was sent ...
    assert r.error["kind"] == "http_400"
    assert SECRET not in json.dumps(r.error)  # ... but the echoed key is scrubbed
    assert "***" in r.error["message"]
    assert SECRET not in json.dumps(desc)
    assert desc["api_key_env"] == KEY_ENV and desc["api_key_set"] is True


def test_missing_key_sends_empty(fault_server, images, monkeypatch):
    base_url, state = fault_server

    monkeypatch.delenv("REGIONCAP_TEST_UNSET_KEY", raising=False)
    cfg = OpenAIEngine.Config(base_url=base_url, api_key_env="REGIONCAP_TEST_UNSET_KEY", max_retries=0)
    eng = OpenAIEngine(model_cfg=Qwen25VL.config(name="t", path="org/model"), engine_cfg=cfg, model_path=None)
    (r,) = eng.generate([req("a", "ok#nokey", images["png"])])
    eng.close()
    assert r.ok
    assert state.auth == ["Bearer EMPTY"]
    assert state.bodies["ok#nokey"]["model"] == "org/model"  # served_model defaults to model.path
    assert eng.describe()["api_key_set"] is False


def _dead_port() -> int:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_the_preflight(monkeypatch):
    from regioncap.engines.base import EngineError

    base_url = f"http://127.0.0.1:{_dead_port()}/v1"
    with pytest.raises(EngineError) as info:
        make_engine(base_url, monkeypatch)
    assert base_url in str(info.value) and "cannot connect" in str(info.value)
    assert SECRET not in str(info.value)


def test_unreachable_server_stops_after_the_first_batch(images, monkeypatch):
    """Without the preflight, a first batch that never reaches the server raises one
    EngineError naming base_url: no retries, no file of connection-error rows."""
    from regioncap.engines.base import EngineError
    from regioncap.errors import RunError

    base_url = f"http://127.0.0.1:{_dead_port()}/v1"
    eng = make_engine(base_url, monkeypatch, max_retries=5, backoff_s=1.0, preflight=False)
    t0 = time.monotonic()
    with pytest.raises(EngineError) as info:
        eng.generate([req(str(i), "ok", images["jpg"]) for i in range(3)])
    eng.close()
    # Five retries with 1 s backoff would take ~31 s; the first connection refusal ends it.
    assert time.monotonic() - t0 < 10
    assert isinstance(info.value, RunError)  # the job reports it as one line, exit 1
    assert base_url in str(info.value) and "all 3 requests" in str(info.value)
    assert SECRET not in str(info.value)


def test_preflight_names_the_models_the_server_serves(fault_server, monkeypatch):
    from regioncap.engines.base import EngineError

    base_url, _ = fault_server
    with pytest.raises(EngineError) as info:
        make_engine(base_url, monkeypatch, served_model="not-served")
    msg = str(info.value)
    assert base_url in msg and "'not-served'" in msg and "tiny" in msg and "org/model" in msg
    # What a run calls before its first row: passes for a served model, names the cause otherwise.
    from omegaconf import OmegaConf

    from regioncap.engines import preflight

    cfg = OpenAIEngine.Config(base_url=base_url, api_key_env=KEY_ENV, served_model="tiny")
    OpenAIEngine.preflight(cfg, Qwen25VL.config(name="tiny", path="tiny"))
    node = OmegaConf.create({**vars(cfg), "_target_": "regioncap.engines.openai_engine.OpenAIEngine"})
    preflight(node, Qwen25VL.config(name="tiny", path="tiny"))
    preflight({"_target_": "regioncap.engines.fake.FakeEngine"}, Qwen25VL.config(name="tiny", path="tiny"))  # nothing to check
    node.served_model = "other"
    with pytest.raises(EngineError, match="does not serve model 'other'"):
        preflight(node, Qwen25VL.config(name="tiny", path="tiny"))


@pytest.mark.parametrize("mode", ["drip", "drip-head"])
def test_timeout_is_a_deadline_for_a_slow_drip_server(fault_server, images, monkeypatch, mode):
    """A server sending one byte every 0.2 s never trips a per-read timeout; the
    deadline ends the request as a timeout error (it took 47 s for a 3 s timeout)."""
    base_url, state = fault_server
    eng = make_engine(base_url, monkeypatch, timeout_s=1.0, max_retries=0)
    t0 = time.monotonic()
    with eng:
        (r,) = eng.generate([req("slow", f"{mode}#1", images["jpg"])])
    elapsed = time.monotonic() - t0
    assert not r.ok and r.error["kind"] == "timeout", r.error
    assert state.hits[f"{mode}#1"] == 1
    assert elapsed < 4.0  # the drip alone lasts 60 x 0.2 = 12 s


def test_malformed_answers_become_typed_values(fault_server, images, monkeypatch):
    """Usage as strings or junk, a lone surrogate in the text, a 5000-digit count,
    a number as finish_reason: each answer is a response with typed fields."""
    base_url, _ = fault_server
    eng = make_engine(base_url, monkeypatch, max_retries=0)
    with eng:
        a, b, c, d, e = eng.generate([
            req("a", "malformed#1", images["jpg"]), req("b", "malformed-usage#1", images["jpg"]),
            req("c", "hugecount#1", images["jpg"]), req("d", "deepjson#1", images["jpg"]),
            req("e", "ok#after", images["jpg"])])
    assert a.ok and a.text == "caption \ufffd with a lone surrogate"
    a.text.encode("utf-8")
    assert (a.prompt_tokens, a.output_tokens, a.finish_reason) == (12, None, None)
    assert b.ok and b.text == "\ufffd" and (b.prompt_tokens, b.output_tokens) == (None, None)
    # A 5000-digit count (past Python's int-string limit) and JSON nested 100,000 deep
    # do not parse: each is that request's bad_response error, never a crash.
    assert c.error["kind"] == "bad_response" and "digits" in c.error["message"], c
    assert d.error["kind"] == "bad_response" and "Recursion" in d.error["message"], d
    assert e.ok  # and the engine goes on


def test_closed_engine_raises(fault_server, images, monkeypatch):
    from regioncap.engines.base import EngineError

    base_url, _ = fault_server
    eng = make_engine(base_url, monkeypatch)
    eng.close()
    with pytest.raises(EngineError, match="closed"):
        eng.generate([req("a", "ok#closed", images["jpg"])])


def test_retry_after_parsing():
    from regioncap.engines.openai_engine import parse_retry_after

    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


# ----------------------------------------------------------- real vLLM server


@pytest.mark.vllm
def test_against_vllm_server(vllm_server, tiny_images, monkeypatch):
    """Three real completions from ``vllm serve`` on the tiny model: order, tokens, no key leak."""
    base_url = vllm_server["base_url"]
    eng = make_engine(base_url, monkeypatch, served_model=vllm_server["served_model"],
                      timeout_s=60.0, max_retries=0)
    prompts = ["Describe region 1.", "What is in box 2?", "Name the colour."]
    requests = [
        Request(key=f"r{i}", image_path=img, prompt=p, sampling=Sampling(max_tokens=6, seed=i))
        for i, (p, img) in enumerate(zip(prompts, tiny_images))
    ]
    with eng:
        out = eng.generate(requests)
        desc = eng.describe()
    assert [r.key for r in out] == ["r0", "r1", "r2"]
    for r in out:
        assert r.ok, r.error
        assert isinstance(r.text, str)
        assert r.prompt_tokens and r.prompt_tokens > 10
        assert 1 <= r.output_tokens <= 6
        assert r.finish_reason in ("stop", "length")
    assert SECRET not in json.dumps(desc)
    print(f"vllm server healthy after {vllm_server['start_s']:.1f} s; 3 requests answered")


@pytest.mark.vllm
def test_vllm_server_errors_and_structured_outputs(vllm_server, tiny_images, monkeypatch):
    """A prompt beyond max_model_len is a 400 error row at once; a regex constraint is honoured."""
    base_url = vllm_server["base_url"]
    eng = make_engine(base_url, monkeypatch, served_model=vllm_server["served_model"],
                      timeout_s=60.0, max_retries=0, structured_outputs=True)
    regex = r"1: [a-z ]{1,20}\n2: [a-z ]{1,20}"
    requests = [
        Request(key="long", image_path=tiny_images[0], prompt="describe the region " * 400,
                sampling=Sampling(max_tokens=6)),
        Request(key="rx", image_path=tiny_images[1], prompt="Describe boxes 1 and 2.",
                sampling=Sampling(max_tokens=60), regex=regex),
    ]
    with eng:
        out = eng.generate(requests)
    assert out[0].error is not None and out[0].error["kind"] == "http_400", out[0]
    assert "context length" in out[0].error["message"]
    assert SECRET not in out[0].error["message"]
    import re

    assert out[1].ok, out[1].error
    assert re.fullmatch(regex, out[1].text), repr(out[1].text)


@pytest.mark.cli
@pytest.mark.parametrize("preflight", [True, False])
def test_a_dead_server_stops_the_run_with_one_error(tmp_path, preflight):
    """Through the CLI: no server at base_url ends the run at once with one error naming it,
    with the preflight (the engine's start) or without (the first batch), not 6 tries per row."""
    from conftest import run_cli

    base_url = f"http://127.0.0.1:{_dead_port()}/v1"
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = run_cli([f"hydra.run.dir={out}", "engine=openai", f"engine.base_url={base_url}", "engine.served_model=m",
                    f"engine.preflight={str(preflight).lower()}", "engine.backoff_s=2", "workers=0"],
                   cwd=tmp_path, timeout=240)
    elapsed = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    errors = [line for line in log.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and base_url in errors[0] and "cannot connect" in errors[0], errors
    assert "Traceback" not in log
    assert elapsed < 120  # 5 retries with 2 s backoff per row would be over a minute of waiting alone
