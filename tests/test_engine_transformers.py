"""The real TransformersEngine on the offline tiny Qwen2.5-VL (random weights: no assertions on wording)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from regioncap.families.qwen import Qwen25VL
from regioncap.engines.base import Request, Sampling
from regioncap.engines.transformers_engine import TransformersEngine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tiny_model import make_old_style_copy  # noqa: E402

pytestmark = pytest.mark.slow

SIZE = (224, 168)  # multiples of 28: already at the model's input size, 48 visual tokens


def _model_cfg(path: Path, **kw) -> Qwen25VL.Config:
    base = dict(name="tiny", path=str(path), builder=None, min_pixels=56 * 56, max_pixels=224 * 224,
                max_model_len=2048, dtype="float32")
    base.update(kw)
    return Qwen25VL.config(**base)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = TransformersEngine(engine_cfg=TransformersEngine.Config(batch_size=2, device="auto"),
                             model_cfg=_model_cfg(tiny_model_dir), model_path=str(tiny_model_dir))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (40, 60, 220)]):
        im = Image.new("RGB", SIZE, (235, 235, 235))
        im.paste(colour, (20 + 30 * i, 20, 120 + 30 * i, 140))
        path = folder / f"img{i}.png"
        im.save(path)
        paths.append(str(path))
    return paths


def _req(key: str, image: str, prompt: str = "Describe region 1 in a few words.", **sampling) -> Request:
    return Request(key=key, image_path=image, prompt=prompt, sampling=Sampling(**{"max_tokens": 8, **sampling}))


def _text_tokens(engine, req: Request) -> int:
    """Tokens of the rendered prompt, not counting the one image placeholder."""
    text = engine.processor.apply_chat_template(engine._messages(req), tokenize=False, add_generation_prompt=True)
    return len(engine.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1


def test_generate_three(engine, images):
    reqs = [_req(f"r{i}", p) for i, p in enumerate(images)]
    reqs[1].system = "You caption regions."
    out = engine.generate(reqs)
    assert [r.key for r in out] == ["r0", "r1", "r2"]
    for req, resp in zip(reqs, out):
        assert resp.ok, resp.error
        assert isinstance(resp.text, str)
        assert resp.prompt_tokens == _text_tokens(engine, req) + Qwen25VL().visual_tokens(*SIZE)
        assert 0 < resp.output_tokens <= 8
        assert resp.finish_reason in ("stop", "length")
        assert resp.finish_reason == "stop" or resp.output_tokens == 8
        assert resp.latency_s > 0


def test_same_seed_same_text(engine, images):
    sampled = dict(temperature=1.0, top_p=0.95, seed=7, max_tokens=12)
    # the same requests in other batch positions and batch mates
    first = engine.generate([_req("a", images[0], **sampled), _req("g", images[1])])
    second = engine.generate([_req("g", images[1]), _req("x", images[2]), _req("a", images[0], **sampled)])
    assert first[0].text == second[2].text
    assert first[1].text == second[0].text  # greedy
    other = engine.generate([_req("a", images[0], **{**sampled, "seed": 8})])
    assert other[0].ok and other[0].text != first[0].text


def test_too_long_is_an_error_row(engine, images):
    long_prompt = "describe every region " * 600
    out = engine.generate([_req("ok1", images[0]), _req("long", images[1], prompt=long_prompt),
                           _req("ok2", images[2])])
    assert out[0].ok and out[2].ok
    assert out[1].error["kind"] == "too_long"
    assert "max_model_len=2048" in out[1].error["message"]
    assert out[1].prompt_tokens > 2048


def test_bad_images_are_error_rows(engine, images, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = engine.generate([_req("ok1", images[0]), _req("missing", str(tmp_path / "nope.png")),
                           _req("corrupt", str(corrupt)), _req("ok2", images[1])])
    assert out[0].ok and out[3].ok
    for resp, name in ((out[1], "nope.png"), (out[2], "corrupt.jpg")):
        assert not resp.ok
        assert resp.error["kind"] == "image_error"
        assert name in resp.error["message"]


def test_failed_batch_is_retried_one_by_one(engine, images, monkeypatch):
    real = engine._run_batch

    def flaky(batch):
        if any(b.request.key == "boom" for b in batch):
            raise RuntimeError("kaboom in the model")
        return real(batch)

    monkeypatch.setattr(engine, "_run_batch", flaky)
    out = engine.generate([_req("ok1", images[0]), _req("boom", images[1]), _req("ok2", images[2])])
    assert out[0].ok and out[2].ok
    assert out[1].error["kind"] == "engine_error"
    assert "kaboom in the model" in out[1].error["message"]


def test_oom_halves_the_batch(engine, images, monkeypatch):
    import torch

    real = engine._run_batch
    sizes = []

    def small_memory(batch):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch)

    monkeypatch.setattr(engine, "_run_batch", small_memory)
    monkeypatch.setattr(engine, "batch_size", 2)
    out = engine.generate([_req(f"r{i}", p) for i, p in enumerate(images)])
    assert all(r.ok for r in out)
    assert sizes[0] == 2 and set(sizes[1:]) == {1}
    assert engine.batch_size == 1


def test_describe(engine, tiny_model_dir):
    info = engine.describe()
    assert info["engine"] == "transformers"
    assert info["model_path"] == str(tiny_model_dir)
    assert info["dtype"] == "float32"
    assert info["device"] in ("cpu", "cuda")
    assert info["transformers"] and info["torch"]


def test_old_style_rope_config_loads(tiny_model_dir, images, tmp_path):
    old = make_old_style_copy(tiny_model_dir, tmp_path / "old")
    eng = TransformersEngine(engine_cfg=TransformersEngine.Config(batch_size=1, device="cpu"), model_cfg=_model_cfg(old),
                             model_path=str(old))
    try:
        assert eng.describe()["rope_scaling_patched"] is True
        out = eng.generate([_req("r", images[0])])
        assert out[0].ok, out[0].error
    finally:
        eng.close()
        eng.close()  # safe twice


def test_lines_numbers_reads_only_the_lines_regex():
    from regioncap.engines.transformers_engine import lines_numbers
    from regioncap.prompts import answer_regex

    assert lines_numbers(answer_regex([1, 2, 7], "lines")) == [1, 2, 7]
    assert lines_numbers(answer_regex([4], "lines")) == [4]
    assert lines_numbers(answer_regex([1, 2], "lines") + "x") is None
    assert lines_numbers(r"1: [a-z ]{1,20}\n2: [a-z ]{1,20}") is None
    assert lines_numbers(None) is None


def test_lines_regex_is_enforced(engine, images):
    import re

    from regioncap.prompts import answer_regex

    req = _req("lines", images[0], prompt="Describe regions 1, 2 and 5.", max_tokens=200)
    req.regex = answer_regex([1, 2, 5], "lines")
    free = _req("free", images[1], max_tokens=6)  # an unconstrained neighbour in the same batch
    out = engine.generate([req, free])
    assert out[0].ok and out[1].ok
    assert out[0].finish_reason == "stop"
    lines = out[0].text.split("\n")
    assert [line.split(":")[0] for line in lines] == ["1", "2", "5"]
    # The whole answer matches the regex vLLM would enforce (layout and caption length).
    assert re.fullmatch(req.regex, out[0].text)


def test_other_regexes_and_json_schemas_are_enforced_with_xgrammar(engine, images):
    """Any regex or JSON schema (not only the ``lines`` layout) holds, row by row, in one batch."""
    import json
    import re

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    rx = _req("rx", images[0], prompt="yes or no?", max_tokens=20)
    rx.regex = r"(yes|no) [0-9]{1,2}"
    js = _req("js", images[1], prompt="a number", max_tokens=20)
    js.json_schema = schema
    free = _req("free", images[2], max_tokens=5)
    out = engine.generate([rx, js, free])
    assert all(o.ok for o in out), [o.error for o in out]
    assert out[0].finish_reason == "stop" and re.fullmatch(rx.regex, out[0].text), out[0].text
    # JSON in one fixed layout (no free whitespace: the separators json.dumps writes), valid against the schema.
    assert out[1].finish_reason == "stop", out[1].text
    value = json.loads(out[1].text)
    assert out[1].text == json.dumps(value)
    assert set(value) == {"n"} and isinstance(value["n"], int) and 0 <= value["n"] <= 9
    # The grounding answer of propose=vlm: every complete answer is its compact layout.
    from regioncap.families.grounding import grounding_regex

    g = _req("ground", images[0], prompt="Locate every object.", max_tokens=120)
    g.regex = grounding_regex()
    (ans,) = engine.generate([g])
    assert ans.ok and ans.text.startswith("[")
    if ans.finish_reason == "stop":
        assert re.fullmatch(grounding_regex(), ans.text), ans.text
    else:  # cut by max_tokens: still a prefix of that layout
        assert re.fullmatch(r'\[(\{"bbox_2d": \[.*)?', ans.text, re.DOTALL), ans.text


def test_a_constraint_that_does_not_compile_fails_only_its_request(engine, images):
    bad = _req("bad", images[0], max_tokens=5)
    bad.regex = "(unclosed"
    good = _req("good", images[1], max_tokens=5)
    out = engine.generate([bad, good])
    assert not out[0].ok and out[0].error["kind"] == "engine_error"
    assert "cannot compile the answer regex" in out[0].error["message"]
    assert out[1].ok


def test_without_xgrammar_other_constraints_warn_once_and_run_unconstrained(engine, images, monkeypatch, caplog):
    import logging

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar -> ImportError
    monkeypatch.setattr(engine, "_grammar_compiler", None)
    reqs = []
    for i in range(2):
        r = _req(f"r{i}", images[i], max_tokens=4)
        r.regex = "(yes|no)"
        reqs.append(r)
    with caplog.at_level(logging.WARNING, logger="regioncap"):
        out = engine.generate(reqs)
    assert all(o.ok for o in out)
    warnings = [r for r in caplog.records if "xgrammar is not installed" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("answer", ["1: a red circle\n2: an orange star", "3: the sky\n4:  two spaces\n10: x"])
def test_lines_constraint_keeps_the_models_own_tokens(tiny_model_dir, answer):
    """A model that wants to write a well-formed answer gets exactly its own tokens through.

    BPE writes "1: a" as "1", ":", " a"; forcing "1", ":", " " (a lone space)
    would push the model off the token sequences it learned.
    """
    import torch
    from transformers import AutoTokenizer

    from regioncap.engines.constrain import lines_processor

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    want = tok.encode(answer, add_special_tokens=False) + [eos]
    numbers = [int(line.split(":")[0]) for line in answer.split("\n")]
    size = len(tok) + 10
    proc = lines_processor(tok, [numbers], prompt_len=3, eos_ids=[eos], vocab_size=size)
    ids = torch.tensor([[0, 1, 2]])
    for target in want:
        scores = torch.zeros((1, size))
        scores[0, target] = 10.0  # the model's favourite next token
        masked = proc(ids, scores)
        assert int(masked.argmax()) == target, (tok.decode(ids[0, 3:]), tok.decode([target]))
        ids = torch.cat([ids, torch.tensor([[target]])], dim=1)
    assert tok.decode(ids[0, 3:-1]) == answer


def test_lines_constraint_still_requires_a_caption_after_the_colon(tiny_model_dir):
    import torch
    from transformers import AutoTokenizer

    from regioncap.engines.constrain import lines_processor

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    newline = tok.encode("\n", add_special_tokens=False)[0]
    size = len(tok)
    proc = lines_processor(tok, [[1, 2]], prompt_len=0, eos_ids=[eos], vocab_size=size)
    ids = torch.tensor([tok.encode("1:", add_special_tokens=False)])
    proc(ids[:, :1], torch.zeros((1, size)))  # the call that saw "1"
    allowed = proc(ids, torch.zeros((1, size))) > float("-inf")
    assert not allowed[0, newline] and not allowed[0, eos]  # no empty caption
    assert allowed[0, tok.encode(" a", add_special_tokens=False)[0]]
    assert not allowed[0, tok.encode("a", add_special_tokens=False)[0]]  # "1:a" breaks the regex
