"""The real VllmEngine (vLLM's CPU build) on the tiny Qwen2.5-VL.

The test process has no vllm, so one script runs the engine inside the vLLM
environment (``tests/vllm_helpers.py``) with the engine in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: a few seconds to start instead of ~20),
answers several ``generate`` calls, and prints every response as JSON. The
engine is started once for the module; each test asserts on its own call.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_helpers import (  # noqa: E402
    RESULT_MARKER,
    TEST_KV_CACHE_BYTES,
    TEST_MAX_MODEL_LEN,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    make_tiny_images,
    run_vllm_script,
    vllm_env,
    vllm_python,
)

pytestmark = pytest.mark.vllm

#: Runs in the vLLM environment: build the engine, answer each call, print JSON.
ENGINE_SCRIPT = """
import dataclasses, json, sys, time
spec = json.load(sys.stdin)
from regioncap.families.qwen import Qwen25VL
from regioncap.engines.base import Request, Sampling
from regioncap.engines.vllm_engine import VllmEngine

t0 = time.perf_counter()
engine = VllmEngine(model_cfg=Qwen25VL.config(**spec["model"]), engine_cfg=VllmEngine.Config(**spec["engine"]),
                    model_path=spec["model_path"])
result = {"start_s": time.perf_counter() - t0, "describe": engine.describe(), "calls": []}
for call in spec["calls"]:
    for r in call:  # "fill_to": pad the prompt until the engine counts that many prompt tokens
        if r.get("fill_to"):
            from PIL import Image
            with Image.open(r["image_path"]) as im:
                size = im.size
            base, n = r["prompt"], 0
            while engine.count_prompt_tokens(engine.render_prompt(Request(
                    key="", image_path="", prompt=base + " region" * n)), size) < r["fill_to"]:
                n += 1
            r["prompt"] = base + " region" * n
    reqs = [Request(key=r["key"], image_path=r["image_path"], prompt=r["prompt"], system=r.get("system"),
                    sampling=Sampling(**r.get("sampling", {})), regex=r.get("regex"),
                    json_schema=r.get("json_schema")) for r in call]
    predicted = {}
    for r in reqs:  # the engine's own count, to compare with what vLLM reports
        try:
            from PIL import Image
            with Image.open(r.image_path) as im:
                predicted[r.key] = engine.count_prompt_tokens(engine.render_prompt(r), im.size)
        except Exception:
            pass
    t = time.perf_counter()
    out = engine.generate(reqs)
    result["calls"].append({"seconds": time.perf_counter() - t, "predicted": predicted,
                            "responses": [dataclasses.asdict(o) for o in out]})
t = time.perf_counter()
engine.close()
engine.close()  # safe twice
result["close_s"] = time.perf_counter() - t
print("%s" + json.dumps(result), flush=True)
""" % RESULT_MARKER

LINES_REGEX = r"1: [a-z ]{1,20}\n2: [a-z ]{1,20}"
JSON_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                   "colour": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["id", "colour"],
    "additionalProperties": False,
}


def _req(key: str, image: str, prompt: str, **kw: Any) -> Dict[str, Any]:
    return {"key": key, "image_path": image, "prompt": prompt, **kw}


@pytest.fixture(scope="module")
def engine_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """One VllmEngine session in the vLLM environment, several generate calls; the parsed results."""
    vllm_python()  # fail fast when there is no vLLM environment
    folder = tmp_path_factory.mktemp("vllm_engine")
    imgs = make_tiny_images(folder / "images")
    broken = folder / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    greedy = {"temperature": 0.0, "max_tokens": 8}
    calls: List[List[Dict[str, Any]]] = [
        # 0: three good requests, a prompt beyond max_model_len, a missing and a broken image.
        [
            _req("ok0", imgs[0], "Describe region 1 in a few words.", sampling=greedy),
            _req("long", imgs[0], "describe the region " * 400, sampling=greedy),
            _req("ok1", imgs[1], "What is in box 1?", system="You caption regions.", sampling=greedy),
            _req("missing", str(folder / "nope.jpg"), "Describe region 1.", sampling=greedy),
            _req("ok2", imgs[2], "Name the colour of region 1.", sampling={"temperature": 0.9, "seed": 7,
                                                                            "max_tokens": 8}),
            _req("broken", str(broken), "Describe region 1.", sampling=greedy),
            # The prompt fits but leaves less than max_tokens: answered, budget cut to what is left.
            _req("budget", imgs[0], "Describe region 1.", fill_to=TEST_MAX_MODEL_LEN - 6,
                 sampling={"temperature": 0.0, "max_tokens": 50}),
        ],
        # 1: structured outputs: a regex and a JSON schema, sampled so the model wanders.
        [
            _req("rx", imgs[0], "Describe boxes 1 and 2.", regex=LINES_REGEX,
                 sampling={"temperature": 1.0, "seed": 1, "max_tokens": 60}),
            _req("js", imgs[2], "Give the box id and colour as JSON.", json_schema=JSON_SCHEMA,
                 sampling={"temperature": 1.0, "seed": 2, "max_tokens": 60}),
        ],
        # 2: a request vLLM itself rejects (invalid regex) fails the batch call; the
        #    engine retries one by one so only that request is an error row.
        [
            _req("fine0", imgs[1], "Describe region 1.", sampling=greedy),
            _req("badrx", imgs[1], "Describe region 1.", regex="(unclosed", sampling=greedy),
            _req("fine1", imgs[0], "Describe region 1.", sampling=greedy),
        ],
        # 3: the first request of call 0 again: greedy decoding is repeatable.
        [_req("ok0-again", imgs[0], "Describe region 1 in a few words.", sampling=greedy)],
    ]
    spec = {
        "model_path": str(tiny_model_dir),
        "model": {"name": "tiny", "path": str(tiny_model_dir), "min_pixels": TINY_MIN_PIXELS,
                  "max_pixels": TINY_MAX_PIXELS, "max_model_len": TEST_MAX_MODEL_LEN, "dtype": "float32"},
        "engine": {"enforce_eager": True, "structured_outputs": True,
                   "extra_args": {"kv_cache_memory_bytes": TEST_KV_CACHE_BYTES}},
        "calls": calls,
    }
    result = run_vllm_script(ENGINE_SCRIPT, spec, timeout=400,
                             env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    print(json.dumps({"start_s": result["start_s"], "close_s": result["close_s"],
                      "call_s": [c["seconds"] for c in result["calls"]]}))
    return result


def _by_key(call: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {r["key"]: r for r in call["responses"]}


def test_batch_with_bad_requests(engine_run):
    call = engine_run["calls"][0]
    assert [r["key"] for r in call["responses"]] == ["ok0", "long", "ok1", "missing", "ok2", "broken", "budget"]
    got = _by_key(call)
    for key in ("ok0", "ok1", "ok2"):
        r = got[key]
        assert r["error"] is None, r
        assert isinstance(r["text"], str)
        assert 1 <= r["output_tokens"] <= 8
        assert r["finish_reason"] in ("stop", "length")
        assert r["latency_s"] > 0
        # The engine's pre-count (text - placeholder + visual tokens) is what vLLM saw.
        assert r["prompt_tokens"] == call["predicted"][key], key
    # Images of 112x84 and 56x56 give 12 and 4 visual tokens: the counts differ by the image
    # and by the system prompt and text, and both are well above the text alone.
    assert got["ok0"]["prompt_tokens"] > 12
    long = got["long"]
    assert long["error"]["kind"] == "too_long"
    assert f"max_model_len {TEST_MAX_MODEL_LEN}" in long["error"]["message"]
    assert f"prompt of {long['prompt_tokens']} tokens" in long["error"]["message"]
    assert long["prompt_tokens"] > TEST_MAX_MODEL_LEN
    budget = got["budget"]
    assert budget["error"] is None, budget
    assert TEST_MAX_MODEL_LEN - 6 <= budget["prompt_tokens"] < TEST_MAX_MODEL_LEN
    assert budget["prompt_tokens"] == call["predicted"]["budget"]
    assert 1 <= budget["output_tokens"] <= TEST_MAX_MODEL_LEN - budget["prompt_tokens"]
    assert got["missing"]["error"]["kind"] == "image_error"
    assert "nope.jpg" in got["missing"]["error"]["message"]
    assert got["broken"]["error"]["kind"] == "image_error"


def test_structured_outputs(engine_run):
    got = _by_key(engine_run["calls"][1])
    rx, js = got["rx"], got["js"]
    assert rx["error"] is None and re.fullmatch(LINES_REGEX, rx["text"]), rx
    assert js["error"] is None, js
    if js["finish_reason"] == "stop":  # a complete answer must be valid JSON of the schema
        data = json.loads(js["text"])
        assert set(data) == {"id", "colour"} and data["colour"] in ("red", "green", "blue")


def test_one_bad_request_does_not_fail_the_batch(engine_run):
    call = engine_run["calls"][2]
    assert [r["key"] for r in call["responses"]] == ["fine0", "badrx", "fine1"]
    got = _by_key(call)
    assert got["fine0"]["error"] is None and got["fine1"]["error"] is None
    assert got["badrx"]["error"]["kind"] in ("invalid_request", "engine_error"), got["badrx"]
    assert got["badrx"]["text"] is None


def test_greedy_is_repeatable_and_describe(engine_run):
    first = _by_key(engine_run["calls"][0])["ok0"]
    again = engine_run["calls"][3]["responses"][0]
    assert again["text"] == first["text"]
    desc = engine_run["describe"]
    assert desc["engine"] == "vllm" and desc["vllm_version"]
    assert desc["structured_outputs"] is True
    assert desc["llm_kwargs"]["max_model_len"] == TEST_MAX_MODEL_LEN
    assert desc["llm_kwargs"]["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert desc["llm_kwargs"]["mm_processor_kwargs"] == {"min_pixels": TINY_MIN_PIXELS, "max_pixels": TINY_MAX_PIXELS}
