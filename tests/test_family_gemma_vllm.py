"""The tiny Gemma 3 on vLLM's CPU build through regioncap's VllmEngine.

One script in the vLLM environment (in-process engine, eager mode, a 64 MiB KV
cache) answers one ``generate`` call: two caption requests (one with a system
prompt, which Gemma folds into the user turn; one whose text has blank lines,
which merge with the newlines around the image block) and one grounding request
constrained by the family's regex. What regioncap counts before submission must
be what vLLM counts, with one ``<bos>``; the grounding answer parses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_helpers import TEST_KV_CACHE_BYTES, TEST_MAX_MODEL_LEN, run_vllm_script, vllm_env  # noqa: E402

from regioncap.families.gemma import Gemma3  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = """
import json, sys
spec = json.load(sys.stdin)
from regioncap.families.gemma import Gemma3
from regioncap.engines.base import Request, Sampling
from regioncap.engines.vllm_engine import VllmEngine

family = Gemma3(Gemma3.config(**spec["model"]))
engine = VllmEngine(family.cfg, VllmEngine.Config(**spec["engine"]), model_path=spec["model"]["path"])
reqs = [Request(key=r["key"], image_path=r["image"], prompt=r["prompt"], system=r.get("system"),
                regex=r.get("regex"), sampling=Sampling(max_tokens=r["max_tokens"])) for r in spec["requests"]]
counted = [engine.prepare(r)[0]["n_prompt"] for r in reqs]
first = engine._tokenizer.encode(engine.render_prompt(reqs[0]))[:2]
out = engine.generate(reqs)
engine.close()
print("REGIONCAP_RESULT " + json.dumps({"counted": counted, "vllm": [o.prompt_tokens for o in out],
      "errors": [o.error for o in out], "texts": [o.text for o in out], "first": first,
      "bos": engine._tokenizer.bos_token_id}))
"""


def test_tiny_gemma3_on_vllm_counts_and_grounds(tiny_gemma, tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (224, 224), (30, 120, 200)).save(image)
    family = Gemma3(Gemma3.config(name="gemma3_tiny", path=str(tiny_gemma), image_size=224))
    spec = {
        "model": {"name": "gemma3_tiny", "path": str(tiny_gemma), "image_size": 224, "min_pixels": 224 * 224,
                  "max_pixels": 224 * 224, "max_model_len": TEST_MAX_MODEL_LEN, "dtype": "float32"},
        "engine": {"enforce_eager": True, "structured_outputs": True,
                   "extra_args": {"kv_cache_memory_bytes": TEST_KV_CACHE_BYTES}},
        "requests": [
            {"key": "system", "image": str(image), "prompt": "Describe region 1.", "system": "Be brief.",
             "max_tokens": 4},
            {"key": "blank-lines", "image": str(image), "prompt": "Regions:\n\n1: the sky\n\nDescribe them.",
             "max_tokens": 4},
            {"key": "ground", "image": str(image), "prompt": family.grounding_prompt(), "max_tokens": 40,
             **family.grounding_constraint("regex", 10)},
        ],
    }
    env = vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")
    result = run_vllm_script(SCRIPT, spec, timeout=900, env=env)
    assert result["errors"] == [None, None, None]
    assert result["counted"] == result["vllm"]
    assert result["first"][0] == result["bos"] and result["first"][1] != result["bos"]   # one <bos>
    assert result["texts"][2].startswith("[")                                   # the constrained JSON list