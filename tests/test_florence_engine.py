"""Florence-2 through the real TransformersEngine, on the offline tiny build (random weights: no wording asserted)."""

from __future__ import annotations

import pytest
from PIL import Image

from regioncap.engines.base import Request, Sampling
from regioncap.engines.transformers_engine import TransformersEngine
from regioncap.families.florence import TINY_IMAGE_SIZE, Florence2, from_bin, to_bin

pytestmark = pytest.mark.slow

SIDE = TINY_IMAGE_SIZE


@pytest.fixture(scope="module")
def family(tiny_florence_dir):
    return Florence2(Florence2.config(name="florence2_tiny", path=str(tiny_florence_dir), image_size=SIDE,
                                      dtype="float32"))


@pytest.fixture(scope="module")
def engine(family, tiny_florence_dir):
    eng = TransformersEngine(engine_cfg=TransformersEngine.Config(batch_size=4, device="cpu"),
                             model_cfg=family.cfg, model_path=str(tiny_florence_dir))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "square.png"
    im = Image.new("RGB", (SIDE, SIDE), (235, 235, 235))
    im.paste((220, 30, 30), (8, 8, 40, 30))
    im.save(path)
    return str(path)


PROMPTS = {
    "region": "<REGION_TO_DESCRIPTION><loc_125><loc_125><loc_625><loc_468>",
    "grounding": "<OD>",
    # A DataFlow-MM prompt on a marked image: free text, passed to the encoder as it is written.
    "dataflow": "Describe the content of each marked region in the image.\nThere are 2 regions: <region1> to <region2>.",
}


def _req(key, image, prompt, **kw):
    return Request(key=key, image_path=image, prompt=prompt, sampling=Sampling(max_tokens=kw.pop("max_tokens", 6)), **kw)


def test_the_engine_counts_the_familys_tokens_and_answers_without_the_prompt(engine, family, image):
    proc = engine.processor
    out = engine.generate([_req(k, image, p) for k, p in PROMPTS.items()])
    for (key, prompt), resp in zip(PROMPTS.items(), out):
        assert resp.ok, resp.error
        # regioncap's count before submission: the family's visual tokens, then <s> + the text the
        # processor reads (a task token becomes its sentence) + </s>.
        sentence = proc._construct_prompts([prompt])[0]
        text_tokens = len(engine.tokenizer("<s>" + sentence + "</s>", add_special_tokens=False)["input_ids"])
        assert resp.prompt_tokens == family.visual_tokens(SIDE, SIDE) + text_tokens, key
        # The answer is the decoder's alone: none of the prompt comes back.
        assert "What does the region" not in resp.text and "Describe the content" not in resp.text
        assert 0 < resp.output_tokens <= 6
        # An answer cut at max_tokens says so: the model's own generation config would force </s> as the
        # last token there, and a stop at exactly max_tokens would hide the cut (this seeded model never stops).
        assert (resp.finish_reason, resp.output_tokens) == ("length", 6)


def test_answers_do_not_depend_on_batch_mates(engine, image):
    # An encoder pads on the right: a short prompt next to a long one reads the same.
    reqs = [_req(k, image, p) for k, p in PROMPTS.items()]
    together = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [(r.text, r.prompt_tokens, r.output_tokens) for r in together] == \
        [(r.text, r.prompt_tokens, r.output_tokens) for r in alone]


def test_the_lines_constraint_holds_on_the_decoder(engine, image):
    from regioncap.prompts import answer_regex, parse_answer

    resp = engine.generate([_req("m", image, "The image has 2 numbered boxes drawn on it.", max_tokens=40,
                                 regex=answer_regex([1, 2], "lines"))])[0]
    assert resp.ok and resp.text.startswith("1: ")
    assert 1 in parse_answer(resp.text, [1, 2], "lines").captions


def test_grounding_answers_keep_their_location_tokens(engine, family):
    # An <OD> answer as token ids of the real tokenizer, then </s>: decoded, it parses to the box.
    ids = engine.tokenizer("car<loc_100><loc_200><loc_300><loc_400>", add_special_tokens=False)["input_ids"]
    text = engine.answer_text([engine.tokenizer.bos_token_id] + ids)
    assert text == "car<loc_100><loc_200><loc_300><loc_400>"
    (prop,) = family.parse_grounding(text, 640, 480)
    assert prop.label == "car" and prop.bbox == pytest.approx((64.32, 96.24, 192.32, 192.24))


def test_the_processor_sees_the_familys_square_and_bins(engine, family, image):
    import torch

    with Image.open(image) as im:
        x = engine.processor(text=["<OD>"], images=[im.resize((97, 31))], return_tensors="pt")
    assert tuple(x["pixel_values"].shape[-2:]) == family.input_size(97, 31)[::-1]
    assert x["input_ids"][0].tolist().count(engine.tokenizer.image_token_id) == family.visual_tokens(SIDE, SIDE)
    # The family's bins are the processor's quantize, and its read-back the dequantize (before rounding).
    post = engine.processor.post_processor
    size = (1333, 750)
    boxes = torch.tensor([[0, 0, 1333, 750], [1, 2, 3, 4], [666.4, 374.9, 1000.2, 749.99]])
    q = post.quantize(boxes, size)
    fam = family.box_coords
    assert q.tolist() == [fam(tuple(b), size) for b in boxes.tolist()]
    assert post.dequantize(q, size).tolist() == [[int(from_bin(v, s)) for v, s in zip(row, size * 2)]
                                                 for row in q.tolist()]
    assert to_bin(1333, 1333) == 999
