"""Tests for regioncap.draw: pixel checks of outlines, tags, dimming, and the drawing convention."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageColor, ImageFont

from regioncap.draw import (
    DEFAULT_PALETTE,
    DRAW_STYLE_FIELDS,
    DrawStyle,
    draw_marks,
    label_px,
    layout_marks,
    line_px,
    text_colour,
)

GREY = (128, 128, 128)


def rgb(colour: str) -> tuple[int, int, int]:
    return ImageColor.getrgb(colour)[:3]


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(int)


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(40, 216, (h, w, 3), dtype=np.uint8))


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """WCAG contrast ratio, written out independently of the module."""

    def lum(c):
        def ch(v):
            v = v / 255
            return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

        return 0.2126 * ch(c[0]) + 0.7152 * ch(c[1]) + 0.0722 * ch(c[2])

    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


# --------------------------------------------------------------------------- style


def test_style_is_the_typed_draw_config() -> None:
    """DrawStyle holds every key of the draw schema (less its name), with the schema's defaults."""
    from dataclasses import asdict

    from regioncap.config import DrawConfig

    schema = {k: v for k, v in asdict(DrawConfig()).items() if k != "name"}
    assert set(DRAW_STYLE_FIELDS) == set(schema)
    assert asdict(DrawStyle()) == schema


@pytest.mark.parametrize("option", ["default", "thin", "dataflow"])
def test_style_from_each_shipped_draw_option(compose_cfg, option: str) -> None:
    section = compose_cfg([f"draw={option}"]).draw
    style = DrawStyle.from_config(section)
    assert asdict_style(style) == {k: (list(v) if k == "palette" else v) for k, v in section.items() if k != "name"}


def asdict_style(style: DrawStyle) -> dict:
    from dataclasses import asdict

    return asdict(style)


def test_style_defaults() -> None:
    style = DrawStyle()
    assert style.palette == list(DEFAULT_PALETTE) and len(set(style.palette)) == 10
    assert (style.line_width, style.min_line_px, style.label_size, style.min_label_px, style.dim) == (
        0.008, 2, 0.045, 10, 0.0,
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"palette": []}, "palette"),
        ({"palette": ["#ff0000", "notacolour"]}, "palette"),
        ({"image_format": "gif"}, "image_format"),
        ({"label_format": "{m}"}, "label_format"),
        ({"label_size": 100.0}, "label_size"),
        ({"min_line_px": 100000}, "min_line_px"),
        ({"dim": 1.5}, "dim"),
        ({"dim": -0.1}, "dim"),
        ({"line_width": 0}, "line_width"),
        ({"min_label_px": 0}, "min_label_px"),
    ],
)
def test_style_validation_names_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        DrawStyle(**kwargs)


def test_style_accepts_any_sequence_palette() -> None:
    assert DrawStyle(palette=("red", "#00ff00")).palette == ["red", "#00ff00"]


def test_sizes_scale_with_shorter_side() -> None:
    style = DrawStyle()
    assert (line_px(224, 224, style), label_px(224, 224, style)) == (2, 10)
    assert (line_px(448, 448, style), label_px(448, 448, style)) == (4, 20)
    assert (line_px(1120, 1120, style), label_px(1120, 1120, style)) == (9, 50)
    assert (line_px(2000, 500, style), label_px(2000, 500, style)) == (4, 22)
    assert (line_px(56, 56, style), label_px(56, 56, style)) == (2, 10)  # the minimums


def test_default_font_is_scalable() -> None:
    font = ImageFont.load_default(size=17)
    assert isinstance(font, ImageFont.FreeTypeFont)
    assert font.size == 17


def test_text_colour_has_the_higher_contrast() -> None:
    for colour in list(DEFAULT_PALETTE) + ["#ffff00", "#000080", "#808080", "#ffffff", "#000000"]:
        c = rgb(colour)
        chosen = text_colour(c)
        other = (255, 255, 255) if chosen == (0, 0, 0) else (0, 0, 0)
        assert chosen in ((0, 0, 0), (255, 255, 255))
        assert contrast(c, chosen) >= contrast(c, other)
    assert text_colour(rgb("#4363d8")) == (255, 255, 255)  # blue: white text
    assert text_colour(rgb("#bfef45")) == (0, 0, 0)  # lime: black text


# --------------------------------------------------------------------------- the convention (snapshot)


def test_outline_convention_snapshot() -> None:
    """Outline lies inside the box: columns round(x1)..+w-1 and round(x2)-w..round(x2)-1.

    A failure here means the drawing convention changed: update the module docstring too.
    """
    img = Image.new("RGB", (40, 30), (255, 255, 255))
    style = DrawStyle(palette=["#ff0000"])
    out = arr(draw_marks(img, [(5, 6, 25, 20)], [""], style))
    red = np.all(out == (255, 0, 0), axis=-1)
    expected = np.zeros((30, 40), bool)
    expected[6:20, 5:25] = True
    expected[8:18, 7:23] = False  # line width 2 (the minimum at this size)
    assert np.array_equal(red, expected)
    assert np.all(out[~expected] == 255)


def test_fractional_boxes_round_to_nearest_pixel_edge() -> None:
    img = Image.new("RGB", (40, 30), (255, 255, 255))
    out = arr(draw_marks(img, [(4.6, 5.5, 24.6, 19.6)], [""], DrawStyle(palette=["#ff0000"])))
    red = np.all(out == (255, 0, 0), axis=-1)
    ys, xs = np.nonzero(red)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (5, 6, 24, 19)


def test_box_objects_and_sequences_draw_the_same() -> None:
    @dataclasses.dataclass(frozen=True)
    class Box:
        x1: float
        y1: float
        x2: float
        y2: float

    img = noise(64, 48)
    style = DrawStyle()
    a = draw_marks(img, [Box(3, 4, 40, 30)], ["1"], style)
    b = draw_marks(img, [[3, 4, 40, 30]], ["1"], style)
    assert a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------- outlines and interiors


def test_outline_pixels_have_palette_colours_along_edges() -> None:
    img = Image.new("RGB", (448, 448), GREY)
    boxes = [(40, 60, 200, 220), (250, 100, 420, 300), (100, 310, 300, 440)]
    style = DrawStyle()
    out = draw_marks(img, boxes, ["", "", ""], style)
    lw = line_px(448, 448, style)
    assert lw == 4
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        colour = rgb(style.palette[i])
        for t in np.linspace(0.1, 0.9, 9):
            x = int(x1 + t * (x2 - x1))
            y = int(y1 + t * (y2 - y1))
            for point in [(x, y1 + lw // 2), (x, y2 - 1 - lw // 2), (x1 + lw // 2, y), (x2 - 1 - lw // 2, y)]:
                assert out.getpixel(point) == colour, (i, point)
            # Just outside the box and just inside the line: untouched (the boxes are apart).
            for point in [(x, y1 - 1), (x, y1 + lw), (x1 - 1, y), (x1 + lw, y), (x2, y), (x2 - 1 - lw, y)]:
                assert out.getpixel(point) == GREY, (i, point)


def test_interior_keeps_original_pixels_outside_tags() -> None:
    img = noise(300, 200, seed=1)
    boxes = [(20, 40, 150, 180), (160, 10, 290, 120)]
    style = DrawStyle()
    out = draw_marks(img, boxes, ["1", "2"], style)
    before, after = arr(img), arr(out)
    changed = np.any(before != after, axis=-1)
    lw = line_px(300, 200, style)
    allowed = np.zeros_like(changed)
    for mark in layout_marks(300, 200, boxes, ["1", "2"], style):
        left, top, right, bottom = mark.outline
        allowed[top : bottom + 1, left : right + 1] = True
        allowed[top + lw : bottom + 1 - lw, left + lw : right + 1 - lw] = False
        x0, y0, x1, y1 = mark.tag
        allowed[y0:y1, x0:x1] = True
    # Nothing changes except outline bands and tags...
    assert not np.any(changed & ~allowed)
    # ...and the outline bands are all changed to the box colour.
    for mark in layout_marks(300, 200, boxes, ["1", "2"], style):
        left, top, right, bottom = mark.outline
        assert np.all(after[top, left : right + 1] == mark.colour)


def test_box_on_image_border_is_fully_visible() -> None:
    img = Image.new("RGB", (100, 80), GREY)
    style = DrawStyle(palette=["#3cb44b"])
    green = rgb("#3cb44b")
    for box in [(0, 0, 100, 80), (-20, -20, 130, 95)]:
        out = arr(draw_marks(img, [box], [""], style))
        assert np.all(out[0, :] == green) and np.all(out[-1, :] == green)
        assert np.all(out[:, 0] == green) and np.all(out[:, -1] == green)
        assert np.all(out[40, 10] == GREY)


def test_palette_cycles() -> None:
    style = DrawStyle(palette=["#ff0000", "#00ff00", "#0000ff"])
    marks = layout_marks(100, 100, [(0, 0, 10, 10)] * 5, [""] * 5, style)
    assert [m.colour for m in marks] == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 0), (0, 255, 0)]


# --------------------------------------------------------------------------- tags


@pytest.mark.parametrize("size", [224, 448, 1120])
def test_tag_is_filled_with_box_colour_and_contrasting_text(size: int) -> None:
    img = Image.new("RGB", (size, size), GREY)
    style = DrawStyle()
    s = size / 224
    boxes = [(40 * s, 60 * s, 150 * s, 200 * s), (120 * s, 30 * s, 210 * s, 110 * s)]
    labels = ["1", "12"]
    out = arr(draw_marks(img, boxes, labels, style))
    for mark in layout_marks(size, size, boxes, labels, style):
        x0, y0, x1, y1 = mark.tag
        patch = out[y0:y1, x0:x1].reshape(-1, 3)
        is_tag = np.all(patch == mark.colour, axis=-1)
        is_text = np.all(np.abs(patch - mark.text_colour) <= 10, axis=-1)
        assert is_tag.mean() > 0.5, "tag background should be the majority"
        assert is_text.sum() >= 3, "some pixels should be the text colour"
        assert mark.text_colour == text_colour(mark.colour)


def test_tag_goes_above_the_box_when_there_is_room_else_inside() -> None:
    style = DrawStyle()
    (above,) = layout_marks(224, 224, [(50, 100, 150, 200)], ["1"], style)
    assert above.tag[3] == 100 and above.tag[0] == 50  # bottom edge on the box's top edge
    (inside,) = layout_marks(224, 224, [(50, 2, 150, 200)], ["1"], style)
    assert inside.tag[1] == 2 and inside.tag[0] == 50


def test_tags_avoid_each_other() -> None:
    style = DrawStyle()
    boxes = [(50, 100, 150, 200), (50, 100, 150, 200), (52, 101, 148, 199)]
    marks = layout_marks(224, 224, boxes, ["1", "2", "3"], style)
    tags = [m.tag for m in marks]
    for i in range(3):
        for j in range(i):
            a, b = tags[i], tags[j]
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (i, j, tags)


CORNER_BOXES = {
    "top-left": (0, 0, 60, 50),
    "top-right": (164, 0, 224, 50),
    "bottom-left": (0, 174, 60, 224),
    "bottom-right": (164, 174, 224, 224),
    "tiny-bottom-right": (220, 220, 224, 224),
    "whole-image": (0, 0, 224, 224),
}


@pytest.mark.parametrize("where", sorted(CORNER_BOXES))
@pytest.mark.parametrize("label", ["7", "<region12>"])
def test_tags_stay_inside_the_image_at_every_corner(where: str, label: str) -> None:
    style = DrawStyle()
    box = CORNER_BOXES[where]
    (mark,) = layout_marks(224, 224, [box], [label], style)
    x0, y0, x1, y1 = mark.tag
    assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
    out = arr(draw_marks(Image.new("RGB", (224, 224), GREY), [box], [label], style))
    patch = out[y0:y1, x0:x1].reshape(-1, 3)
    assert np.any(np.abs(patch - mark.text_colour).max(axis=-1) <= 10)  # text drawn where the tag is


@settings(max_examples=150, deadline=None)
@given(
    st.integers(30, 400), st.integers(30, 400),
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=6),
    st.sampled_from(["1", "12", "<region3>"]),
)
def test_layout_always_inside_image(w, h, rel_boxes, label) -> None:
    boxes = []
    for a, b, c, d in rel_boxes:
        x1, x2 = sorted((a * w, c * w))
        y1, y2 = sorted((b * h, d * h))
        boxes.append((x1, y1, x2, y2))
    style = DrawStyle()
    for mark in layout_marks(w, h, boxes, [label] * len(boxes), style):
        left, top, right, bottom = mark.outline
        assert 0 <= left <= right < w and 0 <= top <= bottom < h
        x0, y0, x1, y1 = mark.tag
        tw, th = x1 - x0, y1 - y0
        if tw <= w and th <= h:
            assert 0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h


def test_empty_label_draws_no_tag_and_mismatch_raises() -> None:
    (mark,) = layout_marks(100, 100, [(10, 10, 50, 50)], [""], DrawStyle())
    assert mark.tag is None
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        draw_marks(Image.new("RGB", (10, 10)), [(0, 0, 5, 5), (1, 1, 4, 4)], ["1"], DrawStyle())


# --------------------------------------------------------------------------- dim and purity


def test_dim_darkens_outside_only() -> None:
    img = noise(200, 160, seed=2)
    box = (50, 40, 150, 120)
    style = DrawStyle(dim=0.5)
    out = arr(draw_marks(img, [box], [""], style))
    before = arr(img)
    lw = line_px(200, 160, style)
    outside = np.ones((160, 200), bool)
    outside[40:120, 50:150] = False
    assert np.all(np.abs(out[outside] - before[outside] * 0.5) <= 1)
    inner = (slice(40 + lw, 120 - lw), slice(50 + lw, 150 - lw))
    assert np.array_equal(out[inner], before[inner])


def test_dim_zero_and_one() -> None:
    img = noise(60, 40, seed=3)
    box = (10, 10, 30, 30)
    plain = arr(draw_marks(img, [box], [""], DrawStyle(dim=0.0)))
    assert np.array_equal(plain[:, 40:], arr(img)[:, 40:])
    black = arr(draw_marks(img, [box], [""], DrawStyle(dim=1.0)))
    assert np.all(black[:, 40:] == 0)


def test_input_is_not_modified_and_output_is_rgb() -> None:
    img = noise(80, 60, seed=4)
    before = img.tobytes()
    out = draw_marks(img, [(10, 10, 50, 40)], ["1"], DrawStyle(dim=0.3))
    assert img.tobytes() == before
    assert out is not img and out.mode == "RGB" and out.size == img.size
    grey = Image.new("L", (40, 30), 100)
    out = draw_marks(grey, [(5, 5, 20, 20)], ["1"], DrawStyle())
    assert grey.mode == "L" and out.mode == "RGB"
    no_boxes = draw_marks(img, [], [], DrawStyle(dim=0.5))
    assert no_boxes is not img and no_boxes.tobytes() == before


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="0123456789abcXYZ[]()#- \n", min_size=1, max_size=6),
    font_px=st.integers(8, 60),
    colour=st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
    ink=st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
    x=st.integers(-20, 90),
    y=st.integers(-20, 90),
    seed=st.integers(0, 3),
)
# Multiline text whose ink box is a pixel short of what ImageDraw.text draws.
@example(text="\n\n0", font_px=8, colour=(0, 0, 0), ink=(0, 0, 0), x=0, y=0, seed=0)
@example(text=" ", font_px=12, colour=(0, 0, 0), ink=(255, 255, 255), x=5, y=5, seed=0)
def test_cached_label_mask_draws_what_imagedraw_text_draws(text, font_px, colour, ink, x, y, seed) -> None:
    """A tag's text drawn from the cached mask is byte-identical to plain stroked ImageDraw.text,
    for any text, size, colours and position (also partly off the image)."""
    from PIL import ImageDraw

    from regioncap.draw import _font, _ink_box, _label_mask, _stroke

    background = noise(96, 80, seed)
    background.paste(colour, (10, 10, 60, 50))
    expected, got = background.copy(), background.copy()
    box = _ink_box("RGB", text, font_px)
    ImageDraw.Draw(expected).text(
        (x - box[0], y - box[1]), text, font=_font(font_px), fill=ink,
        stroke_width=_stroke(font_px), stroke_fill=ink,
    )
    label = _label_mask("RGB", text, font_px)
    if label is not None:
        mask, (dx, dy) = label
        ImageDraw.Draw(got).bitmap((x + dx, y + dy), mask, fill=ink)
    assert got.tobytes() == expected.tobytes()
    # Visible text has a mask: the comparison above is not between two undrawn images.
    assert (label is not None) == bool(text.strip())
