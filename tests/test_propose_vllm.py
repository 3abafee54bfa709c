"""The vlm proposer's grounding request through the real vLLM engine (CPU build) and its structured outputs.

``model=shapes`` answers the grounding request in form but not in place (its
model card: recall 0.3% at IoU 0.5), so nothing here checks where its
boxes are: only that vLLM accepts both constraints, that the regex one forces
the compact layout ``parse_grounding`` reads, and that every proposal that
comes back is a valid box inside the image.
"""

from __future__ import annotations

import json
import re

import pytest

from regioncap.families.grounding import grounding_regex
from vllm_helpers import RESULT_MARKER, run_vllm_script, vllm_env, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = """
import json, random, sys, tempfile, os
spec = json.load(sys.stdin)
from regioncap.families.base import build_family
from regioncap.families.qwen import Qwen25VL
from regioncap.engines.base import Sampling
from regioncap.engines.vllm_engine import VllmEngine
from regioncap.models import resolve_model_path
from regioncap.propose.vlm import VlmProposer
from regioncap.shapes import render_scene

model = Qwen25VL.config(**spec["model"])
engine = VllmEngine(model_cfg=model, engine_cfg=VllmEngine.Config(**spec["engine"]),
                    model_path=resolve_model_path(model))
out = {"answers": []}
folder = tempfile.mkdtemp()
for constraint in ("regex", "json"):
    proposer = VlmProposer(VlmProposer.Config(constraint=constraint, max_tokens=256),
                           engine=engine, family=build_family(model))
    for seed in (1, 2):
        image, _ = render_scene(random.Random(seed), 3)
        path = os.path.join(folder, f"{constraint}{seed}.png")
        image.save(path)
        req = proposer.request(f"{constraint}/{seed}", path, image.size,
                               Sampling(temperature=1.0, seed=seed, max_tokens=256))
        (resp,) = engine.generate([req])
        props = proposer.parse(resp.text, *image.size)
        out["answers"].append({"constraint": constraint, "text": resp.text, "error": resp.error,
                               "finish": resp.finish_reason, "size": list(image.size),
                               "proposals": [p.to_dict() for p in props]})
    # propose() itself: one image through the engine, parsed.
    out.setdefault("propose", []).append([p.to_dict() for p in proposer.propose(image)])
engine.close()
print("%s" + json.dumps(out), flush=True)
""" % RESULT_MARKER


def test_grounding_requests_through_vllm_structured_outputs():
    vllm_python()  # fail fast, with instructions, when there is no vLLM environment
    spec = {
        "model": {"name": "shapes", "path": "pkg://regioncap/weights/shapes", "min_pixels": 3136,
                  "max_pixels": 50176, "max_model_len": 2048, "dtype": "float32"},
        "engine": {"enforce_eager": True, "structured_outputs": True,
                   "extra_args": {"kv_cache_memory_bytes": 64 * 1024 * 1024}},
    }
    result = run_vllm_script(SCRIPT, spec, timeout=400, env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    answers = result["answers"]
    assert len(answers) == 4 and all(a["error"] is None for a in answers)
    for a in answers:
        w, h = a["size"]
        for p in a["proposals"]:
            x1, y1, x2, y2 = p["bbox"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and p["source"] == "vlm"
        if a["constraint"] == "regex" and a["finish"] == "stop":
            # A finished regex-constrained answer is the compact layout, hence valid JSON.
            assert re.fullmatch(grounding_regex(), a["text"]), a["text"]
            assert isinstance(json.loads(a["text"]), list)
        else:
            # The JSON schema (or a cut-off answer) is at least a JSON list as far as it goes.
            assert a["text"].lstrip().startswith("["), a["text"]
    # 256 tokens hold a whole compact answer for three shapes; the JSON schema's free whitespace is what the
    # regex is for (this model fills it with newlines until the budget runs out).
    assert any(a["constraint"] == "regex" and a["finish"] == "stop" for a in answers)
    assert len(result["propose"]) == 2 and all(isinstance(p, list) for p in result["propose"])
