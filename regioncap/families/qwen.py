"""The Qwen vision-language families: Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

All three resize an image with the same rule (``smart_resize``: both sides
multiples of one visual token's side, the pixel count inside the budget) and
put it in the chat as ``<|vision_start|><|image_pad|><|vision_end|>``; they
differ in the token's side and in how they write boxes:

=============  ==============================  =============================================================
family         one visual token                boxes (``prompt=coords``, ``propose=vlm``)
=============  ==============================  =============================================================
Qwen2-VL       14 px patches merged 2x2: 28 px  ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on a 0-1000 grid
Qwen2.5-VL     14 px patches merged 2x2: 28 px  ``{"bbox_2d": [x1, y1, x2, y2]}`` in pixels of the input image
Qwen3-VL       16 px patches merged 2x2: 32 px  ``{"bbox_2d": [x1, y1, x2, y2]}`` on a 0-1000 grid
=============  ==============================  =============================================================

The standard library at import; Pillow (:mod:`regioncap.images`) when an
image is sized, transformers, torch and tokenizers only inside the builders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from regioncap.components import check, whole
from regioncap.families.base import Family, PixelBox
from regioncap.families.grounding import JsonGrounding, grid_coords, pixel_coords

#: The side of the relative grid of Qwen2-VL's box tokens and Qwen3-VL's ``bbox_2d``.
GRID = 1000

#: Qwen2.5-VL's grounding request (its cookbook's wording: "... output their bbox coordinates in JSON format").
GROUNDING_PROMPT = "Locate every object in the image and output their bbox coordinates in JSON format."
#: Qwen2-VL grounds with box tokens, not JSON: ask for each object's name and box.
QWEN2_GROUNDING_PROMPT = "Locate every object in the image and output the name and bounding box of each one."


def smart_resize(width: int, height: int, *, min_pixels: int, max_pixels: int, patch_size: int = 14,
                 merge_size: int = 2, source: str = "image") -> Tuple[int, int]:
    """Return the ``(width, height)`` the Qwen-VL image processor resizes a ``width x height`` image to.

    Both sides become multiples of ``patch_size * merge_size`` (one visual
    token: 28 px for Qwen2-VL/2.5-VL, 32 px for Qwen3-VL) with the pixel count
    brought inside ``[min_pixels, max_pixels]`` at about the same aspect ratio.

    This is the rule of ``smart_resize`` in
    ``transformers.models.qwen2_vl.image_processing_qwen2_vl``, the one the
    processor (and vLLM, which uses it) applies to every image; the tests check it
    against that function and against ``qwen_vl_utils.smart_resize``. It is
    written out here because importing either costs about 5 s (both import torch
    and torchvision at module level, and qwen-vl-utils does not even declare torch
    as a dependency). Where the two differ (a side under 14 px), this follows
    transformers, which never returns a zero side.

    The rule is not always idempotent: the processor applies it again to the
    image it receives, and float rounding can floor a side one token short (under
    ``min_pixels``), as can ``min_pixels == max_pixels`` with a non-square image or a
    very elongated image on a small budget. The pipeline draws at
    :func:`settled_size`, which applies the rule again until it stays put; when
    ``max_pixels >= 2 * min_pixels`` and the aspect ratio is at most 4:1 that size
    is in the budget and the processor keeps it (property-tested), so the image
    reaches the model as drawn (see :meth:`Family.is_fixed_size`).

    Raises :class:`regioncap.images.ImageLoadError` (``bad_aspect_ratio``) beyond 200:1, which the
    processor refuses, and where the result is beyond 200:1 (rounding a short side
    to one token can double the ratio of an image over 100:1; the processor applies
    the rule again to what it receives and would refuse it, where transformers'
    ``smart_resize`` returns it); ``source`` names the image in that message.
    """
    from regioncap.images import MAX_ASPECT_RATIO, ImageLoadError

    factor = patch_size * merge_size
    if width <= 0 or height <= 0:
        raise ValueError(f"{source}: image size must be positive, got {width}x{height}")
    if factor <= 0:
        raise ValueError(f"patch_size * merge_size must be positive, got {patch_size} * {merge_size}")
    if min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(
            f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageLoadError(
            "bad_aspect_ratio",
            f"{source}: {width}x{height} has aspect ratio {ratio:.1f}, over the model's limit of "
            f"{MAX_ASPECT_RATIO}; crop or pad the image",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if max(w_bar, h_bar) > MAX_ASPECT_RATIO * min(w_bar, h_bar):
        # Rounding a short side to one token can double the ratio (6150x41 -> 6160x28):
        # the processor applies the rule again to the resized image and would refuse it.
        raise ImageLoadError(
            "bad_aspect_ratio",
            f"{source}: {width}x{height} resizes to {w_bar}x{h_bar}, whose aspect ratio "
            f"{max(w_bar, h_bar) / min(w_bar, h_bar):.1f} is over the model's limit of {MAX_ASPECT_RATIO}; "
            "crop or pad the image",
        )
    return w_bar, h_bar


#: How many times :func:`settled_size` applies the rule again at most.
_SETTLE_STEPS = 3


def settled_size(width: int, height: int, *, source: str = "image", **rule: int) -> Tuple[int, int]:
    """:func:`smart_resize` (``rule``: its budget and token settings), applied again to its own
    result until that stays put: the size to draw an image at so that the processor, which
    applies the rule to the image it receives, leaves it as drawn.

    The rule is not always idempotent: float rounding can floor an exact side one token
    short (1409x1409 at min_pixels=1568, max_pixels=3136 gives 28x28, under min_pixels,
    which the processor then resizes to 56x56, scaling the drawn marks with it). One more
    application settles such a size. Where none settles within a few (``min_pixels ==
    max_pixels`` with a non-square image alternates between a size under and one over the
    budget), the rule's first answer is kept: what the processor makes of the original image.
    """
    first = size = smart_resize(width, height, source=source, **rule)
    for _ in range(_SETTLE_STEPS):
        again = smart_resize(*size, source=source, **rule)
        if again == size:
            return size
        size = again
    return first


class Qwen25VL(JsonGrounding, Family):
    """Qwen2.5-VL: 28 px visual tokens, ``bbox_2d`` JSON in absolute pixels of the image it sees."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    transformers_class = "Qwen2_5_VLForConditionalGeneration"
    grid = None
    archs: Mapping[str, str] = {
        "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2_5_vl_3b",
        "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_5_vl_7b",
    }
    #: Grounding request text (:meth:`grounding_prompt`).
    grounding_request: str = GROUNDING_PROMPT
    #: The processor class a model folder's tokenizer config names.
    processor_class: str = "Qwen2_5_VLProcessor"

    # -- pixels --------------------------------------------------------------

    def unit(self) -> int:
        """The side of one visual token in pixels (``patch_size * merge_size``)."""
        return self.cfg.patch_size * self.cfg.merge_size

    def _rule(self) -> Dict[str, int]:
        c = self.cfg
        return dict(min_pixels=int(c.min_pixels), max_pixels=int(c.max_pixels), patch_size=int(c.patch_size),
                    merge_size=int(c.merge_size))

    def input_size(self, width: int, height: int, source: str = "image") -> Tuple[int, int]:
        return settled_size(width, height, source=source, **self._rule())

    def is_fixed_size(self, width: int, height: int) -> bool:
        # One application of the rule: what the processor does to the image it receives.
        try:
            return smart_resize(width, height, **self._rule()) == (width, height)
        except Exception:  # noqa: BLE001 - any refusal means "not fixed"
            return False

    def visual_tokens(self, width: int, height: int) -> int:
        # The processor applies the rule again to what it receives (a no-op at input size, see
        # smart_resize); an image it refuses still costs what its grid holds.
        try:
            width, height = self.input_size(width, height)
        except Exception:  # noqa: BLE001 - refused: count the grid of the size as given
            pass
        unit = self.unit()
        return (width // unit) * (height // unit)

    # -- coordinates -----------------------------------------------------------

    def box_coords(self, box: PixelBox, size: Tuple[int, int]) -> List[int]:
        """Absolute pixels of the image the model sees (``size``), rounded and clamped to it."""
        return pixel_coords(box, size)

    def grounding_prompt(self) -> str:
        return self.grounding_request

    # -- building --------------------------------------------------------------

    @classmethod
    def build_tiny(cls, out_dir: Path) -> Path:
        """The tiny random-weight Qwen2.5-VL of :mod:`regioncap.tiny` (offline tokenizer, real processor)."""
        from regioncap import tiny

        return tiny.build_tiny_model(out_dir)

    @classmethod
    def write_arch_files(cls, folder: Path) -> None:
        """The offline tokenizer (padded to Qwen's real special-token ids) and the chat template of a
        weightless architecture folder (:func:`regioncap.random_weights.build_arch_folder`)."""
        from regioncap import random_weights

        random_weights.padded_tokenizer(folder, chat_template=cls.chat_template(), processor_class=cls.processor_class)
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": cls.chat_template()}),
                                                   encoding="utf-8")

    @classmethod
    def chat_template(cls) -> str:
        """The family's official chat template (verbatim)."""
        from regioncap import tiny

        return tiny.QWEN25VL_CHAT_TEMPLATE


class Qwen2VL(Qwen25VL):
    """Qwen2-VL: 28 px visual tokens, box tokens ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on a 0-1000 grid."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    transformers_class = "Qwen2VLForConditionalGeneration"
    grid = GRID
    archs: Mapping[str, str] = {"Qwen/Qwen2-VL-2B-Instruct": "qwen2_vl_2b"}
    grounding_request = QWEN2_GROUNDING_PROMPT
    processor_class = "Qwen2VLProcessor"

    def box_coords(self, box: PixelBox, size: Tuple[int, int]) -> List[int]:
        """The 0..1000 grid, relative to ``size`` (``box`` may be in any resolution of that image)."""
        return grid_coords(box, size, GRID)

    def box_text(self, box: PixelBox, size: Tuple[int, int]) -> str:
        x1, y1, x2, y2 = self.box_coords(box, size)
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"

    def grounding_constraint(self, kind: str, max_items: int) -> Dict[str, Any]:
        # It answers with box tokens, which either JSON constraint would forbid.
        return {}

    def parse_grounding(self, text: Any, width: float, height: float, *, min_size: float = 1.0,
                        source: str = "vlm") -> List[Any]:
        from regioncap.families.grounding import parse_grounding

        return parse_grounding(text, width, height, grid=GRID, box_tokens=True, min_size=min_size, source=source)

    @classmethod
    def build_tiny(cls, out_dir: Path) -> Path:
        raise NotImplementedError("Qwen2VL has no tiny build (model=tiny is a Qwen2.5-VL)")


class Qwen3VL(Qwen25VL):
    """Qwen3-VL: 16 px patches merged 2x2 (32 px visual tokens), ``bbox_2d`` JSON on a relative 0-1000 grid."""

    @dataclass
    class Config(Family.Config):
        """The ``model`` section with Qwen3-VL's token: the budget is 4 to 1280 visual tokens of 32 px,
        as for Qwen2.5-VL (the published processor allows 64 to 16,384)."""

        min_pixels: int = field(default=4 * 32 * 32, metadata=check(whole(1)))
        max_pixels: int = field(default=1280 * 32 * 32, metadata=check(whole(1)))
        patch_size: int = field(default=16, metadata=check(whole(1)))

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    transformers_class = "Qwen3VLForConditionalGeneration"
    grid = GRID
    archs: Mapping[str, str] = {
        "Qwen/Qwen3-VL-2B-Instruct": "qwen3_vl_2b",
        "Qwen/Qwen3-VL-4B-Instruct": "qwen3_vl_4b",
    }
    grounding_request = GROUNDING_PROMPT
    processor_class = "Qwen3VLProcessor"

    def box_coords(self, box: PixelBox, size: Tuple[int, int]) -> List[int]:
        """The relative 0..1000 grid of the image (``size``), as Qwen3-VL writes ``bbox_2d``."""
        return grid_coords(box, size, GRID)

    @classmethod
    def build_tiny(cls, out_dir: Path) -> Path:
        """A tiny random-weight Qwen3-VL (offline tokenizer, Qwen3-VL's chat template and processor)."""
        from regioncap import tiny

        return tiny.build_tiny_model(out_dir, family="qwen3_vl")

    @classmethod
    def chat_template(cls) -> str:
        from regioncap import tiny

        return tiny.QWEN3VL_CHAT_TEMPLATE
