"""InternVL3.5's family facts: the tiling rule, the size the model sees, its visual tokens, the 0-1000
``<ref>/<box>`` coordinates (round trip and parser) and the chat template (unit tier: no model)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regioncap.families.internvl import GROUNDING_PROMPT, InternVL35, grounding_text, tile_grid
from regioncap.families.internvl_files import CHAT_TEMPLATE

ARCHS = Path(__file__).resolve().parents[1] / "regioncap" / "archs"


def family(min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448) -> InternVL35:
    return InternVL35(SimpleNamespace(min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size,
                                      patch_size=14, merge_size=2))


sizes = st.integers(1, 8000)
budgets = st.integers(1, 6).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, 16)))


@pytest.fixture(scope="module")
def hf_canvas():
    """transformers' tiling rule (its PIL GotOcr2 module: no torchvision; imports torch, once)."""
    mod = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    return mod.get_optimal_tiled_canvas


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@settings(max_examples=200, deadline=None)
@given(sizes, sizes, budgets)
def test_tile_grid_is_transformers_rule(hf_canvas, w, h, budget) -> None:
    lo, hi = budget
    assert tile_grid(w, h, lo, hi) == tuple(hf_canvas((h, w), (448, 448), lo, hi))


@settings(max_examples=150, deadline=None)
@given(sizes, sizes, budgets)
def test_the_grid_size_maps_to_itself(w, h, budget) -> None:
    """Marks are drawn at the grid's size; the processor must pick the same grid there (no second resize)."""
    fam = family(*budget)
    tw, th = fam.input_size(w, h)
    assert tw % 448 == 0 and th % 448 == 0
    assert budget[0] <= (tw // 448) * (th // 448) <= budget[1]
    assert fam.input_size(tw, th) == (tw, th)
    assert fam.is_fixed_size(tw, th)
    assert fam.visual_tokens(tw, th) == fam.visual_tokens(w, h)


@settings(max_examples=150, deadline=None)
@given(sizes, sizes, st.integers(1, 15))
def test_up_to_15_tiles_the_grid_is_internvls_own(w, h, max_tiles) -> None:
    cols, rows = tile_grid(w, h, 1, max_tiles)
    assert family(1, max_tiles).input_size(w, h) == (cols * 448, rows * 448)


def test_from_16_tiles_the_grid_is_followed_to_a_fixed_point() -> None:
    # A square image gets 3x3; an image of 3x3's size covers over half of 4x4, which then wins.
    assert tile_grid(1000, 1000, 1, 16) == (3, 3)
    assert tile_grid(1344, 1344, 1, 16) == (4, 4)
    assert family(1, 16).input_size(1000, 1000) == (1792, 1792)
    assert family(1, 16).visual_tokens(1000, 1000) == 17 * 256


@pytest.mark.parametrize("size, max_tiles, grid, tokens", [
    ((448, 448), 12, (1, 1), 256),          # one tile: no thumbnail
    ((640, 480), 12, (4, 3), 13 * 256),     # an exact 4:3 grid wins, small image or not (upscaled)
    ((640, 480), 4, (1, 1), 256),           # 4:3 within 4 tiles: 1x1 and 2x2 tie; the image covers under half of 2x2
    ((1200, 1200), 4, (2, 2), 5 * 256),     # the same tie, an image over half of 2x2: the larger grid
    ((896, 448), 12, (2, 1), 3 * 256),
    ((300, 900), 12, (1, 3), 4 * 256),
    ((5000, 10), 12, (12, 1), 13 * 256),    # extreme aspect: the widest grid, no refusal
])
def test_published_budget_examples(size, max_tiles, grid, tokens) -> None:
    fam = family(1, max_tiles)
    assert tile_grid(*size, 1, max_tiles) == grid
    assert fam.input_size(*size) == (grid[0] * 448, grid[1] * 448)
    assert fam.visual_tokens(*size) == tokens


def test_budget_in_tiles() -> None:
    one = family(1, 1)
    assert one.input_size(4000, 3000) == (448, 448) and one.visual_tokens(4000, 3000) == 256
    assert family(4, 4).input_size(448, 448) == (896, 896)   # min_tiles forces a 2x2 grid
    assert family(1, 12, tile_size=56).tokens_per_tile() == 4
    with pytest.raises(ValueError, match="min_tiles"):
        family(3, 2).input_size(100, 100)
    settings_ = family(2, 6).processor_kwargs()
    assert settings_ == {"crop_to_patches": True, "min_patches": 2, "max_patches": 6,
                         "size": {"height": 448, "width": 448}}
    assert family(2, 6).mm_processor_kwargs() == {"min_patches": 2, "max_patches": 6}
    text = family(1, 1).expand_images("a<IMG_CONTEXT>\nb", 4000, 3000)
    assert text == "a<img>" + "<IMG_CONTEXT>" * 256 + "</img>\nb"


# ----------------------------------------------------------------------------- coordinates

def _box_in(w: int, h: int):
    xs = st.floats(0, w, allow_nan=False)
    ys = st.floats(0, h, allow_nan=False)
    return st.tuples(xs, ys, xs, ys).filter(lambda b: b[2] - b[0] >= 2 and b[3] - b[1] >= 2)


@settings(max_examples=150, deadline=None)
@given(st.integers(448, 5376), st.integers(448, 5376), st.data())
def test_coordinates_round_trip(w, h, data) -> None:
    """boxes -> InternVL's text -> boxes: within half a grid step of the box (1000 steps a side)."""
    fam = family()
    box = data.draw(_box_in(w, h))
    text = "<ref>region</ref>" + fam.box_text(box, (w, h))
    (p,) = fam.parse_grounding(text, w, h, min_size=0)
    for got, want, side in zip(p.bbox, box, (w, h, w, h)):
        assert abs(got - want) <= side / 2000 + 1e-6
    assert p.label == "region"


@pytest.mark.parametrize("w, h", [(448, 448), (1792, 448), (448, 1344), (1344, 896), (997, 211)])
def test_corners_and_edges_are_exact(w, h) -> None:
    fam = family()
    cases = {
        (0, 0, w, h): [0, 0, 1000, 1000],                  # the whole image
        (0, 0, w / 10, h / 10): [0, 0, 100, 100],          # the top-left corner
        (w * 0.9, h * 0.9, w, h): [900, 900, 1000, 1000],  # the bottom-right corner
        (0, h / 2, w, h): [0, 500, 1000, 1000],            # the bottom half (left and right edges)
        (-5, -5, w + 5, h + 5): [0, 0, 1000, 1000],        # spilling over: clamped
    }
    for box, coords in cases.items():
        assert fam.box_coords(box, (w, h)) == coords
        (p,) = fam.parse_grounding(f"<ref>x</ref>{fam.box_text(box, (w, h))}", w, h)
        assert p.bbox == pytest.approx(tuple(c / 1000 * s for c, s in zip(coords, (w, h, w, h))))


def test_box_text_snapshot() -> None:
    fam = family()
    assert fam.box_text((0, 0, 896, 448), (896, 448)) == "<box>[[0, 0, 1000, 1000]]</box>"
    assert fam.box_text((224, 112, 448, 336), (896, 448)) == "<box>[[250, 250, 500, 750]]</box>"
    assert fam.grounding_prompt() == GROUNDING_PROMPT
    assert fam.grounding_constraint("regex", 50) == {} and fam.grounding_constraint("json", 50) == {}


def test_parser_reads_internvl_answers() -> None:
    fam = family()
    w, h = 2000, 1000
    answer = ("Here:\n<ref>cat</ref><box>[[0, 0, 500, 500]]</box>\n"
              "<ref>two dogs</ref><box>[[500, 500, 750, 1000], [750, 0, 1000, 500]]</box>\n"
              "<box>[[100, 100, 200, 200]]</box>")
    got = [(p.label, p.bbox) for p in fam.parse_grounding(answer, w, h)]
    assert got == [("cat", (0, 0, 1000, 500)), ("two dogs", (1000, 500, 1500, 1000)),
                   ("two dogs", (1500, 0, 2000, 500)), (None, (200, 100, 400, 200))]
    # The same answer decoded with the special tokens skipped.
    stripped = "cat[[0, 0, 500, 500]]\ntwo dogs[[500, 500, 750, 1000], [750, 0, 1000, 500]]"
    got = [(p.label, p.bbox) for p in fam.parse_grounding(stripped, w, h)]
    assert got == [("cat", (0, 0, 1000, 500)), ("two dogs", (1000, 500, 1500, 1000)),
                   ("two dogs", (1500, 0, 2000, 500))]
    # Corners swapped, out of range, too small, not numbers.
    got = fam.parse_grounding("<ref>a</ref><box>[[500, 500, 0, 0]]</box><ref>b</ref><box>[[-10, 900, 1200, 1100]]"
                              "</box><ref>c</ref><box>[[1, 1, 1, 1]]</box><ref>d</ref><box>[[a, b, c, d]]</box>",
                              w, h)
    assert [(p.label, p.bbox) for p in got] == [("a", (0, 0, 1000, 500)), ("b", (0, 900, 2000, 1000))]
    assert all(p.source == "vlm" for p in got)
    # Neither form: JSON on the same grid, as the shared parser reads it.
    got = fam.parse_grounding('```json\n[{"bbox_2d": [0, 0, 500, 500], "label": "cat"}]\n```', w, h)
    assert [(p.label, p.bbox) for p in got] == [("cat", (0, 0, 1000, 500))]


@pytest.mark.parametrize("text", [None, "", "   ", 42, "no boxes here", "<ref>x</ref><box>[[1, 2, 3]]</box>",
                                  "<box>" * 10000, "[[" * 10000, "<ref>" * 5000 + "</ref><box>[[0,0,9,9]]</box>"])
def test_parser_never_raises(text) -> None:
    out = family().parse_grounding(text, 100, 100)
    assert isinstance(out, list)


def test_parser_bounds_hostile_answers() -> None:
    huge = "<ref>x</ref><box>[" + ", ".join(["[0, 0, 10, 10]"] * 5000) + "]</box>"
    assert len(family().parse_grounding(huge, 100, 100)) == 1000
    with pytest.raises(ValueError, match="width"):
        family().parse_grounding("x", 0, 10)


def test_grounding_text_parses_back() -> None:
    fam = family()
    text = grounding_text([("a", [0, 0, 10, 10]), ("b", [10, 20, 30, 40])])
    assert text == "<ref>a</ref><box>[[0, 0, 10, 10]]</box>\n<ref>b</ref><box>[[10, 20, 30, 40]]</box>"
    assert [p.label for p in fam.parse_grounding(text, 1000, 1000)] == ["a", "b"]


# ----------------------------------------------------------------------------- chat and archs

def test_chat_template_snapshot() -> None:
    """The ``-HF`` checkpoints' template: no system turn, ``<IMG_CONTEXT>`` then a newline before the text."""
    jinja2 = pytest.importorskip("jinja2")
    fam = family()
    text = jinja2.Environment().from_string(CHAT_TEMPLATE).render(
        messages=[{"role": "user", "content": fam.user_content("Describe region 1.")}], add_generation_prompt=True)
    assert text == "<|im_start|>user\n<IMG_CONTEXT>\nDescribe region 1.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("folder", sorted(InternVL35.archs.values()))
def test_arch_folders(folder) -> None:
    cfg = json.loads((ARCHS / folder / "config.json").read_text())
    pre = json.loads((ARCHS / folder / "preprocessor_config.json").read_text())
    assert cfg["model_type"] in InternVL35.model_types
    assert cfg["architectures"] == [InternVL35.transformers_class]
    assert cfg["image_token_id"] == 151671 and cfg["image_seq_length"] == 256 and cfg["downsample_ratio"] == 0.5
    assert cfg["vision_config"]["image_size"] == [448, 448] and cfg["vision_config"]["patch_size"] == [14, 14]
    assert cfg["text_config"]["model_type"] == "qwen3" and cfg["text_config"]["vocab_size"] == 151936
    assert (pre["size"], pre["min_patches"], pre["max_patches"], pre["crop_to_patches"]) == (
        {"height": 448, "width": 448}, 1, 12, True)


def test_tiles_are_in_the_run_key(compose_cfg) -> None:
    """A resume with another tile budget is another run; the Qwen families' keys do not change."""
    from regioncap.rundir import run_key_values

    a = run_key_values(compose_cfg(["model=internvl35_1b"]))["model"]
    b = run_key_values(compose_cfg(["model=internvl35_1b", "model.max_tiles=4"]))["model"]
    assert (a["family"], a["min_tiles"], a["max_tiles"], a["tile_size"]) == ("internvl", 1, 12, 448)
    assert b["max_tiles"] == 4
    assert not set(run_key_values(compose_cfg(["model=qwen25vl_3b"]))["model"]) & {"min_tiles", "max_tiles"}


def test_a_tile_budget_that_cannot_be_met_is_refused_before_the_run(compose_cfg) -> None:
    from regioncap.errors import RunError
    from regioncap.settings import check_config

    with pytest.raises(RunError, match=r"model.max_tiles \(2\) is under model.min_tiles \(3\)"):
        check_config(compose_cfg(["model=internvl35_1b", "model.min_tiles=3", "model.max_tiles=2"]))
    with pytest.raises(RunError, match="model.max_tiles must be a whole number >= 1"):
        check_config(compose_cfg(["model=internvl35_1b", "model.max_tiles=0"]))
