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

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, ClassVar, List

from regioncap.boxes import NMS_METRICS, nms
from regioncap.config import ContoursSettings
from regioncap.propose.base import Proposal, Proposer, ProposeError


@dataclass
class ContoursParams(ContoursSettings):
    """The heuristic's knobs (:class:`regioncap.config.ContoursSettings`: the defaults are
    DataFlow-MM's; sizes in pixels of the model input), checked when built."""

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ProposeError:
            return ProposeError(f"propose.{name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        object.__setattr__(self, "nms_metric", str(getattr(self.nms_metric, "value", self.nms_metric)))
        if not is_int(self.blur_kernel) or self.blur_kernel < 0 or (self.blur_kernel > 1 and self.blur_kernel % 2 == 0):
            raise bad("blur_kernel", "0, 1 or an odd integer")
        if not is_int(self.block_size) or self.block_size < 3 or self.block_size % 2 == 0:
            raise bad("block_size", "an odd integer >= 3")
        if not is_int(self.close_kernel) or self.close_kernel < 0:
            raise bad("close_kernel", "an integer >= 0")
        if not is_num(self.threshold_c):
            raise bad("threshold_c", "a finite number")
        for name in ("min_area_ratio", "max_area_ratio", "min_aspect", "max_aspect", "max_side_ratio",
                     "nms_threshold"):
            if not is_num(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a finite number >= 0")
        if self.min_area_ratio > self.max_area_ratio:
            raise ProposeError(f"propose.min_area_ratio ({self.min_area_ratio}) is above "
                               f"propose.max_area_ratio ({self.max_area_ratio})")
        if self.min_aspect > self.max_aspect:
            raise ProposeError(f"propose.min_aspect ({self.min_aspect}) is above propose.max_aspect ({self.max_aspect})")
        if self.nms_metric not in NMS_METRICS:
            raise bad("nms_metric", " or ".join(NMS_METRICS))

    @classmethod
    def from_config(cls, cfg: Any) -> "ContoursParams":
        """The params named in ``cfg`` (a config node, dataclass, dict or None); the rest stay default."""
        if cfg is None:
            return cls()
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d: getattr(cfg, k, d))
        missing = object()
        values = {f.name: get(f.name, missing) for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if v is not missing and v is not None})


def contour_boxes(rgb: Any, params: ContoursParams) -> List[Proposal]:
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
    keep = nms(rects, areas, params.nms_threshold, metric=params.nms_metric)
    return [Proposal(rects[i], None, None, "contours") for i in keep]


class ContoursProposer(Proposer):
    """Boxes from image structure alone (no model): DataFlow-MM's heuristic, see the module docstring."""

    name: ClassVar[str] = "contours"
    needs_engine: ClassVar[bool] = False

    def __init__(self, cfg: Any = None, **context: Any) -> None:
        super().__init__(cfg)
        self.params = ContoursParams.from_config(cfg)

    def propose(self, image: Any) -> List[Proposal]:
        """Proposals for a PIL image (any mode; converted to RGB), in its pixels, largest first."""
        import numpy as np

        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        return contour_boxes(np.asarray(image), self.params)

    def describe(self) -> dict:
        return {"proposer": self.name, **{f.name: getattr(self.params, f.name) for f in fields(self.params)}}
