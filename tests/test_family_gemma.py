"""Gemma 3's family facts: the fixed square input, 0-1000 JSON boxes, the published configs, the tiny build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regioncap.families.gemma import GEMMA3_CHAT_TEMPLATE, GRID, GROUNDING_PROMPT, Gemma3

ARCHS = Path(__file__).resolve().parents[1] / "regioncap" / "archs"


def family(**over) -> Gemma3:
    return Gemma3(Gemma3.config(name="gemma3_4b", path="google/gemma-3-4b-it", **over))


# -- pixels -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(896, 896), (640, 480), (480, 640), (4000, 3000), (1, 1), (10000, 7), (224, 224)])
def test_every_image_is_squashed_to_896_and_costs_256_tokens(size):
    f = family()
    assert f.input_size(*size) == (896, 896)
    assert f.visual_tokens(*f.input_size(*size)) == 256
    assert f.is_fixed_size(896, 896)
    assert f.is_fixed_size(*size) == (size == (896, 896))


def test_the_input_side_is_a_setting_checked_against_the_token_size():
    assert family(image_size=224).input_size(640, 480) == (224, 224)
    assert family(image_size=224).visual_tokens(224, 224) == 16
    with pytest.raises(ValueError, match="model.image_size=900"):
        family(image_size=900)


def test_an_empty_image_is_refused_naming_it():
    with pytest.raises(ValueError, match="row 3"):
        family().input_size(0, 10, source="row 3")


# -- coordinates ------------------------------------------------------------------------


def round_trip(f: Gemma3, box, size):
    text = f.box_text(box, size)
    answer = json.dumps([{**json.loads(text), "label": "thing"}])
    return text, f.parse_grounding(answer, *size, min_size=0.0)


@pytest.mark.parametrize("size", [(896, 896), (640, 480), (480, 640), (4000, 300), (37, 1001)])
def test_corners_and_edges_round_trip_within_half_a_grid_step(size):
    f = family()
    w, h = size
    boxes = [(0, 0, w, h), (0, 0, w / 4, h / 4), (3 * w / 4, 3 * h / 4, w, h), (0, h / 2, w, h),
             (w / 2, 0, w, h / 3), (w / 3, h / 3, 2 * w / 3, 2 * h / 3)]
    for box in boxes:
        _, (p,) = round_trip(f, box, size)
        for got, want, side in zip(p.bbox, box, (w, h, w, h)):
            assert abs(got - want) <= side / GRID / 2 + 1e-9
        assert p.label == "thing"


def test_the_box_text_is_json_bbox_2d_on_the_grid():
    f = family()
    assert f.box_text((0, 0, 640, 480), (640, 480)) == '{"bbox_2d": [0, 0, 1000, 1000]}'
    assert f.box_text((64, 120, 320, 240), (640, 480)) == '{"bbox_2d": [100, 250, 500, 500]}'
    # Relative coordinates: the same box of the original and of the squashed 896 x 896 image.
    assert f.box_coords((64, 120, 320, 240), (640, 480)) == f.box_coords(
        (64 * 896 / 640, 120 * 896 / 480, 320 * 896 / 640, 240 * 896 / 480), (896, 896))


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 5000), h=st.integers(1, 5000),
       fx=st.tuples(st.floats(0, 1), st.floats(0, 1)), fy=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_any_box_round_trips_within_half_a_grid_step(w, h, fx, fy):
    f = family()
    x1, x2 = sorted(v * w for v in fx)
    y1, y2 = sorted(v * h for v in fy)
    _, props = round_trip(f, (x1, y1, x2, y2), (w, h))
    assert len(props) == 1
    for got, want, side in zip(props[0].bbox, (x1, y1, x2, y2), (w, h, w, h)):
        assert abs(got - want) <= side / GRID / 2 + 1e-6


def test_grounding_answers_parse_to_pixels_of_the_image_seen():
    f = family()
    answer = ('Here you go:\n```json\n[{"bbox_2d": [0, 0, 500, 1000], "label": "left half"},\n'
              ' {"bbox_2d": [1000, 1000, 750, 500], "label": "swapped"},\n {"bbox_2d": [900, 900, 1200, 1100], '
              '"label": "over the edge"}, {"bbox_2d": [10, 10, 10, 500], "label": "flat"}]\n```')
    got = [(p.bbox, p.label) for p in f.parse_grounding(answer, 896, 896)]
    assert got == [((0.0, 0.0, 448.0, 896.0), "left half"), ((672.0, 448.0, 896.0, 896.0), "swapped"),
                   ((806.4, 806.4, 896.0, 896.0), "over the edge")]
    # On a non-square image the grid is relative to each side.
    (p,) = f.parse_grounding('[{"bbox_2d": [250, 500, 750, 1000], "label": "x"}]', 640, 480)
    assert p.bbox == (160.0, 240.0, 480.0, 480.0)


def test_min_size_applies_in_pixels_not_grid_units():
    f = family()
    answer = '[{"bbox_2d": [0, 0, 2, 2], "label": "speck"}]'
    assert f.parse_grounding(answer, 896, 896, min_size=1.0)           # 1.8 px
    assert not f.parse_grounding(answer, 896, 896, min_size=2.0)
    assert not f.parse_grounding(answer, 100, 100, min_size=1.0)       # 0.2 px


@pytest.mark.parametrize("text", [None, "", "no boxes here", "[", '{"bbox_2d": "x"}', "[" * 10000, 42])
def test_any_answer_parses_without_raising(text):
    assert family().parse_grounding(text, 896, 896) == []


def test_the_grounding_request_and_its_constraint():
    f = family()
    assert f.grounding_prompt() == GROUNDING_PROMPT and "0 to 1000" in GROUNDING_PROMPT
    import re

    regex = f.grounding_constraint("regex", 10)["regex"]
    assert re.fullmatch(regex, '[{"bbox_2d": [0, 12, 1000, 999], "label": "a dog"}]')
    assert f.grounding_constraint("json", 7)["json_schema"]["maxItems"] == 7
    assert f.grounding_constraint("none", 7) == {}


# -- the published configs --------------------------------------------------------------


@pytest.mark.parametrize("folder", sorted(set(Gemma3.archs.values())))
def test_the_published_configs_agree_with_the_family(folder):
    config = json.loads((ARCHS / folder / "config.json").read_text())
    pre = json.loads((ARCHS / folder / "preprocessor_config.json").read_text())
    f = family()
    side = f.input_size(1, 1)[0]
    assert config["model_type"] in Gemma3.model_types
    assert config["vision_config"]["image_size"] == side == pre["size"]["height"] == pre["size"]["width"]
    assert config["vision_config"]["patch_size"] == f.cfg.patch_size
    assert config["mm_tokens_per_image"] == pre["image_seq_length"] == f.visual_tokens(side, side)
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]      # SigLIP, not CLIP
    assert pre["do_pan_and_scan"] is None                                # off unless asked for
    assert Gemma3.arch_folder(f"google/gemma-3-{folder.split('_')[1]}-it") == folder


@pytest.mark.cli
def test_importing_the_family_imports_no_torch():
    code = "import sys, regioncap.families.gemma; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


# -- the tiny build (real processor and model) ------------------------------------------


@pytest.fixture(scope="session")
def tiny_processor(tiny_gemma):
    from regioncap.engines.transformers_engine import load_processor

    return load_processor(str(tiny_gemma))


def tiny_family() -> Gemma3:
    return family(image_size=224)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(224, 224), (640, 480), (300, 1000), (17, 5)])
def test_the_processor_puts_as_many_image_tokens_as_the_family_counts(tiny_processor, size):
    from PIL import Image

    f = tiny_family()
    tok = tiny_processor.tokenizer
    messages = [{"role": "user", "content": f.user_content("Describe the region.")}]
    text = tiny_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for image in (Image.new("RGB", size, (200, 30, 30)), Image.new("RGB", f.input_size(*size), (200, 30, 30))):
        ids = tiny_processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        assert ids.count(tok.image_token_id) == f.visual_tokens(*image.size) == 16


@pytest.mark.slow
def test_an_image_at_the_input_size_reaches_the_model_unchanged(tiny_gemma, tiny_processor):
    import numpy as np
    from PIL import Image
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    f = tiny_family()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (*f.input_size(640, 480)[::-1], 3), dtype=np.uint8))
    want = (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5   # SigLIP's normalisation
    # The processor the engine loads here, and the PIL one a CPU set-up without torchvision gets.
    for ip in (tiny_processor.image_processor, Gemma3ImageProcessorPil.from_pretrained(tiny_gemma)):
        pixels = ip(images=[image], return_tensors="np")["pixel_values"][0]
        assert pixels.shape == want.shape
        assert np.abs(pixels - want).max() < 1e-5


@pytest.mark.slow
def test_the_chat_template_snapshot(tiny_processor):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": family().user_content("Describe region 1.")}]
    text = tiny_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>Describe region 1.<end_of_turn>\n"
                    "<start_of_turn>model\n")
    assert tiny_processor.tokenizer.chat_template == GEMMA3_CHAT_TEMPLATE


@pytest.mark.slow
def test_the_tiny_model_generates_and_the_build_is_reused(tiny_gemma, tiny_processor):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    assert Gemma3.build_tiny(tiny_gemma) == tiny_gemma                      # complete: reused, not rebuilt
    model = AutoModelForImageTextToText.from_pretrained(tiny_gemma)
    assert type(model).__name__ == Gemma3.transformers_class
    messages = [{"role": "user", "content": family().user_content("Describe region 1.")}]
    text = tiny_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tiny_processor(text=[text], images=[Image.new("RGB", (224, 224))], return_tensors="pt",
                            add_special_tokens=False)
    assert inputs["input_ids"][0].tolist().count(tiny_processor.tokenizer.bos_token_id) == 1
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_a_weightless_4b_folder_has_the_published_token_ids_and_256_image_tokens(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    from regioncap import random_weights

    folder = random_weights.build_arch_folder("google/gemma-3-4b-it", tmp_path / "arch")   # model.weights=random
    processor = AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    assert len(tok) == 262145 and tok.bos_token_id == 2 and tok.eos_token_id == 1
    assert [tok.convert_tokens_to_ids(t) for t in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                                                   "<end_of_image>", "<image_soft_token>")] == [
        105, 106, 255999, 256000, 262144]
    f = family()
    messages = [{"role": "user", "content": f.user_content("Describe the region.")}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = processor(text=[text], images=[Image.new("RGB", (640, 480))], return_tensors="np",
                    add_special_tokens=False)["input_ids"][0].tolist()
    assert ids.count(262144) == f.visual_tokens(640, 480) == 256
    assert ids[0] == 2 and ids.count(2) == 1


@pytest.mark.slow
def test_the_engine_counts_the_prompt_as_it_submits_it(tiny_gemma, tmp_path):
    from PIL import Image

    from regioncap.engines.base import Request, Sampling
    from regioncap.engines.transformers_engine import TransformersEngine

    cfg = Gemma3.config(name="gemma3_tiny", path=str(tiny_gemma), image_size=224, min_pixels=224 * 224,
                        max_pixels=224 * 224, max_model_len=2048, dtype="float32")
    engine = TransformersEngine(model_cfg=cfg, engine_cfg=TransformersEngine.Config(), model_path=str(tiny_gemma))
    assert engine.processor.image_processor.size["height"] == 224      # the family's input, not a pixel budget
    reqs = []
    for i, (size, system) in enumerate([((224, 224), None), ((224, 224), "Be brief.\n"), ((300, 100), None)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", size, (40 * i, 90, 200)).save(path)
        reqs.append(Request(key=f"r{i}", image_path=str(path), prompt=f"Describe\n\nregion {i}.", system=system,
                            sampling=Sampling(max_tokens=3)))
    counted = [engine._prepare(i, r).prompt_tokens for i, r in enumerate(reqs)]
    out = engine.generate(reqs)
    assert [r.error for r in out] == [None] * 3
    assert [r.prompt_tokens for r in out] == counted
    prepared = engine._prepare(0, reqs[0])
    ids = engine.processor(text=[prepared.text], images=[prepared.image], add_special_tokens=False,
                           return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(engine.tokenizer.bos_token_id) == 1 and len(ids) == counted[0]


@pytest.mark.cli
@pytest.mark.slow
def test_one_row_end_to_end_with_random_weights(tiny_gemma, tmp_path):
    from conftest import run_cli

    out = tmp_path / "run"
    proc = run_cli(["model=gemma3_tiny", f"model.path={tiny_gemma}", "model.weights=random", "engine=transformers",
                    "data=demo", "data.limit=1", "sampling.max_tokens=16", "prompt.reask_missing=false",
                    f"hydra.run.dir={out}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["tokens"]["prompt"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_weights"] == "random" and metrics["rows"] == 1
    visual = json.loads((out / "visualize.jsonl").read_text().splitlines()[0])
    assert visual["input_size"] == [224, 224]
