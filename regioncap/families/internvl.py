"""InternVL3.5 (transformers-native ``-HF`` checkpoints): 448 px tiles, ``<ref>/<box>`` grounding on 0-1000.

What differs from Qwen2.5-VL, and where regioncap's correctness depends on it:

- pixels: the image processor (transformers' ``GotOcr2ImageProcessor`` with
  ``crop_to_patches``) picks a grid of ``cols x rows`` tiles of 448 px whose
  aspect ratio is closest to the image's (ties go to the larger grid while the
  image covers more than half of it), with ``min_tiles <= cols * rows <=
  max_tiles``; it resizes the image to ``cols*448 x rows*448``, cuts the tiles,
  and, when there is more than one, adds a thumbnail: the whole image squashed
  to 448 x 448. Every tile costs 256 visual tokens (448 / 14 = 32 patches a side,
  pixel-shuffled 2 x 2 to 16 x 16).

  **The resolution the model sees** is the tiling grid's size,
  ``cols*448 x rows*448``: regioncap resizes the image there before drawing marks
  (:meth:`InternVL35.input_size`), so every tile the processor cuts is an exact
  448 x 448 crop of the marked image and no mark is resampled inside a tile. Up
  to 15 tiles the grid rule maps such an image to the same grid (the other grids
  of its ratio are smaller, or more than twice its area), so the processor does
  not resize it again; from 16 tiles on a few grids are not fixed points (3 x 3
  becomes 4 x 4) and :func:`grid_size` follows the rule to the grid that is. The
  thumbnail is the one view where the marks are scaled
  (down, by ``cols`` and ``rows``); coordinates are relative (0-1000), so they
  mean the same box in the tiles and in the thumbnail.
- coordinates: ``<ref>label</ref><box>[[x1, y1, x2, y2]]</box>``, each value
  ``round(x / width * 1000)`` of the image the model sees (InternVL's own
  evaluation maps an answer back with ``value / 1000 * width``). ``<ref>``,
  ``</ref>``, ``<box>``, ``</box>`` are special tokens: an engine that skips
  special tokens when decoding leaves ``label[[x1, y1, x2, y2]]``, which the
  parser reads as well.
- chat: ChatML without a default system turn (InternVL3.5 dropped InternVL3's);
  the image is ``<IMG_CONTEXT>\\n`` before the text, which the processor expands to
  ``<img>`` + 256 ``<IMG_CONTEXT>`` per tile + ``</img>``.
- budget: tiles, not pixels: ``model.min_tiles`` / ``model.max_tiles`` (the
  processor's ``min_patches`` / ``max_patches``, published 1 and 12);
  ``model.min_pixels`` / ``model.max_pixels`` are not read.

No heavy imports at module level: torch, transformers and tokenizers only inside the builders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

from regioncap.components import check, whole
from regioncap.families.base import Family, PixelBox
from regioncap.families.internvl_files import TILE

#: The chat template's image placeholder, and the tokens the processor wraps its expansion in.
IMAGE_TOKEN, START_IMAGE, END_IMAGE = "<IMG_CONTEXT>", "<img>", "</img>"
#: The relative grid of InternVL's box coordinates (0..1000).
GRID = 1000
#: The grounding request: InternVL's own wording for detecting every object.
GROUNDING_PROMPT = "Please detect and label all objects in the following image and mark their positions."

# Bounds the boxes read from one answer (a hostile answer can hold millions).
_MAX_BOXES = 1000

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_ONE = r"\[" + _NUM + "," + _NUM + "," + _NUM + "," + _NUM + r"\]"
# A list of boxes: [[x1, y1, x2, y2], [x1, y1, x2, y2], ...] (InternVL writes several boxes of one
# label in one list, and one box as a list of one); a lone [x1, y1, x2, y2] is left to the JSON reader.
_LIST = re.compile(r"\[\s*" + _ONE + r"(?:\s*,\s*" + _ONE + r")*\s*\]")
_ONE_RE = re.compile(_ONE)
# One quantifier over a class that has the whitespace too: no nested repeats to backtrack through.
_BOX_TAG = re.compile(r"<box>([\[\]\d\s.,-]{0,20000})</box>")
_REF_START, _REF_END = "<ref>", "</ref>"


@lru_cache(maxsize=4096)
def tile_grid(width: int, height: int, min_tiles: int = 1, max_tiles: int = 12,
              tile: int = TILE) -> Tuple[int, int]:
    """``(cols, rows)`` of the tiles InternVL's processor cuts a ``width x height`` image into.

    The rule of transformers' ``get_optimal_tiled_canvas`` (GotOcr2, which the
    InternVL processor uses) and of InternVL's own ``dynamic_preprocess``: of the
    grids with ``min_tiles <= cols * rows <= max_tiles``, in order of tile count,
    the one whose aspect ratio is closest to the image's; on a tie the larger grid
    while the image's area is over half the grid's. Written out so that sizing
    needs no torch (tests compare it with transformers' function).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


@lru_cache(maxsize=4096)
def grid_size(width: int, height: int, min_tiles: int = 1, max_tiles: int = 12,
              tile: int = TILE) -> Tuple[int, int]:
    """``(cols * tile, rows * tile)``: the size of the tiling grid of a ``width x height`` image that the
    processor keeps when given an image of that size (a fixed point of :func:`tile_grid`).

    Usually the grid of the image itself. Not always: an image the size of a ``3 x 3``
    grid covers more than half of ``4 x 4`` (same ratio), so with ``max_tiles >= 16``
    the processor would cut it into 4 x 4 and resize it again; the grid is followed to
    where it stays (more tiles than InternVL picks for the original image), so the
    marks drawn at this size reach every tile unresampled.
    """
    cols, rows = tile_grid(width, height, min_tiles, max_tiles, tile)
    for _ in range(max_tiles):
        again = tile_grid(cols * tile, rows * tile, min_tiles, max_tiles, tile)
        if again == (cols, rows):
            break
        cols, rows = again
    return cols * tile, rows * tile


class InternVL35(Family):
    """InternVL3.5 (``OpenGVLab/InternVL3_5-1B-HF`` ... ``-8B-HF``): dynamic 448 px tiles plus a thumbnail."""

    @dataclass
    class Config(Family.Config):
        """The ``model`` section of an InternVL3.5 model: its image budget is in tiles."""

        #: Fewest and most 448 px tiles of one image (the processor's ``min_patches`` /
        #: ``max_patches``); a thumbnail tile is added when there is more than one.
        min_tiles: int = field(default=1, metadata=check(whole(1)))
        max_tiles: int = field(default=12, metadata=check(whole(1)))
        #: Side of one tile in pixels (the vision tower's ``image_size``).
        tile_size: int = field(default=TILE, metadata=check(whole(1)))

    name: ClassVar[str] = "internvl"
    model_types: ClassVar[Tuple[str, ...]] = ("internvl",)
    transformers_class: ClassVar[Optional[str]] = "InternVLForConditionalGeneration"
    grid: ClassVar[Optional[int]] = GRID
    image_placeholder: ClassVar[str] = IMAGE_TOKEN
    archs: ClassVar[Mapping[str, str]] = {
        "OpenGVLab/InternVL3_5-1B-HF": "internvl3_5_1b",
        "OpenGVLab/InternVL3_5-2B-HF": "internvl3_5_2b",
        "OpenGVLab/InternVL3_5-4B-HF": "internvl3_5_4b",
        "OpenGVLab/InternVL3_5-8B-HF": "internvl3_5_8b",
    }

    # -- the budget --------------------------------------------------------------

    def _tiles_budget(self) -> Tuple[int, int, int]:
        cfg = self.cfg
        lo, hi, tile = cfg.min_tiles, cfg.max_tiles, cfg.tile_size
        if not 1 <= lo <= hi:
            raise ValueError(f"model.min_tiles ({lo}) must be >= 1 and at most model.max_tiles ({hi})")
        return lo, hi, tile

    def tokens_per_tile(self) -> int:
        """Visual tokens of one tile: ``(tile_size / (patch_size * merge_size)) ** 2`` (256 at 448 px)."""
        _, _, tile = self._tiles_budget()
        unit = self.cfg.patch_size * self.cfg.merge_size
        return (tile // unit) ** 2

    def tiles(self, width: int, height: int) -> int:
        """Tiles the model gets for a ``width x height`` image resized to :meth:`input_size`, the
        thumbnail included."""
        lo, hi, tile = self._tiles_budget()
        tw, th = grid_size(int(width), int(height), lo, hi, tile)
        n = (tw // tile) * (th // tile)
        return n + 1 if n > 1 else n

    def expand_images(self, text: str, width: int, height: int) -> str:
        """Each ``<IMG_CONTEXT>`` as the InternVL processor (and vLLM's) writes it: ``<img>``, one
        ``<IMG_CONTEXT>`` per visual token, ``</img>``."""
        n = self.visual_tokens(width, height)
        return text.replace(IMAGE_TOKEN, f"{START_IMAGE}{IMAGE_TOKEN * n}{END_IMAGE}")

    def processor_kwargs(self) -> Dict[str, Any]:
        """Image processor attributes that carry ``model``'s budget (GotOcr2's tiling settings): tiles of
        ``tile_size`` px, ``model.min_tiles`` to ``model.max_tiles`` of them."""
        lo, hi, tile = self._tiles_budget()
        return {"crop_to_patches": True, "min_patches": lo, "max_patches": hi,
                "size": {"height": tile, "width": tile}}

    def mm_processor_kwargs(self) -> Dict[str, Any]:
        """vLLM's ``mm_processor_kwargs``: the tile budget as the processor's call takes it."""
        lo, hi, _ = self._tiles_budget()
        return {"min_patches": lo, "max_patches": hi}

    # -- pixels ------------------------------------------------------------------

    def input_size(self, width: int, height: int, source: str = "image") -> Tuple[int, int]:
        """The tiling grid's size ``(cols * tile, rows * tile)``: every tile an exact crop (module docstring)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"{source}: image size must be positive, got {width}x{height}")
        lo, hi, tile = self._tiles_budget()
        return grid_size(int(width), int(height), lo, hi, tile)

    def visual_tokens(self, width: int, height: int) -> int:
        """``tokens_per_tile`` x (tiles + the thumbnail when there is more than one tile)."""
        return self.tiles(width, height) * self.tokens_per_tile()

    # -- coordinates ---------------------------------------------------------------

    def box_coords(self, box: PixelBox, size: Tuple[int, int]) -> List[int]:
        """``[x1, y1, x2, y2]`` on the 0..1000 grid of the ``size`` image, rounded and clamped."""
        from regioncap.families.grounding import grid_coords

        return grid_coords(box, size, GRID)

    def box_text(self, box: PixelBox, size: Tuple[int, int]) -> str:
        """``<box>[[x1, y1, x2, y2]]</box>``, as InternVL writes a grounded box."""
        x1, y1, x2, y2 = self.box_coords(box, size)
        return f"<box>[[{x1}, {y1}, {x2}, {y2}]]</box>"

    def grounding_prompt(self) -> str:
        """InternVL's request for every object with its ``<ref>``/``<box>``."""
        return GROUNDING_PROMPT

    def grounding_constraint(self, kind: str, max_items: int) -> Dict[str, Any]:
        """None: ``<ref>``/``<box>`` are special tokens, which a grammar over text cannot make the way
        the model writes them (it would force the tags out character by character)."""
        return {}

    def parse_grounding(self, text: Any, width: float, height: float, *, min_size: float = 1.0,
                        source: str = "vlm") -> List[Any]:
        """Boxes of an InternVL grounding answer, in pixels of the ``width x height`` image the model saw.

        Reads ``<ref>label</ref><box>[[x1, y1, x2, y2], ...]</box>`` (several boxes of one
        label share it; a ``<box>`` without ``<ref>`` has no label) and, where the engine
        dropped the special tokens, ``label[[x1, y1, x2, y2]]``; failing both, a JSON answer
        (``bbox_2d``, :func:`regioncap.families.grounding.parse_grounding`). Values are on the 0..1000
        grid; corners in the wrong order are swapped, boxes are clipped to the image, and a
        box with a side under ``min_size`` pixels is dropped. Never raises on any ``text``.
        """
        from regioncap.families import grounding

        grounding.check_size(width, height)
        if not isinstance(text, str) or not text.strip():
            return []
        candidates = (grounding.labelled_boxes(_BOX_TAG, text, _tag_boxes, _ref_label, _MAX_BOXES)
                      or grounding.labelled_boxes(_LIST, text, _list_boxes, grounding.text_label, _MAX_BOXES))
        if not candidates:
            # JSON, as the shared parser reads it (a model that answers ``bbox_2d`` on its grid).
            return grounding.parse_grounding(text, width, height, grid=GRID, min_size=min_size, source=source)
        return grounding.to_proposals(candidates, width, height, grid=GRID, min_size=min_size, source=source)

    # -- building ------------------------------------------------------------------

    @classmethod
    def build_tiny(cls, out_dir: Path) -> Path:
        """Build the tiny random-weight InternVL3.5 into ``out_dir`` (see :mod:`regioncap.families.internvl_files`)."""
        from regioncap.families import internvl_files

        return internvl_files.build_tiny_model(out_dir)

    @classmethod
    def write_arch_files(cls, folder: Path) -> None:
        """The offline tokenizer at InternVL3.5's real ids, the processor config and the chat template of a
        weightless architecture folder (:func:`regioncap.random_weights.build_arch_folder`)."""
        from regioncap.families import internvl_files

        internvl_files.write_arch_files(folder)

    def max_crop_aspect(self) -> float:
        """Any crop fits a tiling grid (no aspect limit, no pixel budget to run out of): the crop strategy's
        own limit (:data:`regioncap.images.MAX_CROP_ASPECT_RATIO`)."""
        from regioncap.images import MAX_CROP_ASPECT_RATIO

        return float(MAX_CROP_ASPECT_RATIO)


# ----------------------------------------------------------------------------- answer parsing


def _boxes_in(list_text: str) -> List[List[float]]:
    return [[float(m.group(i)) for i in range(1, 5)] for m in _ONE_RE.finditer(list_text)]


def _tag_boxes(m: re.Match[str]) -> List[List[float]]:
    """The boxes inside one ``<box>...</box>``."""
    return _boxes_in(m.group(1))


def _list_boxes(m: re.Match[str]) -> List[List[float]]:
    """The boxes of one bare ``[[x1, y1, x2, y2], ...]`` (the tags stripped by the decoder)."""
    return _boxes_in(m.group(0))


def _ref_label(text: str, start: int, end: int) -> Optional[str]:
    """The ``<ref>label</ref>`` right before a ``<box>`` (several boxes of one label share it)."""
    from regioncap.families.grounding import ref_label

    return ref_label(text, start, end, _REF_START, _REF_END)


def grounding_text(items: Sequence[Tuple[str, Sequence[int]]]) -> str:
    """``<ref>label</ref><box>[[x1, y1, x2, y2]]</box>`` per item, one a line (the answer InternVL writes)."""
    return "\n".join(f"<ref>{label}</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>"
                     for label, (x1, y1, x2, y2) in items)

