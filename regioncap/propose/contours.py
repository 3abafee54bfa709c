"""``contours``: DataFlow-MM's box extraction (threshold, close, contours, filters, NMS).

The heuristic of DataFlow-MM's ``extract_boxes_from_image``, which its region
caption pipeline runs on every row without a ``bbox`` field: grey scale,
Gaussian blur, adaptive Gaussian threshold (inverted), morphological closing
with a square kernel, every contour (outer and inner), then each contour's
bounding rectangle is kept when

- the contour's own area is within ``[min_area_ratio, max_area_ratio]`` of the image,
- the rectangle's aspect ratio ``w / h`` is within ``[min_aspect, max_aspect]``,
- neither side exceeds ``max_side_ratio`` of the image's side,

and the survivors go through NMS, largest first. DataFlow-MM's published
values are the defaults; its NMS divides the intersection by the smaller
box's area (``nms_metric=iomin``), which also removes a box nested inside a
kept one, where plain IoU would keep it.

Differences on purpose: it runs on the image at the model's input resolution
(the caller passes that image), not on the file at full resolution, so the
pixel sizes (blur, block, closing kernel) act on what the model sees; and the
boxes come back as ``x1, y1, x2, y2`` floats ordered largest first.

OpenCV (``opencv-python-headless``) is imported when the first image is
proposed, so building the proposer and composing configs stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, List

from regioncap.boxes import NMS_METRICS, NmsMetric, nms
from regioncap.components import TARGET, Rule, check, finite_number, real, whole
from regioncap.propose.base import Proposal, Proposer


def _odd(lo: int) -> Rule:
    """An odd whole number ``>= lo``."""
    ok, _ = whole(lo)
    return (lambda v: ok(v) and v % 2 == 1), f"an odd whole number >= {lo}"


#: ``blur_kernel``: 0 or 1 (no blur), or an odd kernel side.
_BLUR: Rule = ((lambda v: whole(0, 1)[0](v) or _odd(3)[0](v)), "0, 1 or an odd whole number")
#: A finite number (any sign).
_FINITE: Rule = (finite_number, "a finite number")


def contour_boxes(rgb: Any, params: "ContoursProposer.Config") -> List[Proposal]:
    """DataFlow-MM's boxes for an ``H x W x 3`` uint8 RGB array, largest first (see the module docstring)."""
    import cv2  # lazily: only runs that propose with contours need OpenCV
    import numpy as np

    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"contours needs an H x W x 3 RGB image, got an array of shape {arr.shape}")
    h_img, w_img = arr.shape[:2]
    gray = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    if params.blur_kernel > 1:
        gray = cv2.GaussianBlur(gray, (params.blur_kernel, params.blur_kernel), 0)
    thresh = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY_INV,
                                   params.block_size, params.threshold_c)
    if params.close_kernel > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (params.close_kernel, params.close_kernel))
        thresh = cv2.morphologyEx(thresh, cv2.MORPH_CLOSE, kernel)
    contours, _ = cv2.findContours(thresh, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)

    image_area = float(w_img * h_img)
    min_area, max_area = image_area * params.min_area_ratio, image_area * params.max_area_ratio
    rects = []
    for contour in contours:
        area = cv2.contourArea(contour)
        x, y, w, h = cv2.boundingRect(contour)
        if h == 0 or w == 0:
            continue
        if not min_area <= area <= max_area:
            continue
        if not params.min_aspect <= w / h <= params.max_aspect:
            continue
        if w > w_img * params.max_side_ratio or h > h_img * params.max_side_ratio:
            continue
        rects.append((float(x), float(y), float(x + w), float(y + h)))
    areas = [(r[2] - r[0]) * (r[3] - r[1]) for r in rects]
    keep = nms(rects, areas, params.nms_threshold, metric=str(params.nms_metric))
    return [Proposal(rects[i], None, None, "contours") for i in keep]


class ContoursProposer(Proposer):
    """Boxes from image structure alone (no model): DataFlow-MM's heuristic, see the module docstring."""

    @dataclass
    class Config(Proposer.Config):
        """DataFlow-MM's contour heuristic; the defaults are its published values.

        Sizes are pixels of the image at the model's input resolution.
        """

        #: Gaussian blur kernel (odd; 0 or 1: none).
        blur_kernel: int = field(default=5, metadata=check(_BLUR))
        #: Adaptive Gaussian threshold: block side (odd) and constant C.
        block_size: int = field(default=11, metadata=check(_odd(3)))
        threshold_c: float = field(default=2.0, metadata=check(_FINITE))
        #: Morphological closing kernel side (0: none).
        close_kernel: int = field(default=8, metadata=check(whole(0)))
        #: Contour area as a fraction of the image.
        min_area_ratio: float = field(default=0.01, metadata=check(real(0)))
        max_area_ratio: float = field(default=0.8, metadata=check(real(0)))
        #: Box aspect ratio w / h.
        min_aspect: float = field(default=0.1, metadata=check(real(0)))
        max_aspect: float = field(default=5.0, metadata=check(real(0)))
        #: Boxes wider or taller than this fraction of the image are dropped.
        max_side_ratio: float = field(default=0.9, metadata=check(real(0)))
        #: NMS over the boxes, largest first: drop a box whose overlap with a larger kept box is above
        #: this; ``iomin`` (intersection over the smaller box, DataFlow-MM's) or ``iou``.
        nms_threshold: float = field(default=0.3, metadata=check(real(0)))
        nms_metric: NmsMetric = NmsMetric.iomin

    name: ClassVar[str] = "contours"
    needs_engine: ClassVar[bool] = False

    def __init__(self, cfg: Any = None, **context: Any) -> None:
        super().__init__(cfg)
        #: The heuristic's knobs (this class's :class:`Config`).
        self.params = self.config

    @classmethod
    def check(cls, config: Any) -> List[str]:
        out = []
        if config.min_area_ratio > config.max_area_ratio:
            out.append(f"propose.min_area_ratio ({config.min_area_ratio}) is above "
                       f"propose.max_area_ratio ({config.max_area_ratio})")
        if config.min_aspect > config.max_aspect:
            out.append(f"propose.min_aspect ({config.min_aspect}) is above propose.max_aspect ({config.max_aspect})")
        if str(getattr(config.nms_metric, "value", config.nms_metric)) not in NMS_METRICS:
            out.append(f"propose.nms_metric must be {' or '.join(NMS_METRICS)}, got {config.nms_metric!r}")
        return out

    def propose(self, image: Any) -> List[Proposal]:
        """Proposals for a PIL image (any mode; converted to RGB), in its pixels, largest first."""
        import numpy as np

        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        return contour_boxes(np.asarray(image), self.params)

    def describe(self) -> dict:
        return {"proposer": self.name, **{f.name: getattr(self.params, f.name) for f in fields(self.params)
                                          if f.name != TARGET}}
