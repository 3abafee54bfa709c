"""The real Qwen2.5-VL-3B architecture with random weights on vLLM's CPU build (``load_format="dummy"``).

One script runs the VllmEngine in the vLLM environment (in-process engine,
eager mode, bfloat16, a 512 MiB KV cache: about 11 GB of RAM at its peak) at the
qwen25vl_3b config's real settings (max_model_len 8192, up to 1280 visual
tokens per image). One ``generate`` call answers two rows at a reduced image
size (one of them under a regex constraint) beside one that cannot fit. The
full budget (a 12 MP photo's input size with a 10-box prompt) goes through
vLLM's own input processor, which expands the image placeholders as the model
would see them without running the model: a forward pass at 1,300 tokens
through 3.75 B random parameters costs minutes on 2 cores and checks nothing
more. What regioncap counts before submission must be what vLLM counts.
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
from PIL import Image
from regioncap.families.qwen import Qwen25VL
from regioncap.engines.base import Request, Sampling
from regioncap.engines.vllm_engine import VllmEngine
from regioncap.models import resolve_model_path

model_cfg = Qwen25VL.config(**spec["model"])
t0 = time.perf_counter()
engine = VllmEngine(model_cfg=model_cfg, engine_cfg=VllmEngine.Config(**spec["engine"]),
                    model_path=resolve_model_path(model_cfg))
result = {"start_s": time.perf_counter() - t0, "describe": engine.describe()}
reqs = {r["key"]: Request(key=r["key"], image_path=r["image"], prompt=r["prompt"], regex=r.get("regex"),
                          sampling=Sampling(max_tokens=r["max_tokens"])) for r in spec["requests"]}
predicted = {}
for key, r in reqs.items():
    with Image.open(r.image_path) as im:
        predicted[key] = engine.count_prompt_tokens(engine.render_prompt(r), im.size)
t = time.perf_counter()
out = engine.generate([reqs[key] for key in spec["generate"]])
result.update(generate_s=time.perf_counter() - t, predicted=predicted,
              responses=[dataclasses.asdict(o) for o in out])

# vLLM's input processor: the prompt's token ids as the engine core would get them (image placeholders
# expanded by vLLM's multimodal processor), or vLLM's own refusal; no forward pass.
t = time.perf_counter()
llm_engine = engine.llm.llm_engine
tasks = llm_engine.get_supported_tasks()
image_pad = engine._tokenizer.convert_tokens_to_ids(engine.family.image_placeholder)
processed = {}
for key in spec["process"]:
    r = reqs[key]
    with Image.open(r.image_path) as im:
        prompt = {"prompt": engine.render_prompt(r), "multi_modal_data": {"image": im.convert("RGB")}}
    try:
        core = llm_engine.input_processor.process_inputs(key, prompt, engine.sampling_params(r),
                                                         supported_tasks=tasks)
    except Exception as e:
        processed[key] = {"error": type(e).__name__, "kind": engine._kind(e), "message": str(e)}
    else:
        ids = list(core.prompt_token_ids)
        processed[key] = {"prompt_tokens": len(ids), "image_tokens": ids.count(image_pad)}
result.update(process_s=time.perf_counter() - t, processed=processed)
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


def test_3b_random_vllm_token_budget(tmp_path, big_model_slot):
    from regioncap.prompts import answer_regex

    vllm_python()
    small = smart_resize(4000, 3000, min_pixels=3136, max_pixels=50176)
    full = smart_resize(4000, 3000, min_pixels=3136, max_pixels=1003520)
    requests = [
        {"key": "small0", "image": _image(tmp_path / "s0.png", small, 0), "prompt": _prompt(2), "max_tokens": 2},
        {"key": "small1", "image": _image(tmp_path / "s1.png", small, 1), "prompt": _prompt(2), "max_tokens": 2,
         "regex": answer_regex([1, 2], "lines")},
        {"key": "full", "image": _image(tmp_path / "f.png", full, 2), "prompt": _prompt(10), "max_tokens": 512,
         "regex": answer_regex(list(range(1, 11)), "lines")},
        {"key": "too-long", "image": str(tmp_path / "f.png"), "prompt": "describe " * 8000, "max_tokens": 4},
    ]
    spec = {
        "model": {"name": "qwen25vl_3b", "path": "Qwen/Qwen2.5-VL-3B-Instruct", "weights": "random",
                  "min_pixels": 3136, "max_pixels": 1003520, "max_model_len": 8192, "dtype": "bfloat16"},
        "engine": {"enforce_eager": True, "structured_outputs": True,
                   "extra_args": {"kv_cache_memory_bytes": 512 * 1024 * 1024, "max_num_seqs": 4}},
        "requests": requests,
        "generate": ["small0", "too-long", "small1"],
        "process": ["full", "too-long"],
    }
    env = vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", REGIONCAP_CACHE=str(tmp_path / "cache"))
    with big_model_slot():  # never beside the transformers one (tests/test_full_arch.py) on another worker
        result = run_vllm_script(SCRIPT, spec, timeout=1500, env=env)
    print(json.dumps({k: result[k] for k in ("start_s", "generate_s", "process_s")}))
    d = result["describe"]
    assert d["model_weights"] == "random" and d["llm_kwargs"]["load_format"] == "dummy"
    assert d["llm_kwargs"]["max_model_len"] == 8192
    predicted = result["predicted"]

    # Generated: regioncap's count is vLLM's on real answers, and a row that cannot fit is an error row
    # beside them (regioncap refuses it before submission).
    rows = {r["key"]: r for r in result["responses"]}
    for key in ("small0", "small1"):
        assert rows[key]["error"] is None, rows[key]
        assert rows[key]["prompt_tokens"] == predicted[key], key  # regioncap's count == vLLM's
        assert 1 <= rows[key]["output_tokens"] <= 2
    assert rows["too-long"]["error"]["kind"] == "too_long" and rows["too-long"]["prompt_tokens"] > 8192
    assert rows["too-long"]["prompt_tokens"] == predicted["too-long"]

    # The full budget through vLLM's input processor: the same count, 1200-1280 image tokens, and room for
    # the answer; the row that cannot fit is one vLLM refuses too, as too long.
    full_row = result["processed"]["full"]
    assert 1200 <= visual_tokens(full) <= 1280
    assert full_row["image_tokens"] == visual_tokens(full), full_row
    assert full_row["prompt_tokens"] == predicted["full"], full_row  # regioncap's count == vLLM's
    assert full_row["prompt_tokens"] - rows["small0"]["prompt_tokens"] > visual_tokens(full) - visual_tokens(small)
    assert full_row["prompt_tokens"] + 512 <= 8192  # a 10-box chunk at the full budget leaves the answer room
    refused = result["processed"]["too-long"]
    assert refused.get("kind") == "too_long", refused
