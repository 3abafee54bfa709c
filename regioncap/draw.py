"""Draw numbered region marks (box outlines and label tags) on the image the model sees.

Pure library code: Pillow only (no Hydra, W&B, torch or transformers).

Drawing convention (snapshotted in tests/test_draw.py; a change is a deliberate diff):

* Boxes are ``(x1, y1, x2, y2)`` in the pixels of the image passed in, with
  ``x2``/``y2`` the right/bottom edges. The caller resizes the image to the
  model's input size and scales the boxes first, so line width and label size
  are what the model sees.
* The outline lies INSIDE the box: its outer edge is the box edge, covering
  columns ``round(x1) .. round(x1) + w - 1`` and ``round(x2) - w .. round(x2) - 1``
  (likewise for rows), clamped to the image, so a box on the border is fully drawn.
* All outlines are drawn first, then all label tags, so a later box's outline
  never crosses an earlier label.
* A tag sits at the box's top-left corner, above the box when there is room,
  else inside it; it moves to another corner if it would cover an earlier tag,
  and is always shifted fully inside the image.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import PIL
from PIL import Image, ImageColor, ImageDraw, ImageEnhance, ImageFont

from regioncap.components import range_problems
from regioncap.config import DEFAULT_PALETTE, DrawConfig
from regioncap.images import box_xyxy

__all__ = [
    "DEFAULT_PALETTE",
    "DRAW_STYLE_FIELDS",
    "DrawStyle",
    "line_px",
    "label_px",
    "draw_marks",
    "layout_marks",
    "MarkLayout",
    "text_colour",
]

@dataclass
class DrawStyle:
    """How region marks look and how the images are written: the typed ``draw`` config section.

    Sizes are fractions of the image's shorter side. :meth:`from_config` builds
    it from a ``draw`` section; its fields are that section's (less ``name``).
    """

    #: Box colours, cycled per region (any Pillow colour string).
    palette: list[str] = field(default_factory=lambda: list(DEFAULT_PALETTE))
    #: Outline width as a fraction of the shorter side, at least ``min_line_px``.
    line_width: float = 0.008
    min_line_px: int = 2
    #: Label font size as a fraction of the shorter side, at least ``min_label_px``.
    label_size: float = 0.045
    min_label_px: int = 10
    #: Darken pixels outside all boxes by this factor (0 = off, 1 = black).
    dim: float = 0.0
    #: Label text: ``{n}`` is the region number shown to the model.
    label_format: str = "{n}"
    #: Encoding of written images: ``jpeg`` or ``png``.
    image_format: str = "jpeg"
    jpeg_quality: int = 92

    @classmethod
    def from_config(cls, section: Any) -> "DrawStyle":
        """The style of a ``draw`` section: the typed :class:`~regioncap.config.DrawConfig`, or the plain
        dict a run recorded (its keys that are fields here; values typed once)."""
        from regioncap.components import plain

        types = {"line_width": float, "label_size": float, "dim": float, "min_line_px": int,
                 "min_label_px": int, "jpeg_quality": int, "label_format": str, "image_format": str}
        values = plain(section)
        return cls(**{f: (list(values[f]) if f == "palette" else types[f](values[f]))
                      for f in DRAW_STYLE_FIELDS if f in values})

    def __post_init__(self) -> None:
        # Accept any sequence (an OmegaConf ListConfig too) and fail here, with
        # the field named, rather than on the first image. The ranges are the
        # draw section's (DrawConfig's field checks): one place for both.
        self.palette = [str(c) for c in self.palette]
        problems = range_problems({f.name: getattr(self, f.name) for f in fields(self)}, DrawConfig, "draw")
        if problems:
            raise ValueError("; ".join(problems))


#: Field names of :class:`DrawStyle`, for the config layer to map onto.
DRAW_STYLE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DrawStyle))


def line_px(width: int, height: int, style: DrawStyle) -> int:
    """Outline width in pixels for a ``width x height`` image."""
    return max(int(style.min_line_px), round(style.line_width * min(width, height)))


def label_px(width: int, height: int, style: DrawStyle) -> int:
    """Label font size in pixels for a ``width x height`` image."""
    return max(int(style.min_label_px), round(style.label_size * min(width, height)))


def text_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher WCAG contrast ratio with ``rgb``."""
    lum = _relative_luminance(rgb)
    on_black = (lum + 0.05) / 0.05
    on_white = 1.05 / (lum + 0.05)
    return (0, 0, 0) if on_black >= on_white else (255, 255, 255)


def _relative_luminance(rgb: tuple[int, int, int]) -> float:
    def channel(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.04045 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


# Pillow accepts fractional stroke widths from 11.1 on; before that they would be cut to 0.
_FRACTIONAL_STROKE = tuple(int(p) for p in PIL.__version__.split(".")[:2]) >= (11, 1)


def _stroke(font_px: int) -> float:
    """Extra stroke around glyphs, in pixels, growing with the font size.

    The bundled font's strokes are about 1 px wide at 10 px, so anti-aliasing leaves
    almost no pixel at the full text colour and digits are faint at a 224 px input;
    a fraction of a pixel of stroke makes them read as semi-bold.
    """
    width = max(0.4, round(font_px * 0.04, 1))
    return width if _FRACTIONAL_STROKE else int(round(width))


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow >= 10.1 bundles a scalable font (Aileron), so no system font files
    # are needed and the text looks the same on every machine.
    return ImageFont.load_default(size=size)


def _pixel_rect(box: Any, width: int, height: int) -> tuple[int, int, int, int]:
    """Inclusive pixel rectangle (left, top, right, bottom) of a box, clamped to the image."""
    x1, y1, x2, y2 = box_xyxy(box)
    left = min(max(round(x1), 0), width - 1)
    top = min(max(round(y1), 0), height - 1)
    right = min(max(round(x2) - 1, left), width - 1)
    bottom = min(max(round(y2) - 1, top), height - 1)
    return left, top, right, bottom


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    # Half-open (x, y, x_end, y_end) rectangles.
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_tag(
    rect: tuple[int, int, int, int],
    tag_w: int,
    tag_h: int,
    width: int,
    height: int,
    placed: list[tuple[int, int, int, int]],
) -> tuple[int, int, int, int]:
    """Choose where a tag goes; returns a half-open rectangle inside the image."""
    left, top, right, bottom = rect
    corners = [
        (left, top - tag_h),  # top-left, above the box
        (left, top),  # top-left, inside
        (right + 1 - tag_w, top - tag_h),  # top-right, above
        (right + 1 - tag_w, top),  # top-right, inside
        (left, bottom + 1),  # bottom-left, below
        (left, bottom + 1 - tag_h),  # bottom-left, inside
        (right + 1 - tag_w, bottom + 1),  # bottom-right, below
        (right + 1 - tag_w, bottom + 1 - tag_h),  # bottom-right, inside
    ]

    def shifted(x: int, y: int) -> tuple[int, int, int, int]:
        # max(0, ...) last: a tag wider than the image starts at the left edge.
        x = max(0, min(x, width - tag_w))
        y = max(0, min(y, height - tag_h))
        return x, y, x + tag_w, y + tag_h

    def free(r: tuple[int, int, int, int]) -> bool:
        return not any(_overlaps(r, p) for p in placed)

    # First a corner where the tag fits as is, then one where it fits once shifted
    # into the image; if every one covers an earlier tag, the preferred corner.
    for x, y in corners:
        fits = 0 <= x and x + tag_w <= width and 0 <= y and y + tag_h <= height
        if fits and free((x, y, x + tag_w, y + tag_h)):
            return x, y, x + tag_w, y + tag_h
    for x, y in corners:
        candidate = shifted(x, y)
        if free(candidate):
            return candidate
    above_fits = corners[0][1] >= 0
    return shifted(*(corners[0] if above_fits else corners[1]))


@dataclass(frozen=True)
class MarkLayout:
    """Where one region's mark goes, in pixels of the image it is drawn on."""

    #: Outline rectangle, inclusive ``(left, top, right, bottom)``, inside the image.
    outline: tuple[int, int, int, int]
    colour: tuple[int, int, int]
    #: Tag rectangle, half-open ``(x0, y0, x1, y1)``; None for an empty label.
    tag: tuple[int, int, int, int] | None
    text: str
    text_colour: tuple[int, int, int]


def layout_marks(
    width: int, height: int, boxes: Sequence[Any], labels: Sequence[str], style: DrawStyle
) -> list[MarkLayout]:
    """Compute outlines, colours and tag positions without drawing (what :func:`draw_marks` draws)."""
    if len(boxes) != len(labels):
        raise ValueError(f"got {len(boxes)} boxes but {len(labels)} labels")
    font_px = label_px(width, height, style)
    pad = _pad(font_px)
    placed: list[tuple[int, int, int, int]] = []
    marks = []
    for i, (box, label) in enumerate(zip(boxes, labels)):
        rect = _pixel_rect(box, width, height)
        colour = ImageColor.getrgb(style.palette[i % len(style.palette)])[:3]
        text = str(label)
        tag = None
        if text:
            # Tight ink box, so a tag hides as little of the image as possible.
            ink = _ink_box("1", text, font_px)
            tag_w = ink[2] - ink[0] + 2 * pad
            tag_h = ink[3] - ink[1] + 2 * pad
            tag = _place_tag(rect, tag_w, tag_h, width, height, placed)
            placed.append(tag)
        marks.append(MarkLayout(rect, colour, tag, text, text_colour(colour)))
    return marks


@functools.lru_cache(maxsize=4096)
def _ink_box(mode: str, text: str, font_px: int) -> tuple[int, int, int, int]:
    """The ink box of ``text`` at ``font_px`` as measured on an image of ``mode`` (its font mode).

    Cached: labels repeat ("1", "2"...) on every image, and measuring is a text layout each time.
    """
    draw = ImageDraw.Draw(Image.new(mode, (1, 1)))
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=_font(font_px), stroke_width=_stroke(font_px))
    # Whole pixels, rounded outward: a fractional stroke gives a fractional box.
    return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


def _pad(font_px: int) -> int:
    return max(1, round(font_px * 0.2))


def draw_marks(
    image: Image.Image, boxes: Sequence[Any], labels: Sequence[str], style: DrawStyle
) -> Image.Image:
    """Return a new RGB image with box ``i`` outlined and tagged with ``labels[i]``.

    Box ``i`` uses ``style.palette[i % len(palette)]``; its tag is filled with the
    same colour and the text is black or white, whichever contrasts more. An empty
    label draws no tag. ``image`` is not modified.
    """
    out = image.convert("RGB")  # always a copy, even for an RGB input
    width, height = out.size
    marks = layout_marks(width, height, boxes, labels, style)

    if style.dim > 0 and marks:
        inside = Image.new("L", out.size, 0)
        mask_draw = ImageDraw.Draw(inside)
        for mark in marks:
            mask_draw.rectangle(mark.outline, fill=255)
        darker = ImageEnhance.Brightness(out).enhance(1.0 - style.dim)
        out = Image.composite(out, darker, inside)

    draw = ImageDraw.Draw(out)
    lw = line_px(width, height, style)
    for mark in marks:
        # Pillow grows the outline inward from the given rectangle: see the module docstring.
        draw.rectangle(mark.outline, outline=mark.colour, width=lw)

    font_px = label_px(width, height, style)
    pad = _pad(font_px)
    for mark in marks:
        if mark.tag is None:
            continue
        x0, y0, x1, y1 = mark.tag
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=mark.colour)
        # The text's ink box starts at (x0 + pad, y0 + pad); the mask is placed relative to it.
        label = _label_mask(out.mode, mark.text, font_px)
        if label is not None:
            mask, (dx, dy) = label
            draw.bitmap((x0 + pad + dx, y0 + pad + dy), mask, fill=mark.text_colour)
    return out


@functools.lru_cache(maxsize=1024)
def _label_mask(mode: str, text: str, font_px: int) -> tuple[Image.Image, tuple[int, int]] | None:
    """The coverage mask of ``text`` stroked at ``font_px`` as ImageDraw.text draws it on an image of
    ``mode``, cropped to its nonzero pixels, and where it goes relative to the text's ink box
    (:func:`_ink_box`); None for text that covers no pixel.

    Cached: labels repeat ("1", "2"...) on every image and rendering stroked text is most of a
    tag's cost. Drawing the mask with ``ImageDraw.bitmap`` and the text colour is pixel-identical
    to ``ImageDraw.text``: the stroke and fill share one ink, so that draws just this one mask, and
    drawing it with ink 255 on a zero ``L`` image stores the coverage values unchanged. Rendered
    with a margin because the ink box of multiline text can be a pixel short of what is drawn.
    Callers must not modify the returned image.
    """
    ink = _ink_box(mode, text, font_px)
    margin = font_px
    canvas = Image.new("L", (ink[2] - ink[0] + 2 * margin, ink[3] - ink[1] + 2 * margin), 0)
    ImageDraw.Draw(canvas).text(
        (margin - ink[0], margin - ink[1]), text, font=_font(font_px), fill=255,
        stroke_width=_stroke(font_px), stroke_fill=255,
    )
    covered = canvas.getbbox()
    if covered is None:
        return None
    return canvas.crop(covered), (covered[0] - margin, covered[1] - margin)
