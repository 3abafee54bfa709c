"""The real VllmEngine (vLLM's CPU build) on the tiny InternVL3.5: it loads, takes the tile budget,
generates (a caption under the lines regex, a grounding request), and regioncap's prompt count before
submission is vLLM's, at one tile and at two tiles plus the thumbnail. One engine start (~10-40 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_helpers import RESULT_MARKER, TEST_KV_CACHE_BYTES, run_vllm_script, vllm_env, vllm_python  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = """
import json, sys
spec = json.load(sys.stdin)
from PIL import Image
from regioncap.families.internvl import InternVL35
from regioncap.engines.base import Request, Sampling
from regioncap.engines.vllm_engine import VllmEngine

family = InternVL35.config(**spec["model"])
engine = VllmEngine(model_cfg=family, engine_cfg=VllmEngine.Config(**spec["engine"]), model_path=spec["model_path"])
reqs, predicted = [], {}
for i, (w, h) in enumerate(spec["sizes"]):
    path = "%s/%d.png" % (spec["folder"], i)
    Image.new("RGB", (w, h), (30 * i, 120, 200)).save(path)
    reqs.append(Request(key="cap%d" % i, image_path=path, prompt="Describe region 1.", regex="1: [a-z ]{1,20}",
                        sampling=Sampling(temperature=0.0, max_tokens=8), image_size=(w, h)))
reqs.append(Request(key="ground", image_path=reqs[-1].image_path, prompt=engine.family.grounding_prompt(),
                    sampling=Sampling(temperature=0.0, max_tokens=8), image_size=tuple(spec["sizes"][-1])))
for r in reqs:
    predicted[r.key] = engine.count_prompt_tokens(engine.render_prompt(r), r.image_size)
out = engine.generate(reqs)
result = {"predicted": predicted, "responses": {o.key: {"error": o.error, "text": o.text,
                                                        "prompt_tokens": o.prompt_tokens} for o in out}}
engine.close()
print(spec["marker"] + json.dumps(result), flush=True)
"""


def test_tiny_internvl_in_vllm(tiny_internvl_dir, tmp_path_factory) -> None:
    vllm_python()  # fail fast when there is no vLLM environment
    folder = tmp_path_factory.mktemp("internvl_vllm")
    model = tiny_internvl_dir
    spec = {
        "model_path": str(model), "folder": str(folder), "sizes": [[448, 448], [896, 448]], "marker": RESULT_MARKER,
        "model": {"name": "internvl35_tiny", "path": str(model), "max_tiles": 2, "max_model_len": 2048,
                  "dtype": "float32"},
        "engine": {"enforce_eager": True, "structured_outputs": True,
                   "extra_args": {"kv_cache_memory_bytes": TEST_KV_CACHE_BYTES}},
    }
    result = run_vllm_script(SCRIPT, spec, timeout=400, env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    responses = result["responses"]
    assert all(r["error"] is None for r in responses.values()), responses
    assert {k: r["prompt_tokens"] for k, r in responses.items()} == result["predicted"]
    # One tile (256 visual tokens) and two tiles plus the thumbnail (768): the same text otherwise.
    assert responses["cap1"]["prompt_tokens"] - responses["cap0"]["prompt_tokens"] == 512
    assert responses["cap0"]["text"].startswith("1: ")
