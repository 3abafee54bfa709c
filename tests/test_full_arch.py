"""The published Qwen2-VL / Qwen2.5-VL architectures with random weights (``model.weights=random``).

Fast tests check the weightless folder regioncap builds from ``regioncap/archs``
(published config values, tokenizer ids at Qwen's real ids). The slow test
builds the real Qwen2.5-VL-3B (3.75 B parameters, bfloat16, ~9 GB of RAM) in
the transformers engine on the CPU and checks the token budget at a reduced and
at the real pixel budget. The vLLM one is in ``tests/test_full_arch_vllm.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from omegaconf import OmegaConf
import pytest
from PIL import Image

from regioncap import random_weights
from regioncap.engines.base import EngineError, Request, Sampling
from regioncap.families.qwen import smart_resize
from regioncap.metrics import visual_tokens

HUB_3B = "Qwen/Qwen2.5-VL-3B-Instruct"
#: The qwen25vl_3b model config's budget (conf/model/qwen25vl_3b.yaml): up to 1280 visual tokens.
BUDGET_3B = (3136, 1003520)
#: A reduced budget for the generating part of the test: at most 64 visual tokens.
BUDGET_SMALL = (3136, 50176)


def model_cfg(path: str = HUB_3B, weights: str = "random", **kw):
    base = dict(_target_="regioncap.families.qwen.Qwen25VL", name="qwen25vl_3b", path=path, revision=None, min_pixels=BUDGET_3B[0],
                max_pixels=BUDGET_3B[1], patch_size=14, merge_size=2, max_model_len=8192, dtype="bfloat16",
                trust_remote_code=False, builder=None, weights=weights)
    base.update(kw)
    return OmegaConf.create(base)


@pytest.fixture(scope="module")
def arch_cache(tmp_path_factory):
    import os

    folder = tmp_path_factory.mktemp("regioncap-cache")
    old = os.environ.get("REGIONCAP_CACHE")
    os.environ["REGIONCAP_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("REGIONCAP_CACHE", None)
    else:
        os.environ["REGIONCAP_CACHE"] = old


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@pytest.mark.parametrize("name,hub,hidden,layers", [
    ("qwen2_5_vl_3b", "Qwen/Qwen2.5-VL-3B-Instruct", 2048, 36),
    ("qwen2_5_vl_7b", "Qwen/Qwen2.5-VL-7B-Instruct", 3584, 28),
    ("qwen2_vl_2b", "Qwen/Qwen2-VL-2B-Instruct", 1536, 28),
])
def test_arch_folder_has_the_published_config_and_real_token_ids(tmp_path, name, hub, hidden, layers):
    from transformers import AutoTokenizer

    out = random_weights.build_arch_folder(hub, tmp_path / name)
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (hidden, layers)
    assert config["rope_scaling"]["mrope_section"] == [16, 24, 24]
    assert config["rope_scaling"]["rope_type"] == "default"  # old "type: mrope" spelling fixed
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(out)
    for key, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("eos_token_id", "<|im_end|>"),
                       ("bos_token_id", "<|endoftext|>")]:
        assert tok.convert_tokens_to_ids(token) == config[key], key
    assert len(tok) <= config["vocab_size"]
    # Built once: a second call reuses the folder.
    mtime = (out / "tokenizer.json").stat().st_mtime_ns
    assert random_weights.build_arch_folder(hub, out) == out
    assert (out / "tokenizer.json").stat().st_mtime_ns == mtime


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_padded_tokenizer_encodes_text_like_the_tiny_one(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    out = random_weights.build_arch_folder("qwen2_5_vl_3b", tmp_path / "a")
    big, tiny = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Describe boxes 1, 2 and 3: the red car on the left. Ünïcode ✓"
    assert big.decode(big(text).input_ids) == text
    assert big(text).input_ids == tiny(text).input_ids  # fillers are never produced: the same split


def test_resolve_random_builds_the_arch_without_the_hub(arch_cache, monkeypatch):
    from regioncap.models import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = Path(resolve_model_path(model_cfg()))
    assert path.parent == arch_cache and (path / "config.json").is_file()
    with pytest.raises(EngineError, match="model.weights='bogus'"):
        resolve_model_path(model_cfg(weights="bogus"))
    with pytest.raises(EngineError, match="regioncap/archs"):
        resolve_model_path(model_cfg(path="Someone/Unknown-VL"))


def test_model_weights_composes_and_is_checked(compose_cfg):
    cfg = compose_cfg(["model=qwen25vl_3b", "model.weights=random"])
    assert cfg.model.weights == "random"
    assert compose_cfg(["model=qwen25vl_3b"]).model.weights == "real"
    assert random_weights.describe(cfg.model) == {"model_weights": "random"}
    from regioncap.manifest import model_identity

    assert model_identity(dict(cfg.model), None)["weights"] == "random"
    assert model_identity({"name": "x", "path": "Qwen/X"}, None)["weights"] == "real"


# ----------------------------------------------------------------------------- slow: the real 3B


def _image(path: Path, size, seed: int) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def engine_3b(arch_cache, big_model_slot):
    from regioncap.engines.transformers_engine import TransformersEngine
    from regioncap.models import resolve_model_path

    cfg = model_cfg()
    with big_model_slot():  # never beside the vLLM one (tests/test_full_arch_vllm.py) on another worker
        eng = TransformersEngine(model_cfg=cfg, engine_cfg=SimpleNamespace(
            name="transformers", batch_size=2, device="cpu", attn_implementation="sdpa", structured_outputs=True),
            model_path=resolve_model_path(cfg))
        yield eng
        eng.close()


def _prompt(n_boxes: int) -> str:
    from regioncap.prompts import build_prompt

    numbers = list(range(1, n_boxes + 1))
    return build_prompt("The image has {n} numbered {boxes} drawn on it, labelled {labels}. Describe each "
                        "in one short phrase. {format_instruction}", numbers=numbers,
                        labels=[str(n) for n in numbers], answer_format="lines")


@pytest.mark.slow
def test_3b_random_transformers_token_budget(engine_3b, tmp_path, caplog):
    """The real 3B architecture: what regioncap counts before submission is what the engine counts."""
    from regioncap.prompts import answer_regex

    eng = engine_3b
    assert eng.describe()["model_weights"] == "random"
    n_params = sum(p.numel() for p in eng.model.parameters())
    assert 3.6e9 < n_params < 3.9e9  # Qwen2.5-VL-3B: 3.75 B with its vision tower
    assert eng.max_model_len == 8192

    # Reduced budget: two rows through generate (prefill + 2 decoded tokens each), and between them a
    # request that cannot fit (8000 words: over max_model_len without its image): an error row, while its
    # neighbours are still answered. (A forward pass at the full budget costs minutes on 2 cores; the
    # full budget's count is checked below against the processor the engine runs.)
    size_full = smart_resize(4000, 3000, min_pixels=BUDGET_3B[0], max_pixels=BUDGET_3B[1])
    full_image = _image(tmp_path / "full.png", size_full, 7)
    eng._set_processor_settings(dict(min_pixels=BUDGET_SMALL[0], max_pixels=BUDGET_SMALL[1]))
    size = smart_resize(4000, 3000, min_pixels=BUDGET_SMALL[0], max_pixels=BUDGET_SMALL[1])
    reqs = [Request(key=f"small{i}", image_path=_image(tmp_path / f"s{i}.png", size, i), prompt=_prompt(2),
                    regex=answer_regex([1, 2], "lines"), sampling=Sampling(max_tokens=2), image_size=size)
            for i in range(2)]
    counted = [eng._prepare(i, r).prompt_tokens for i, r in enumerate(reqs)]
    long_req = Request(key="too-long", image_path=full_image, prompt="describe " * 8000,
                       sampling=Sampling(max_tokens=4))
    out = eng.generate([reqs[0], long_req, reqs[1]])
    assert out[1].error["kind"] == "too_long" and out[1].prompt_tokens > 8192
    out = [out[0], out[2]]
    assert [r.error for r in out] == [None, None]
    assert [r.prompt_tokens for r in out] == counted
    text_only = counted[0] - visual_tokens(size)
    assert 0 < text_only < 200 and visual_tokens(size) <= BUDGET_SMALL[1] // 784
    assert all(1 <= r.output_tokens <= 2 for r in out)

    # The real budget (1280 visual tokens at most): a 12 MP photo's input size, a
    # chunk of 10 boxes (max_boxes), and the processor's own count of the prompt.
    eng._set_processor_settings(dict(min_pixels=BUDGET_3B[0], max_pixels=BUDGET_3B[1]))
    size = size_full
    assert 1200 <= visual_tokens(size) <= 1280
    req = Request(key="full", image_path=full_image, prompt=_prompt(10),
                  regex=answer_regex(list(range(1, 11)), "lines"), sampling=Sampling(max_tokens=512))
    prepared = eng._prepare(0, req)
    inputs = eng.processor(text=[prepared.text], images=[prepared.image], return_tensors="pt")
    assert int(inputs["attention_mask"].sum()) == prepared.prompt_tokens
    assert int(np.prod(inputs["image_grid_thw"][0].tolist())) // 4 == visual_tokens(size)
    # A 10-box chunk at the full budget leaves the whole answer budget in max_model_len.
    assert prepared.prompt_tokens + 512 <= eng.max_model_len
    assert prepared.max_new_tokens == 512
