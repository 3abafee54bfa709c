"""InternVL3.5 against the real transformers code: the tiny offline build, the processor's tiles and
token counts, the chat template, generation, the full-size tokenizer ids and the published archs.

Slow: the tiny model is built once per session (a few seconds plus the torch import).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from regioncap.families import internvl_files
from regioncap.families.internvl import InternVL35

pytestmark = pytest.mark.slow

ARCHS = Path(__file__).resolve().parents[1] / "regioncap" / "archs"


def family(max_tiles: int = 12) -> InternVL35:
    return InternVL35(SimpleNamespace(min_tiles=1, max_tiles=max_tiles, tile_size=448, patch_size=14, merge_size=2))


@pytest.fixture(scope="module")
def processor(tiny_internvl_dir):
    from regioncap.engines.transformers_engine import load_processor

    return load_processor(str(tiny_internvl_dir))


def test_build_is_deterministic_and_reused(tiny_internvl_dir, tmp_path) -> None:
    assert internvl_files.is_complete(tiny_internvl_dir, seed=0)
    assert internvl_files.build_tiny_model(tiny_internvl_dir) == tiny_internvl_dir
    other = internvl_files.build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (other / name).read_bytes() == (tiny_internvl_dir / name).read_bytes(), name
    config = json.loads((tiny_internvl_dir / "config.json").read_text())
    assert config["model_type"] in InternVL35.model_types
    assert config["architectures"] == [InternVL35.transformers_class]


def test_chat_template_and_image_tokens(processor) -> None:
    fam = family()
    text = processor.apply_chat_template([{"role": "user", "content": fam.user_content("Describe region 1.")}],
                                         add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n<IMG_CONTEXT>\nDescribe region 1.<|im_end|>\n<|im_start|>assistant\n"
    assert (processor.image_token, processor.start_image_token, processor.end_image_token) == (
        "<IMG_CONTEXT>", "<img>", "</img>")
    assert processor.image_seq_length == fam.tokens_per_tile() == 256


@pytest.mark.parametrize("max_tiles", [2, 12])
@pytest.mark.parametrize("size", [(640, 480), (1600, 1200), (300, 900), (37, 2900)])
def test_token_count_is_the_processors(processor, size, max_tiles) -> None:
    """regioncap's count of the image tokens equals what the processor puts in the prompt, for the image
    at its input size (what regioncap sends) and as it comes (the processor tiles it itself)."""
    from PIL import Image

    fam = family(max_tiles)
    text = "<|im_start|>user\n<IMG_CONTEXT>\nx<|im_end|>\n<|im_start|>assistant\n"
    for w, h in (fam.input_size(*size), size):
        out = processor(images=[Image.new("RGB", (w, h), (10, 200, 30))], text=[text], return_tensors="pt",
                        images_kwargs=fam.processor_kwargs())
        n = int((out["input_ids"] == processor.image_token_id).sum())
        assert n == fam.visual_tokens(w, h) == fam.visual_tokens(*size)
        # The whole prompt, as both engines count it: the text with the image expanded by the family.
        expanded = processor.tokenizer(fam.expand_images(text, w, h), add_special_tokens=False)["input_ids"]
        assert len(expanded) == out["input_ids"].shape[1]
        assert out["pixel_values"].shape[0] == fam.tiles(w, h)


def test_tiles_are_exact_crops_of_the_marked_image(processor) -> None:
    """At the grid's size the processor does not resample: each tile is the image's pixels, normalised."""
    import numpy as np
    from PIL import Image

    fam = family()
    w, h = fam.input_size(900, 1300)
    cols, rows = w // 448, h // 448
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = processor.image_processor(images=[Image.fromarray(arr)], return_tensors="pt",
                                    **fam.processor_kwargs())
    pv = out["pixel_values"].numpy()
    assert pv.shape[0] == cols * rows + 1  # the tiles, then the thumbnail
    mean, std = np.array(internvl_files.IMAGE_MEAN), np.array(internvl_files.IMAGE_STD)
    for i in range(cols * rows):
        c, r = i % cols, i // cols
        crop = arr[r * 448:(r + 1) * 448, c * 448:(c + 1) * 448] / 255.0
        assert np.abs(pv[i] - ((crop - mean) / std).transpose(2, 0, 1)).max() < 1e-5


def test_generates_and_grounding_tokens_survive(tiny_internvl_dir, processor) -> None:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_internvl_dir)).eval()
    assert type(model).__name__ == InternVL35.transformers_class
    fam = family(2)
    text = processor.apply_chat_template([{"role": "user", "content": fam.user_content(fam.grounding_prompt())}],
                                         add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", fam.input_size(900, 400), (200, 40, 40))
    inputs = processor(images=[image], text=[text], return_tensors="pt", images_kwargs=fam.processor_kwargs())
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # An answer decoded with the special tokens skipped keeps a parseable box.
    tok = processor.tokenizer
    ids = tok.encode("<ref>cat</ref><box>[[0, 0, 500, 1000]]</box>")
    assert tok.decode(ids, skip_special_tokens=True) == "cat[[0, 0, 500, 1000]]"
    (p,) = fam.parse_grounding(tok.decode(ids, skip_special_tokens=True), *image.size)
    assert p.label == "cat" and p.bbox == (0.0, 0.0, image.size[0] / 2, float(image.size[1]))


def test_full_size_tokenizer_has_the_published_ids(tmp_path) -> None:
    from transformers import AutoTokenizer

    ids = internvl_files.write_tokenizer(tmp_path, padded=True)
    assert (ids["<|endoftext|>"], ids["<|im_end|>"], ids["<img>"], ids["<IMG_CONTEXT>"], ids["<ref>"],
            ids["<box>"]) == (151643, 151645, 151669, 151671, 151674, 151676)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.context_image_token_id == 151671 and tok.start_image_token_id == 151669
    for folder in InternVL35.archs.values():
        config = json.loads((ARCHS / folder / "config.json").read_text())
        assert config["image_token_id"] == ids["<IMG_CONTEXT>"]
        assert config["text_config"]["eos_token_id"] == ids["<|im_end|>"]
        assert config["text_config"]["vocab_size"] >= len(tok)


def test_published_1b_parameter_count() -> None:
    """The 1B folder builds (on the meta device) to exactly the published parameter counts."""
    import torch
    from transformers import AutoConfig, InternVLForConditionalGeneration

    config = AutoConfig.from_pretrained(str(ARCHS / "internvl3_5_1b"))
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    count = {"vision_tower": 0, "multi_modal_projector": 0, "language": 0}
    for name, p in model.named_parameters():
        part = next((k for k in ("vision_tower", "multi_modal_projector") if k in name), "language")
        count[part] += p.numel()
    assert count == {"vision_tower": 304_012_288, "multi_modal_projector": 5_253_120, "language": 751_632_384}


# ----------------------------------------------------------------------------- through regioncap's engine and run

@pytest.fixture(scope="module")
def engine(tiny_internvl_dir):
    from regioncap.engines.transformers_engine import TransformersEngine

    model_cfg = InternVL35.config(name="internvl35_tiny", path=str(tiny_internvl_dir), max_tiles=2,
                                  max_model_len=2048, dtype="float32")
    eng = TransformersEngine(model_cfg=model_cfg, engine_cfg=SimpleNamespace(
        name="transformers", batch_size=2, device="cpu", attn_implementation="sdpa", structured_outputs=True),
        model_path=str(tiny_internvl_dir))
    yield eng
    eng.close()


def test_engine_counts_the_prompt_as_it_runs(engine, tmp_path) -> None:
    """What regioncap counts before submission (``_prepare``) is what the engine feeds the model, for
    a caption request (lines constraint) and a grounding request, at every grid of the budget."""
    from PIL import Image

    from regioncap.engines.base import Request, Sampling
    from regioncap.prompts import answer_regex

    ip = engine.processor.image_processor
    assert (ip.crop_to_patches, ip.min_patches, ip.max_patches) == (True, 1, 2)
    reqs = []
    for i, size in enumerate([(448, 448), (896, 448), (448, 896)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", size, (20 * i, 90, 200)).save(path)
        reqs.append(Request(key=f"cap{i}", image_path=str(path), prompt="1: describe region 1.",
                            regex=answer_regex([1], "lines"), sampling=Sampling(max_tokens=2), image_size=size))
    reqs.append(Request(key="ground", image_path=reqs[1].image_path, prompt=engine.family.grounding_prompt(),
                        sampling=Sampling(max_tokens=2), image_size=(896, 448)))
    counted = [engine._prepare(i, r).prompt_tokens for i, r in enumerate(reqs)]
    out = engine.generate(reqs)
    assert [r.error for r in out] == [None] * 4
    assert [r.prompt_tokens for r in out] == counted
    # 256, 768, 768 visual tokens, plus <img> and </img>, plus the same text.
    assert counted[1] - counted[0] == counted[2] - counted[0] == 512


@pytest.mark.parametrize("overrides", [
    ["model.weights=random"],
    ["prompt=coords", "propose=vlm", "propose.when=add"],
])
def test_one_row_end_to_end(tiny_internvl_dir, tmp_path, overrides) -> None:
    """``model=internvl35_tiny`` through visualize and caption: every row out once, the image at the
    tiling grid's size, the family's visual tokens in metrics.json, random weights said so."""
    from conftest import compose
    from regioncap.job import execute
    from regioncap.records import read_jsonl

    out = tmp_path / "run"
    cfg = compose(["model=internvl35_tiny", f"model.path={tiny_internvl_dir}", "engine=transformers",
                   "progress=false", "data=demo", "data.limit=1", *overrides], output_dir=out)
    metrics = execute(cfg)
    (rec,) = list(read_jsonl(out / "captions.jsonl"))
    assert metrics["rows"] == 1 and metrics["error_rows"] == 0 and rec["status"] in ("ok", "partial")
    w, h = rec["input_size"]
    assert w % 448 == 0 and h % 448 == 0
    fam = family(2)
    assert metrics["visual_tokens_per_request"] == fam.visual_tokens(w, h)
    assert metrics["model_weights"] == ("random" if "model.weights=random" in overrides else "real")
    if "prompt=coords" in overrides:
        assert "<box>[[" in json.dumps(rec)  # the boxes written in InternVL's own format
        assert metrics["proposals"]["images"] == 1 and "vlm" in metrics["proposals"]["by_method"]
