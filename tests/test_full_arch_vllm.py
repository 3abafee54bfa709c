"""The real Qwen2.5-VL-3B architecture with random weights on vLLM's CPU build (``load_format="dummy"``).

One script runs the VllmEngine in the vLLM environment (in-process engine,
eager mode, bfloat16, a 512 MiB KV cache: about 11 GB of RAM at its peak) at the
qwen25vl_3b config's real settings (max_model_len 8192, up to 1280 visual
tokens per image), and answers one ``generate`` call: two rows at a reduced
image size, one at the full budget with a 10-box prompt, and one that cannot
fit. What regioncap counts before submission must be what vLLM counts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_helpers import RESULT_MARKER, run_vllm_script, vllm_env, vllm_python  # noqa: E402

from regioncap.families.qwen import smart_resize  # noqa: E402
from regioncap.metrics import visual_tokens  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = """
import dataclasses, json, sys, time
spec = json.load(sys.stdin)
from regioncap.families.qwen import Qwen25VL
from regioncap.engines.base import Request, Sampling
from regioncap.engines.vllm_engine import VllmEngine
from regioncap.models import resolve_model_path

model_cfg = Qwen25VL.config(**spec["model"])
t0 = time.perf_counter()
engine = VllmEngine(model_cfg=model_cfg, engine_cfg=VllmEngine.Config(**spec["engine"]),
                    model_path=resolve_model_path(model_cfg))
result = {"start_s": time.perf_counter() - t0, "describe": engine.describe()}
reqs = [Request(key=r["key"], image_path=r["image"], prompt=r["prompt"], regex=r.get("regex"),
                sampling=Sampling(max_tokens=r["max_tokens"])) for r in spec["requests"]]
from PIL import Image
predicted = {}
for r in reqs:
    with Image.open(r.image_path) as im:
        predicted[r.key] = engine.count_prompt_tokens(engine.render_prompt(r), im.size)
t = time.perf_counter()
out = engine.generate(reqs)
result.update(generate_s=time.perf_counter() - t, predicted=predicted,
              responses=[dataclasses.asdict(o) for o in out])
engine.close()
print("%s" + json.dumps(result), flush=True)
""" % RESULT_MARKER


def _prompt(n: int) -> str:
    from regioncap.prompts import build_prompt

    numbers = list(range(1, n + 1))
    return build_prompt("The image has {n} numbered {boxes} drawn on it, labelled {labels}. Describe each "
                        "in one short phrase. {format_instruction}", numbers=numbers,
                        labels=[str(k) for k in numbers], answer_format="lines")


def _image(path: Path, size, seed: int) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def test_3b_random_vllm_token_budget(tmp_path):
    from regioncap.prompts import answer_regex

    vllm_python()
    small = smart_resize(4000, 3000, min_pixels=3136, max_pixels=50176)
    full = smart_resize(4000, 3000, min_pixels=3136, max_pixels=1003520)
    requests = [
        {"key": "small0", "image": _image(tmp_path / "s0.png", small, 0), "prompt": _prompt(2), "max_tokens": 2},
        {"key": "small1", "image": _image(tmp_path / "s1.png", small, 1), "prompt": _prompt(2), "max_tokens": 2},
        {"key": "full", "image": _image(tmp_path / "f.png", full, 2), "prompt": _prompt(10), "max_tokens": 1,
         "regex": answer_regex(list(range(1, 11)), "lines")},
        {"key": "too-long", "image": str(tmp_path / "f.png"), "prompt": "describe " * 8000, "max_tokens": 4},
    ]
    spec = {
        "model": {"name": "qwen25vl_3b", "path": "Qwen/Qwen2.5-VL-3B-Instruct", "weights": "random",
                  "min_pixels": 3136, "max_pixels": 1003520, "max_model_len": 8192, "dtype": "bfloat16"},
        "engine": {"enforce_eager": True, "structured_outputs": True,
                   "extra_args": {"kv_cache_memory_bytes": 512 * 1024 * 1024, "max_num_seqs": 4}},
        "requests": requests,
    }
    env = vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", REGIONCAP_CACHE=str(tmp_path / "cache"))
    result = run_vllm_script(SCRIPT, spec, timeout=1500, env=env)
    print(json.dumps({k: result[k] for k in ("start_s", "generate_s")}))
    d = result["describe"]
    assert d["model_weights"] == "random" and d["llm_kwargs"]["load_format"] == "dummy"
    assert d["llm_kwargs"]["max_model_len"] == 8192
    rows = {r["key"]: r for r in result["responses"]}
    for key in ("small0", "small1", "full"):
        assert rows[key]["error"] is None, rows[key]
        assert rows[key]["prompt_tokens"] == result["predicted"][key], key  # regioncap's count == vLLM's
        assert 1 <= rows[key]["output_tokens"] <= 2
    assert rows["full"]["prompt_tokens"] - rows["small0"]["prompt_tokens"] > visual_tokens(full) - visual_tokens(small)
    assert rows["full"]["prompt_tokens"] + 512 <= 8192  # a 10-box chunk at the full budget leaves the answer room
    assert rows["too-long"]["error"]["kind"] == "too_long" and rows["too-long"]["prompt_tokens"] > 8192
