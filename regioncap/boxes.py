"""Parse, validate and convert bounding boxes.

Every box inside regioncap is a :class:`Box`: ``x1, y1, x2, y2`` as floats, in
pixels of the original image after EXIF rotation. Input boxes arrive in one of
:data:`BBOX_FORMATS` and are converted once, in :func:`parse_boxes`; output
formats (normalised boxes, the Qwen grounding grids) are derived from a
:class:`Box` by the functions at the end of this module.

:func:`parse_boxes` never lets a box vanish silently: each input box is kept,
clipped to the image and kept (and listed in ``clipped``), or dropped with a
reason (and listed in ``dropped``). Only a ``bbox`` field that cannot be read
as a list of boxes at all raises :class:`BoxFormatError`.

Pure standard library on purpose: this module is imported by the config-time
code paths and by tests that must run without numpy, Pillow or an engine.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeVar

from regioncap.choice import Choice

__all__ = [
    "BBOX_FORMATS",
    "BoxFormatError",
    "Box",
    "BoxIssue",
    "ParsedBoxes",
    "parse_boxes",
    "to_xyxy",
    "from_xyxy",
    "normalized_xyxy",
    "pad_normalized",
    "chunk",
    "iou",
    "nms",
    "proposal_quality",
]

T = TypeVar("T")

#: Input formats. ``xywh`` is DataFlow-MM's default ``[x, y, w, h]`` in pixels;
#: ``*_norm`` are the same layouts in 0-1 fractions of the image width/height;
#: ``qwen1000`` is Qwen2-VL's grounding grid, ``[x1, y1, x2, y2]`` each in
#: 0..1000 relative to the image width/height.
BBOX_FORMATS: Tuple[str, ...] = (
    "xywh",
    "xyxy",
    "cxcywh",
    "xywh_norm",
    "xyxy_norm",
    "cxcywh_norm",
    "qwen1000",
)


class BboxFormat(Choice):
    """``data.bbox_format``: one of :data:`BBOX_FORMATS`."""

    xywh = "xywh"
    xyxy = "xyxy"
    cxcywh = "cxcywh"
    xywh_norm = "xywh_norm"
    xyxy_norm = "xyxy_norm"
    cxcywh_norm = "cxcywh_norm"
    qwen1000 = "qwen1000"

#: Drop reasons of :class:`BoxIssue` (``clipped`` marks a kept box).
ISSUE_REASONS: Tuple[str, ...] = (
    "not_numeric",
    "not_finite",
    "wrong_arity",
    "non_positive_size",
    "outside_image",
    "too_small",
    "clipped",
)

# Overshoot below this many pixels is float noise from a normalised format
# (1.0 * width can come back as width + 1e-13), not a box that needs reporting.
_CLIP_TOLERANCE_PX = 1e-6

# Qwen2-VL writes grounding boxes on a fixed 0..1000 grid, whatever the image size.
_QWEN2_GRID = 1000

# Keys of a dict box that carries its own layout, in absolute pixels. Checked in
# this order; a COCO-style ``{"bbox": [...]}`` wins over all of them.
_KEYED_LAYOUTS: Tuple[Tuple[Tuple[str, str, str, str], str], ...] = (
    (("x", "y", "w", "h"), "xywh"),
    (("x1", "y1", "x2", "y2"), "xyxy"),
    (("xmin", "ymin", "xmax", "ymax"), "xyxy"),
)

# Long rows make unreadable error messages; the raw value is kept in BoxIssue.raw.
_MAX_REPR = 80


class BoxFormatError(ValueError):
    """The whole bbox field is unusable: not a list, bad JSON text, or an unknown format."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box: ``x1, y1, x2, y2`` in pixels of the EXIF-corrected original image."""

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self) -> None:
        # Ints from callers would make as_list()/JSON output depend on how the
        # box was built; always store floats.
        for name in ("x1", "y1", "x2", "y2"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def width(self) -> float:
        """Width in pixels (``x2 - x1``)."""
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        """Height in pixels (``y2 - y1``)."""
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        """Area in square pixels."""
        return self.width * self.height

    def scale(self, sx: float, sy: float) -> "Box":
        """The same region in an image resized by ``sx`` horizontally and ``sy`` vertically."""
        return Box(self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy)

    def as_list(self, ndigits: Optional[int] = None) -> List[float]:
        """``[x1, y1, x2, y2]`` as floats, rounded to ``ndigits`` decimals when given."""
        values = [self.x1, self.y1, self.x2, self.y2]
        if ndigits is None:
            return values
        return [round(v, ndigits) for v in values]

    def round_int(self) -> List[int]:
        """``[round(x1), round(y1), round(x2), round(y2)]`` (Python rounding, half to even)."""
        return [round(self.x1), round(self.y1), round(self.x2), round(self.y2)]


@dataclass
class BoxIssue:
    """Why an input box was dropped, or that a kept box was clipped."""

    #: Position of the box in the input list (0 for a single box given bare).
    index: int
    #: One of :data:`ISSUE_REASONS`.
    reason: str
    #: Human-readable message naming the box and the offending value.
    detail: str
    #: The box as given, made JSON-serialisable (tuples become lists).
    raw: Any


@dataclass
class ParsedBoxes:
    """Outcome of :func:`parse_boxes`: kept boxes plus every box that was dropped or clipped."""

    #: ``(source index, box)`` for every kept box, in input order; clipped boxes
    #: appear here already clipped.
    boxes: List[Tuple[int, Box]] = field(default_factory=list)
    dropped: List[BoxIssue] = field(default_factory=list)
    #: Kept boxes that were clipped to the image (reason ``clipped``); also in ``boxes``.
    clipped: List[BoxIssue] = field(default_factory=list)

    @property
    def num_input(self) -> int:
        """Number of boxes in the input: every one is either kept or dropped."""
        return len(self.boxes) + len(self.dropped)


def _check_format(fmt: str) -> None:
    if fmt not in BBOX_FORMATS:
        raise BoxFormatError(
            f"unknown bbox format {fmt!r}; use one of {', '.join(BBOX_FORMATS)}"
        )


def _check_image_size(width: float, height: float) -> None:
    # Checked up front because a zero size turns every normalised box into
    # NaN or zero and every pixel box into "outside_image", which would hide
    # the real problem (an unreadable image header) behind per-box drops.
    if not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < math.inf
        for v in (width, height)
    ):
        raise ValueError(
            f"image size must be positive and finite, got width={width!r} height={height!r}"
        )


def _scale_of(fmt: str, width: float, height: float) -> Tuple[float, float]:
    """Pixels per unit of ``fmt`` along x and y."""
    if fmt.endswith("_norm"):
        return float(width), float(height)
    if fmt == "qwen1000":
        return width / _QWEN2_GRID, height / _QWEN2_GRID
    return 1.0, 1.0


def _layout_of(fmt: str) -> str:
    """The corner layout of ``fmt`` (``xywh``, ``xyxy`` or ``cxcywh``), ignoring units."""
    if fmt == "qwen1000":
        return "xyxy"
    return fmt[: -len("_norm")] if fmt.endswith("_norm") else fmt


def to_xyxy(
    values: Sequence[float], fmt: str, width: int, height: int
) -> Tuple[float, float, float, float]:
    """Convert four numbers in ``fmt`` to ``(x1, y1, x2, y2)`` pixels of a ``width`` x ``height`` image.

    No validation beyond the format and the count: the result may be empty,
    inverted or outside the image (:func:`parse_boxes` checks those).
    """
    _check_format(fmt)
    _check_image_size(width, height)
    if len(values) != 4:
        raise ValueError(f"a box has 4 values, got {len(values)}: {values!r}")
    return _xyxy_pixels(values, fmt, width, height)


def _xyxy_pixels(
    values: Sequence[float], fmt: str, width: float, height: float
) -> Tuple[float, float, float, float]:
    """:func:`to_xyxy` without its checks, for a caller that made them once (per box they show)."""
    a, b, c, d = (float(v) for v in values)
    layout = _layout_of(fmt)
    if layout == "xywh":
        x1, y1, x2, y2 = a, b, a + c, b + d
    elif layout == "cxcywh":
        x1, y1, x2, y2 = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    else:
        x1, y1, x2, y2 = a, b, c, d
    sx, sy = _scale_of(fmt, width, height)
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def from_xyxy(box: Box, fmt: str, width: int, height: int) -> List[float]:
    """Write ``box`` (pixels of a ``width`` x ``height`` image) in ``fmt``; the inverse of :func:`to_xyxy`."""
    _check_format(fmt)
    _check_image_size(width, height)
    sx, sy = _scale_of(fmt, width, height)
    x1, y1, x2, y2 = box.x1 / sx, box.y1 / sy, box.x2 / sx, box.y2 / sy
    layout = _layout_of(fmt)
    if layout == "xywh":
        return [x1, y1, x2 - x1, y2 - y1]
    if layout == "cxcywh":
        return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    return [x1, y1, x2, y2]


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:  # a box nested hundreds of levels deep (fuzzed input)
        text = f"<{type(value).__name__} nested too deeply to show>"
    except Exception:  # noqa: BLE001 - an int over 4300 digits, an object whose repr fails
        text = f"<{type(value).__name__} that cannot be shown>"
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _jsonable(value: Any, depth: int = 0) -> Any:
    # BoxIssue.raw goes into the run's JSONL report, so it must survive
    # json.dumps whatever the loader handed us (tuples, numpy scalars/arrays).
    # Strict JSON too: a non-finite number is kept as the text JSON5 would use
    # ("NaN", "Infinity"), so the record says what the input held.
    if depth > 32:
        return _short(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        value = int(value)
        return value if value.bit_length() < 14_000 else _short(value)  # int->str refuses ~4300+ digits
    if isinstance(value, numbers.Real):
        try:
            number = float(value)
        except (OverflowError, ValueError):
            return _short(value)
        if math.isnan(number):
            return "NaN"
        if math.isinf(number):
            return "Infinity" if number > 0 else "-Infinity"
        return number
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _jsonable(tolist(), depth + 1)
    return _short(value)


def _as_plain(value: Any) -> Any:
    # Arrays (numpy, or a datasets column in numpy format) behave like lists
    # here; duck-typed so this module never imports numpy.
    if not isinstance(value, (list, tuple, dict, str, numbers.Number)):
        tolist = getattr(value, "tolist", None)
        if callable(tolist):
            return tolist()
    return value


def _to_float(value: Any) -> Optional[float]:
    """The value as a float, or None when it is not a number (bools are not numbers)."""
    # What JSON gives for coordinates (bool is neither type), without the ABC checks below.
    if type(value) is float:
        return value
    if isinstance(value, bool):
        return None
    if type(value) is int or isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            # An int too large for a float is still a number, just not a usable one.
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        # Some JSONL writers quote every value ("12.5"); accept those.
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _is_box_like(value: Any) -> bool:
    # numpy scalars also have tolist(); only containers can be a box.
    if isinstance(value, (list, tuple, dict)):
        return True
    if isinstance(value, (str, numbers.Number)):
        return False
    return callable(getattr(value, "tolist", None))


def _split_boxes(raw: Any) -> List[Any]:
    """The list of raw boxes in a bbox field; raises BoxFormatError when there is none to be had."""
    if raw is None:
        return []
    if isinstance(raw, str):
        # DataFlow-MM JSONL sometimes stores the bbox list as a JSON string.
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise BoxFormatError(
                f"bbox is a string but not valid JSON ({exc.__class__.__name__}): {_short(raw)}; "
                "write it as a JSON list of boxes such as [[x, y, w, h], ...]"
            ) from None
        if raw is None:
            return []
    raw = _as_plain(raw)
    if isinstance(raw, dict):
        # A single COCO annotation, or {"x":..,"y":..,"w":..,"h":..}.
        return [raw]
    if not isinstance(raw, (list, tuple)):
        raise BoxFormatError(
            f"bbox must be a list of boxes, got {type(raw).__name__}: {_short(raw)}"
        )
    if raw and not any(_is_box_like(v) for v in raw):
        # A bare box ([10, 20, 30, 40]) written without the outer list. A list
        # of scalars cannot be a list of boxes, so read it as one box; if it is
        # not four numbers it is dropped with that reason instead of giving one
        # wrong_arity drop per number.
        return [raw]
    return list(raw)


def _values_of(item: Any, fmt: str) -> Tuple[Optional[Sequence[Any]], str, str]:
    """``(values, format, problem)`` of one raw box; values is None when there is a problem."""
    item = _as_plain(item)
    if isinstance(item, dict):
        if "bbox" in item:
            inner = _as_plain(item["bbox"])
            if isinstance(inner, (list, tuple)):
                return inner, fmt, ""
            return None, fmt, f"'bbox' is {type(inner).__name__}, not a list of 4 numbers"
        partial = ""
        for keys, layout in _KEYED_LAYOUTS:
            present = [k for k in keys if k in item]
            if len(present) == 4:
                return [item[k] for k in keys], layout, ""
            if present and not partial:
                missing = [k for k in keys if k not in item]
                partial = f"dict has {', '.join(present)} but lacks {', '.join(missing)}"
        return None, fmt, partial or (
            "dict has no 'bbox' key and none of the key sets "
            "x/y/w/h, x1/y1/x2/y2, xmin/ymin/xmax/ymax"
        )
    if isinstance(item, (list, tuple)):
        return item, fmt, ""
    return None, fmt, f"expected a list of 4 numbers or a dict, got {type(item).__name__}"


def _format_hint(values: Sequence[float], fmt: str) -> str:
    # The most common cause of a bad box is a wrong bbox_format, so say which
    # one the numbers look like when they clearly disagree with the declared one.
    if fmt.endswith("_norm") and max(abs(v) for v in values) > 1.5:
        return f" (values above 1 in a normalised format: is the format really {fmt}?)"
    if fmt in ("xywh", "xyxy", "cxcywh") and max(abs(v) for v in values) <= 1.0:
        return f" (all values are within [0, 1]: is the format {fmt}_norm?)"
    return ""


def _fmt_px(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def _check_one(
    index: int, item: Any, fmt: str, width: int, height: int, min_size: float
) -> Tuple[Optional[Box], Optional[BoxIssue]]:
    """One raw box: ``(box, None)`` kept, ``(box, issue)`` kept but clipped, ``(None, issue)`` dropped."""
    def issue(reason: str, why: str) -> BoxIssue:
        # Built only for a box with an issue: most boxes have none, and this is per-box work.
        raw_json = _jsonable(item)
        return BoxIssue(index, reason, f"box {index} {_short(raw_json)}: {why}", raw_json)

    values, box_fmt, problem = _values_of(item, fmt)
    if values is None:
        return None, issue("wrong_arity", problem)
    if len(values) != 4:
        return None, issue("wrong_arity", f"expected 4 values, got {len(values)}")
    floats: List[float] = []
    for value in values:
        number = _to_float(value)
        if number is None:
            return None, issue("not_numeric", f"value {_short(value)} is not a number")
        floats.append(number)
    for value, number in zip(values, floats):
        if not math.isfinite(number):
            return None, issue("not_finite", f"value {_short(value)} is not finite")
    # parse_boxes checked the size, _values_of gives a known format and 4 values were counted.
    x1, y1, x2, y2 = _xyxy_pixels(floats, box_fmt, width, height)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, issue("not_finite", f"coordinates overflow when read as {box_fmt}")
    def hint() -> str:
        return _format_hint(floats, box_fmt)

    if x2 <= x1 or y2 <= y1:
        return None, issue(
            "non_positive_size",
            f"width {x2 - x1:.6g} and height {y2 - y1:.6g} px when read as {box_fmt}; "
            f"both must be > 0{hint()}",
        )
    if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        return None, issue(
            "outside_image",
            f"{_fmt_px((x1, y1, x2, y2))} px (xyxy, read as {box_fmt}) does not overlap "
            f"the {width}x{height} image{hint()}",
        )
    box = Box(max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
    overshoot = max(-x1, -y1, x2 - width, y2 - height)
    if box.width < min_size or box.height < min_size:
        after = " after clipping" if overshoot > 0 else ""
        return None, issue(
            "too_small",
            f"{box.width:.6g}x{box.height:.6g} px{after} is below min_size={min_size:g} px{hint()}",
        )
    if overshoot > _CLIP_TOLERANCE_PX:
        return box, issue(
            "clipped",
            f"clipped from {_fmt_px((x1, y1, x2, y2))} to {_fmt_px(box.as_list())} px "
            f"(xyxy, read as {box_fmt}) to fit the {width}x{height} image{hint()}",
        )
    return box, None


def parse_boxes(
    raw: Any, fmt: str, width: int, height: int, *, min_size: float = 1.0
) -> ParsedBoxes:
    """Read a bbox field into pixel :class:`Box` es of a ``width`` x ``height`` image.

    ``raw`` may be None or ``[]`` (no boxes); a JSON string of the same; a list
    or tuple of boxes; a single dict box; or a single box written bare, without
    the outer list (``[10, 20, 30, 40]``): a non-empty list that holds no list,
    tuple or dict is read as one box.

    A box is a list/tuple of 4 values in ``fmt``, or a dict: COCO-style
    ``{"bbox": [...]}`` (in ``fmt``), or one with ``x/y/w/h``,
    ``x1/y1/x2/y2`` or ``xmin/ymin/xmax/ymax`` keys (absolute pixels, whatever
    ``fmt`` says). Numeric strings count as numbers; bools do not.

    Each box is kept, clipped to the image and kept (also listed in
    ``clipped``), or dropped with one reason, checked in this order:
    ``wrong_arity``, ``not_numeric``, ``not_finite``, ``non_positive_size``,
    ``outside_image`` (no overlap with the image) and ``too_small`` (a side
    under ``min_size`` pixels after clipping).

    Raises:
        BoxFormatError: unknown ``fmt``, a string that is not JSON, or a value
            that is not a list of boxes.
        ValueError: ``width``/``height`` not positive, or ``min_size`` negative.
    """
    _check_format(fmt)
    _check_image_size(width, height)
    if isinstance(min_size, bool) or not (
        isinstance(min_size, numbers.Real) and 0 <= min_size < math.inf
    ):
        raise ValueError(f"min_size must be a finite number >= 0, got {min_size!r}")

    result = ParsedBoxes()
    for index, item in enumerate(_split_boxes(raw)):
        box, issue = _check_one(index, item, fmt, width, height, min_size)
        if box is None:
            result.dropped.append(issue)  # type: ignore[arg-type]  # always set when dropped
            continue
        if issue is not None:
            result.clipped.append(issue)
        result.boxes.append((index, box))
    return result


def normalized_xyxy(box: Box, width: int, height: int, ndigits: Optional[int] = 4) -> List[float]:
    """``[x1, y1, x2, y2]`` as 0-1 fractions of the image size (DataFlow-MM's ``normalized_bbox``).

    Rounded to ``ndigits`` decimals (DataFlow-MM itself writes 3); ``None`` keeps full precision.
    """
    _check_image_size(width, height)
    values = [box.x1 / width, box.y1 / height, box.x2 / width, box.y2 / height]
    if ndigits is None:
        return values
    return [round(v, ndigits) for v in values]


def pad_normalized(boxes: List[List[float]], n: int) -> List[List[float]]:
    """Copy of ``boxes`` padded with ``[0.0, 0.0, 0.0, 0.0]`` to length ``max(n, len(boxes))``.

    Never truncates: DataFlow-MM pads ``normalized_bbox`` to ``max_boxes``, but
    regioncap keeps every region (more than ``max_boxes`` go to further chunks).
    """
    padded = [list(b) for b in boxes]
    padded.extend([0.0, 0.0, 0.0, 0.0] for _ in range(max(0, n - len(boxes))))
    return padded


def chunk(items: Sequence[T], size: int) -> List[List[T]]:
    """Consecutive chunks of at most ``size`` items (the last may be shorter); ``[]`` for no items.

    Raises:
        ValueError: ``size`` is not an integer >= 1.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"chunk size must be an integer >= 1, got {size!r}")
    seq = list(items)
    return [seq[i : i + size] for i in range(0, len(seq), size)]


# --------------------------------------------------------------------------- overlap and proposals


def _corners(box: Any) -> Tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` of a :class:`Box` or of 4 numbers in xyxy."""
    if isinstance(box, Box):
        return box.x1, box.y1, box.x2, box.y2
    x1, y1, x2, y2 = (float(v) for v in box)
    return x1, y1, x2, y2


def _overlap(a: Tuple[float, ...], b: Tuple[float, ...], metric: str) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    denom = min(area_a, area_b) if metric == "iomin" else area_a + area_b - inter
    return inter / denom if denom > 0 else 0.0


def iou(a: Any, b: Any) -> float:
    """Intersection over union of two boxes (a :class:`Box` or 4 numbers in xyxy each).

    0.0 when they do not overlap or when either box is empty (no area).
    """
    return _overlap(_corners(a), _corners(b), "iou")


class NmsMetric(Choice):
    """Overlap measure of an NMS: IoU, or intersection over the smaller box (DataFlow-MM's contours)."""

    iou = "iou"
    #: Intersection over the smaller box's area: also drops a box nested in another.
    iomin = "iomin"


#: Overlap measures :func:`nms` accepts (the values of :class:`NmsMetric`).
NMS_METRICS: Tuple[str, ...] = tuple(m.value for m in NmsMetric)


def nms(boxes: Sequence[Any], scores: Optional[Sequence[float]], thr: float, *, metric: str = "iou",
        limit: Optional[int] = None) -> List[int]:
    """Greedy non-maximum suppression; the indices of the kept boxes, best first.

    Boxes are visited by descending score (``scores`` None: in the given order;
    ties keep the given order); a box is dropped when its overlap with a box
    already kept is above ``thr``. ``metric`` is one of :data:`NMS_METRICS`.
    ``limit`` stops once that many are kept: the first ``limit`` kept boxes are
    the same as without it, and the time is O(boxes x limit) instead of
    O(boxes^2) on an input of many distinct boxes (a hostile model answer).

    Raises:
        ValueError: ``scores`` and ``boxes`` differ in length, or an unknown ``metric``.
    """
    if metric not in NMS_METRICS:
        raise ValueError(f"unknown NMS metric {metric!r}; use one of {', '.join(NMS_METRICS)}")
    corners = [_corners(b) for b in boxes]
    if scores is not None and len(scores) != len(corners):
        raise ValueError(f"nms: {len(corners)} boxes but {len(scores)} scores")
    order = list(range(len(corners)))
    if scores is not None:
        order.sort(key=lambda i: -float(scores[i]))  # stable: ties keep the given order
    kept: List[int] = []
    if limit is not None and limit <= 0:
        return kept
    for i in order:
        if all(_overlap(corners[i], corners[k], metric) <= thr for k in kept):
            kept.append(i)
            if limit is not None and len(kept) >= limit:
                break
    return kept


def match_boxes(proposed: Sequence[Any], truth: Sequence[Any], thr: float = 0.5
                ) -> Tuple[Dict[int, int], List[float]]:
    """Greedy one-to-one matching of ``proposed`` to ``truth`` boxes (both xyxy, same pixels).

    Every (proposal, truth) pair with IoU >= ``thr`` (and > 0) is taken in
    descending IoU order, skipping pairs whose proposal or truth is already
    matched. Returns ``({truth index: proposal index}, best IoU of each truth box
    over all proposals)``.
    """
    props = [_corners(b) for b in proposed]
    gts = [_corners(b) for b in truth]
    pairs = []
    best = [0.0] * len(gts)
    for p, pb in enumerate(props):
        for t, tb in enumerate(gts):
            v = _overlap(pb, tb, "iou")
            best[t] = max(best[t], v)
            if v >= thr and v > 0:
                pairs.append((-v, p, t))
    pairs.sort()
    used_p: set = set()
    matches: Dict[int, int] = {}
    for _, p, t in pairs:
        if p not in used_p and t not in matches:
            used_p.add(p)
            matches[t] = p
    return matches, best


def proposal_quality(proposed: Sequence[Any], truth: Sequence[Any], thr: float = 0.5) -> Dict[str, Any]:
    """How well ``proposed`` boxes cover ``truth`` boxes (both xyxy, same image, same pixels).

    Matching is greedy one-to-one (:func:`match_boxes`; no Hungarian assignment; on
    non-overlapping truth boxes such as the shapes scenes the two agree). ``recall`` =
    matched truths / truths, ``precision`` = matched proposals / proposals,
    ``mean_best_iou`` = the mean over truth boxes of the best IoU any proposal reaches
    (not one-to-one).

    An empty side gives ``None`` for the ratios it would divide by zero in
    (recall and mean_best_iou without truth, precision without proposals), so
    averages over images can skip them rather than count a made-up 0 or 1.
    """
    matches, best = match_boxes(proposed, truth, thr)
    matched = len(matches)
    return {
        "recall": matched / len(truth) if truth else None,
        "precision": matched / len(proposed) if proposed else None,
        "mean_best_iou": sum(best) / len(best) if best else None,
        "matched": matched,
        "n_proposed": len(proposed),
        "n_truth": len(truth),
    }
