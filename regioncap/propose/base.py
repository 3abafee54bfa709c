"""The one small interface every region proposer implements (no heavy imports here)."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

from regioncap.boxes import Box
from regioncap.errors import RunError





class ProposeError(RunError):
    """A proposer cannot be built or cannot run (unknown name, missing package, no engine)."""


@dataclass(frozen=True)
class Proposal:
    """One proposed region of an image.

    ``bbox`` is ``(x1, y1, x2, y2)`` as floats in pixels of the image given to
    :meth:`Proposer.propose` (the model's input resolution); :meth:`scale`
    maps it to the original image.
    """

    bbox: Tuple[float, float, float, float]
    #: The method's confidence where it has one (a detector's score); None otherwise.
    score: Optional[float] = None
    #: What the method says the region is (the VLM's or a detector's label); None otherwise.
    label: Optional[str] = None
    #: The proposer that made it (``contours``, ``vlm``...), written as the region's ``source``.
    source: str = ""

    def __post_init__(self) -> None:
        values = tuple(float(v) for v in self.bbox)
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"a proposal's bbox is 4 finite numbers (x1, y1, x2, y2), got {self.bbox!r}")
        object.__setattr__(self, "bbox", values)

    def box(self) -> Box:
        """The region as a :class:`~regioncap.boxes.Box` (same pixels as ``bbox``)."""
        return Box(*self.bbox)

    def scale(self, sx: float, sy: float) -> "Proposal":
        """The same proposal in an image resized by ``sx`` horizontally and ``sy`` vertically.

        From the model's input (``tw x th``) to the original (``W x H``): ``scale(W / tw, H / th)``.
        """
        x1, y1, x2, y2 = self.bbox
        return Proposal((x1 * sx, y1 * sy, x2 * sx, y2 * sy), self.score, self.label, self.source)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready ``{bbox, score, label, source}``."""
        return {"bbox": [round(v, 2) for v in self.bbox], "score": self.score, "label": self.label,
                "source": self.source}


class Proposer(abc.ABC):
    """Base class of every proposer; subclasses are listed in ``regioncap.propose.PROPOSERS``.

    Built once per process from the ``propose`` config section (the preparation
    workers build their own); must be cheap to call per image and must not keep
    per-image state.
    """

    #: Registry name; also the ``source`` of its proposals.
    name: ClassVar[str] = "proposer"
    #: True when it needs the captioning engine (``vlm``): the run must build the
    #: engine before proposing, and propose in the process that holds it.
    needs_engine: ClassVar[bool] = False

    def __init__(self, cfg: Any = None, **context: Any) -> None:
        self.cfg = cfg

    @abc.abstractmethod
    def propose(self, image: Any) -> List[Proposal]:
        """Proposals for ``image`` (a PIL image at the model's input resolution), best first.

        Boxes are in that image's pixels, inside it, each with a positive width and height.
        """

    def propose_many(self, images: Sequence[Any]) -> List[List[Proposal]]:
        """:meth:`propose` for each image, in order (proposers that batch override this)."""
        return [self.propose(image) for image in images]

    def describe(self) -> Dict[str, Any]:
        """What was built, for the log and the run manifest."""
        return {"proposer": self.name}
