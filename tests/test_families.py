"""Model families (regioncap.families): the Qwen classes' coordinates, pixel rule, grounding and builds.

Fast tests: coordinates round trip (boxes -> the family's text -> boxes) at the
image's corners and edges and on non-square images, grounding answers in each
family's format, the pixel rule of Qwen3-VL (32 px tokens), the old ``model.family``
configs, the published architectures kept for Qwen3-VL. Slow tests build the tiny
Qwen3-VL (about 3 s) and check its processor's token count, its chat template and
the transformers engine's count against the family's; the CLI test runs one row
end to end with random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from conftest import compose, run_cli
from regioncap import random_weights
from regioncap.errors import RunError
from regioncap.families.base import Family, build_family, family_class, family_name, shipped_families
from regioncap.families.gemma import Gemma3
from regioncap.families.internvl import InternVL35
from regioncap.families.qwen import GRID, Qwen2VL, Qwen3VL, Qwen25VL, smart_resize

FAMILIES = (Qwen2VL, Qwen25VL, Qwen3VL, Gemma3, InternVL35)


def test_shipped_families_are_found_from_the_model_options():
    from regioncap.families.florence import Florence2

    assert shipped_families() == {"qwen2_vl": Qwen2VL, "qwen2_5_vl": Qwen25VL, "qwen3_vl": Qwen3VL,
                                  "gemma3": Gemma3, "florence2": Florence2, "internvl": InternVL35}
    assert all(issubclass(cls, Family) for cls in shipped_families().values())


# ----------------------------------------------------------------------------- coordinates


def _tolerance(cls: type, size) -> tuple:
    """Largest error of a round trip in pixels: half a pixel for pixel coordinates (rounding), half a
    grid step for a relative grid."""
    w, h = size
    return (0.5, 0.5) if cls.grid is None else (0.5 * w / cls.grid + 1e-9, 0.5 * h / cls.grid + 1e-9)


def _round_trip(cls: type, box, size):
    family = cls()
    text = family.box_text(box, size)
    return text, family.parse_grounding(text, *size, min_size=0.0)


@st.composite
def size_and_box(draw):
    """A non-square or square image size and a box inside it, corners and edges included."""
    w = draw(st.integers(28, 4000))
    h = draw(st.integers(28, 4000))
    xs = sorted(draw(st.lists(st.one_of(st.sampled_from([0, w]), st.integers(0, w)), min_size=2, max_size=2)))
    ys = sorted(draw(st.lists(st.one_of(st.sampled_from([0, h]), st.integers(0, h)), min_size=2, max_size=2)))
    return (w, h), (xs[0], ys[0], xs[1], ys[1])


@settings(max_examples=150, deadline=None)
@given(size_and_box(), st.sampled_from(FAMILIES))
def test_box_text_round_trips_through_the_familys_parser(size_box, cls):
    size, box = size_box
    text, props = _round_trip(cls, box, size)
    tx, ty = _tolerance(cls, size)
    if props:
        (x1, y1, x2, y2), = [p.bbox for p in props]
        assert abs(x1 - box[0]) <= tx and abs(x2 - box[2]) <= tx, (text, size_box)
        assert abs(y1 - box[1]) <= ty and abs(y2 - box[3]) <= ty, (text, size_box)
    else:
        # Only a box that rounds to zero width or height on the family's grid reads back as nothing.
        c = cls().box_coords(box, size)
        assert c[0] == c[2] or c[1] == c[3], (text, size_box)


@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1540, 840), (28, 5600), (1000, 1000)])
def test_corners_and_edges_read_back_exactly(cls, size):
    w, h = size
    for box in [(0, 0, w, h), (0, 0, w / 2, h / 2), (w / 2, h / 2, w, h), (0, h / 4, w, h / 2), (w / 4, 0, w / 2, h)]:
        _text, props = _round_trip(cls, box, size)
        tx, ty = _tolerance(cls, size)
        (x1, y1, x2, y2), = [p.bbox for p in props]
        assert abs(x1 - box[0]) <= tx and abs(y1 - box[1]) <= ty and abs(x2 - box[2]) <= tx and abs(y2 - box[3]) <= ty
    # The whole image is the whole image, exactly, in every family.
    assert _round_trip(cls, (0, 0, w, h), size)[1][0].bbox == (0.0, 0.0, float(w), float(h))


def test_each_family_writes_its_own_format():
    box, size = (160, 120, 480, 360), (640, 480)
    assert Qwen25VL().box_text(box, size) == '{"bbox_2d": [160, 120, 480, 360]}'
    assert Qwen2VL().box_text(box, size) == "<|box_start|>(250,250),(750,750)<|box_end|>"
    assert Qwen3VL().box_text(box, size) == '{"bbox_2d": [250, 250, 750, 750]}'
    # Clamped to the image (a box that reaches past it) and rounded.
    assert Qwen3VL().box_coords((-5, -5, 700.4, 481), size) == [0, 0, GRID, GRID]
    assert Qwen25VL().box_coords((-3.2, -0.4, 1541.7, 839.6), (1540, 840)) == [0, 0, 1540, 840]
    # Qwen2-VL's grid is the qwen1000 input format's, up to rounding.
    from regioncap import boxes as bx

    values = bx.from_xyxy(bx.Box(196, 104, 506, 599), "qwen1000", 1536, 832)
    assert Qwen2VL().box_coords((196, 104, 506, 599), (1536, 832)) == [round(v) for v in values]


def test_qwen3_grounding_answers_are_on_the_relative_grid():
    answer = ('```json\n[{"bbox_2d": [100, 200, 500, 1000], "label": "cat"},\n'
              ' {"bbox_2d": [0, 0, 1000, 500], "label": "sky"}]\n```')
    props = Qwen3VL().parse_grounding(answer, 640, 320)
    assert [(p.bbox, p.label) for p in props] == [((64.0, 64.0, 320.0, 320.0), "cat"), ((0.0, 0.0, 640.0, 160.0), "sky")]
    # The same answer read as Qwen2.5-VL's is pixels (and clipped): the frame decides the boxes.
    assert Qwen25VL().parse_grounding(answer, 640, 320)[0].bbox == (100.0, 200.0, 500.0, 320.0)


@pytest.mark.parametrize("cls", FAMILIES)
def test_grounding_constraint_matches_what_the_family_answers(cls):
    import re

    family = cls()
    regex = family.grounding_constraint("regex", 5).get("regex")
    schema = family.grounding_constraint("json", 5).get("json_schema")
    assert family.grounding_constraint("none", 5) == {}
    if cls in (Qwen2VL, InternVL35):  # box tokens, <ref>/<box> special tokens: a text constraint forbids them
        assert regex is None and schema is None
        return
    answer = f'[{{"bbox_2d": [1, 2, 300, 400], "label": "a"}}, {family.box_text((0, 0, 10, 10), (10, 10))[:-1]}, ' \
             '"label": "b"}]'
    assert re.fullmatch(regex, answer) and schema["maxItems"] == 5
    assert [p.label for p in family.parse_grounding(answer, 1000, 1000)] == ["a", "b"]


@settings(max_examples=60, deadline=None)
@given(size_and_box(), st.sampled_from(sorted(shipped_families(), key=str)), st.floats(0.0, 50.0))
def test_every_familys_boxes_come_back_clipped_through_one_path(size_box, name, min_size):
    """Every family's parser ends in ``grounding.to_proposals``: inside the image, sides of at least
    ``min_size``, and the same boxes for an image size given as NumPy integers (Florence-2's own copy
    refused those) as for plain ones."""
    import numpy as np

    cls = shipped_families()[name]
    (w, h), box = size_box
    family = cls()
    text = "thing" + family.box_text(box, (w, h))
    props = family.parse_grounding(text, w, h, min_size=min_size)
    assert props == family.parse_grounding(text, np.int64(w), np.int64(h), min_size=min_size)
    for p in props:
        x1, y1, x2, y2 = p.bbox
        assert 0.0 <= x1 <= x2 <= w and 0.0 <= y1 <= y2 <= h
        assert x2 - x1 >= min_size and y2 - y1 >= min_size


_LABEL = st.text(st.sampled_from("abcxyz _\t"), min_size=0, max_size=12)


def _tagged_answer(cls, items, size):
    """A grounding answer as the family writes it: each label in its ref tags, then its box."""
    family = cls()
    if cls is InternVL35:
        return "\n".join(f"<ref>{label}</ref>{family.box_text(box, size)}" for label, box in items)
    return " ".join(f"<|object_ref_start|>{label}<|object_ref_end|>{family.box_text(box, size)}"
                    for label, box in items)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([Qwen2VL, InternVL35]),
       st.lists(st.tuples(_LABEL, st.tuples(st.integers(0, 300), st.integers(0, 300), st.integers(301, 640),
                                            st.integers(301, 480))), min_size=1, max_size=6),
       st.booleans())
def test_labelled_box_answers_read_back_in_order(cls, items, stripped):
    """Qwen2-VL's box tokens and InternVL's ``<ref>``/``<box>`` are read by one reader
    (``grounding.labelled_boxes``): every box in answer order with its label, whitespace folded, also
    when the engine stripped the special tokens (then the label is the text before the box)."""
    import re

    from regioncap.families.grounding import clean_label

    size = (640, 480)
    text = _tagged_answer(cls, items, size)
    if stripped:
        text = re.sub(r"<\|[a-z_]+\|>|</?ref>|</?box>", "", text)
    props = cls().parse_grounding(text, *size, min_size=0.0)
    assert len(props) == len(items)
    for p, (label, box) in zip(props, items):
        want = clean_label(label.strip(" ,.;:\n\t-") if stripped else label)
        assert p.label == want, (text, p.label)
        assert p.bbox == pytest.approx(box, abs=0.5 * 640 / 1000 + 1e-9)


# ----------------------------------------------------------------------------- pixels


def test_qwen3_config_is_32_px_tokens_with_the_projects_token_budget():
    c = Qwen3VL.Config()
    assert (c.patch_size, c.merge_size) == (16, 2)
    assert (c.min_pixels, c.max_pixels) == (4 * 32 * 32, 1280 * 32 * 32)
    family = Qwen3VL()
    w, h = family.input_size(4000, 3000)
    assert w % 32 == 0 and h % 32 == 0 and family.visual_tokens(w, h) == (w // 32) * (h // 32) <= 1280
    assert (w, h) == smart_resize(4000, 3000, min_pixels=4096, max_pixels=1310720, patch_size=16)
    assert family.is_fixed_size(w, h)
    assert Qwen25VL().input_size(4000, 3000) == smart_resize(4000, 3000, min_pixels=3136, max_pixels=1003520)


@pytest.mark.parametrize("option,cls", [("qwen3vl_2b", Qwen3VL), ("qwen2vl_2b", Qwen2VL), ("gemma3_tiny", Gemma3),
                                        ("internvl35_1b", InternVL35)])
def test_model_options_build_their_family(option, cls):
    cfg = compose([f"model={option}"])
    family = build_family(cfg.model)
    assert type(family) is cls and family_name(cfg.model) == cls.name
    # Pixels per visual token: Gemma 3's 14 px patches are pooled 4x4.
    assert family.cfg.patch_size * family.cfg.merge_size == {Qwen3VL: 32, Gemma3: 56}.get(cls, 28)


@pytest.mark.parametrize("cls", FAMILIES)
def test_published_architectures_match_the_family(cls):
    """Every architecture a family lists is kept, names a model type the family reads, and has the
    family's visual token in its published preprocessor config."""
    for hub_id, folder in cls.archs.items():
        assert cls.arch_folder(hub_id) == folder and random_weights.arch_name(hub_id) == folder
        config = json.loads((random_weights.ARCHS_DIR / folder / "config.json").read_text())
        pre = json.loads((random_weights.ARCHS_DIR / folder / "preprocessor_config.json").read_text())
        assert config["model_type"] in cls.model_types
        unit = cls.Config().patch_size * cls.Config().merge_size
        if cls is InternVL35:  # tiles: the processor's tile is the vision tower's image size
            assert pre["size"] == {"height": cls.Config().tile_size, "width": cls.Config().tile_size}
            assert config["vision_config"]["image_size"] == [cls.Config().tile_size] * 2
            assert config["vision_config"]["patch_size"] == [cls.Config().patch_size] * 2
        elif "patch_size" in pre:
            assert pre["patch_size"] * pre["merge_size"] == unit
        else:  # a fixed input (Gemma 3): its side in tokens, squared, is the model's tokens per image
            assert (pre["size"]["height"] // unit) ** 2 == config["mm_tokens_per_image"]
        assert random_weights.arch_family(folder) is cls


# ----------------------------------------------------------------------------- configs written before families


def test_an_old_model_family_maps_to_its_class_with_a_warning(caplog):
    old = OmegaConf.create({"name": "old", "path": "x", "family": "qwen2_vl", "min_pixels": 3136})
    with caplog.at_level("WARNING", logger="regioncap"):
        assert family_class(old) is Qwen2VL
    assert "model.family=qwen2_vl without model._target_ is deprecated" in caplog.text
    assert family_class({"name": "older", "path": "x"}) is Qwen25VL  # the default family then
    upgraded = Family.upgraded(old, "model")
    assert upgraded["_target_"] == "regioncap.families.qwen.Qwen2VL" and "family" not in upgraded
    with pytest.raises(RunError, match="model.family=llava"):
        family_class({"name": "x", "path": "x", "family": "llava"})


def test_family_name_of_recorded_model_sections():
    assert family_name({"name": "shapes", "family": "qwen2_5_vl"}) == "qwen2_5_vl"
    assert family_name({"name": "old"}) == "qwen2_5_vl"
    assert family_name({"_target_": "regioncap.families.qwen.Qwen3VL"}) == "qwen3_vl"
    assert family_name({"_target_": "nowhere.to.be.Found"}) is None


def test_the_run_key_keeps_the_family_as_old_runs_recorded_it(tmp_path):
    from regioncap.rundir import run_key_values
    from regioncap.settings import check_config

    cfg = compose(["model=qwen2vl_2b"], output_dir=tmp_path)
    check_config(cfg)
    assert run_key_values(cfg)["model"]["family"] == "qwen2_vl"


# ----------------------------------------------------------------------------- slow: the tiny Qwen3-VL


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    return Qwen3VL.build_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3-vl")


@pytest.mark.slow
def test_tiny_qwen3_processor_counts_what_the_family_counts(tiny_qwen3_dir):
    from PIL import Image

    from regioncap.engines.transformers_engine import load_processor

    proc = load_processor(str(tiny_qwen3_dir))
    family = Qwen3VL(Qwen3VL.config(name="t", path=str(tiny_qwen3_dir), max_pixels=256 * 256))
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for source in [(224, 168), (640, 480), (100, 700), (256, 256)]:
        size = family.input_size(*source)
        out = proc(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[Image.new("RGB", size)],
                   return_tensors="pt")
        t, gh, gw = out["image_grid_thw"][0].tolist()
        assert (gw * 16, gh * 16) == size  # the processor leaves the input size as it is
        assert int((out["input_ids"] == pad).sum()) == family.visual_tokens(*size) == t * gh * gw // 4
    # Qwen3-VL's chat template: the image as Qwen2.5-VL's, no default system turn.
    messages = [{"role": "user", "content": Qwen3VL().user_content("Describe region 1.")}]
    assert proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe region 1.<|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.mark.slow
def test_tiny_qwen3_in_the_transformers_engine_counts_before_submission(tiny_qwen3_dir, tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from regioncap.engines.base import Request, Sampling
    from regioncap.engines.transformers_engine import TransformersEngine

    cfg = Qwen3VL.config(name="t", path=str(tiny_qwen3_dir), max_pixels=256 * 256, max_model_len=2048,
                         dtype="float32")
    eng = TransformersEngine(model_cfg=cfg, engine_cfg=SimpleNamespace(
        name="transformers", batch_size=2, device="cpu", attn_implementation=None, structured_outputs=True),
        model_path=str(tiny_qwen3_dir))
    try:
        size = Qwen3VL(cfg).input_size(640, 480)
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / "a.png")
        req = Request(key="a", image_path=str(tmp_path / "a.png"), prompt="Describe it.",
                      sampling=Sampling(max_tokens=3), image_size=size)
        prepared = eng._prepare(0, req)
        inputs = eng.processor(text=[prepared.text], images=[prepared.image], return_tensors="pt")
        assert int(inputs["attention_mask"].sum()) == prepared.prompt_tokens
        (resp,) = eng.generate([req])
        assert resp.error is None and resp.prompt_tokens == prepared.prompt_tokens
    finally:
        eng.close()


@pytest.mark.slow
def test_qwen3_arch_folders_build_and_load_their_config(tmp_path):
    """The weightless 2B folder: transformers reads its config (the real dimensions) and processor."""
    from transformers import AutoConfig

    from regioncap.engines.transformers_engine import load_processor

    out = random_weights.build_arch_folder("Qwen/Qwen3-VL-2B-Instruct", tmp_path / "q3")
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "qwen3_vl" and config.text_config.hidden_size == 2048
    assert config.vision_config.patch_size == 16 and config.image_token_id == 151655
    proc = load_processor(str(out))
    assert proc.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    text = proc.apply_chat_template([{"role": "user", "content": Qwen3VL().user_content("hi")}], tokenize=False,
                                    add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi")


@pytest.mark.cli
@pytest.mark.slow
def test_one_row_end_to_end_with_random_weights(tmp_path):
    """``model=qwen3vl_tiny model.weights=random engine=transformers``: every row out once, and
    metrics.json says the weights were random."""
    out = tmp_path / "run"
    proc = run_cli(["model=qwen3vl_tiny", "model.weights=random", "engine=transformers", "data=demo",
                    "data.limit=1", "max_boxes=3", "sampling.max_tokens=8", f"hydra.run.dir={out}",
                    "progress=false"], env={"REGIONCAP_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["status"] in ("ok", "partial")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_weights"] == "random" and metrics["images"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["family"] == "qwen3_vl" and manifest["model"]["weights"] == "random"


def test_export_writes_each_familys_grounding_coordinates():
    from regioncap.export import family_for, grounding

    rec = {"input_size": [640, 480]}
    region = {"input_bbox": [160, 120, 480, 360]}
    assert grounding(region, rec, family_for("qwen3_vl")) == ([250, 250, 750, 750], '{"bbox_2d": [250, 250, 750, 750]}')
    assert grounding(region, rec, family_for("qwen2_5_vl")) == ([160, 120, 480, 360],
                                                               '{"bbox_2d": [160, 120, 480, 360]}')
    # A run recorded before model named its class: its model.family decides.
    assert type(family_for("qwen2_vl", {"name": "old", "family": "qwen2_vl"})) is Qwen2VL
    from regioncap.export import ExportError

    with pytest.raises(ExportError, match="no model family named 'llava'"):
        family_for("llava")


def test_a_user_model_option_written_before_families_still_runs(tmp_path, caplog):
    """``myconf/model/old.yaml`` from the old schema (``/schema/model/base``, ``family: qwen2_vl``, no
    ``_target_``) composes, and the run's checks type it as Qwen2-VL with a deprecation warning."""
    from regioncap.settings import check_config

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.yaml").write_text(
        "defaults:\n  - /schema/model/base@_here_\nname: old\npath: /models/old\nfamily: qwen2_vl\n")
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "model=old"], output_dir=tmp_path)
    with caplog.at_level("WARNING", logger="regioncap"):
        check_config(cfg)
    assert "deprecated" in caplog.text
    assert cfg.model._target_ == "regioncap.families.qwen.Qwen2VL" and "family" not in cfg.model
    assert type(build_family(cfg.model)) is Qwen2VL and cfg.model.max_pixels == 1280 * 28 * 28
