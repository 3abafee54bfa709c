"""The one small interface every region proposer implements (no heavy imports here)."""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

from regioncap.boxes import Box
from regioncap.choice import Choice
from regioncap.components import Component, check, optional, range_problems, real, whole
from regioncap.errors import RunError


class ProposeWhen(Choice):
    """Which rows get region proposals (``propose.when``)."""

    #: Rows whose box field is absent or null (DataFlow-MM's rule); ``[]`` stays no regions.
    missing = "missing"
    #: Every row; given boxes are ignored (with them as ground truth for proposal quality).
    always = "always"
    #: Every row: its given boxes plus proposals that overlap none of them above ``add_iou``.
    add = "add"


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


class Proposer(Component, abc.ABC):
    """Base class of every proposer: a component named by ``_target_`` in ``conf/propose/NAME.yaml``.

    Built once per process from the ``propose`` config section (the preparation
    workers build their own); must be cheap to call per image and must not keep
    per-image state. ``propose=none`` names no class: rows keep their given boxes.
    """

    @dataclass
    class Config(Component.Config):
        """What every proposer has: which rows get proposals and how many are kept."""

        #: ``missing`` (rows whose box field is absent or null), ``always`` (every row; given
        #: boxes become the truth), ``add`` (given boxes plus proposals that overlap none of them).
        when: ProposeWhen = ProposeWhen.missing
        #: ``when=add``: a proposal overlapping a given box above this IoU is dropped.
        add_iou: float = field(default=0.5, metadata=check(real(0, 1)))
        #: Most proposals kept per image, best first (the rest are counted and recorded); null: all.
        #: Kept proposals are chunked by ``max_boxes`` like given boxes, never dropped.
        max_regions: Optional[int] = field(default=20, metadata=check(optional(whole(1))))

    #: Short name (``propose=contours``): the ``method`` of the records and the ``source`` of its proposals.
    name: ClassVar[str] = "proposer"
    #: True when it needs the captioning engine (``vlm``): the run must build the
    #: engine before proposing, and propose in the process that holds it.
    needs_engine: ClassVar[bool] = False

    def __init__(self, cfg: Any = None, **context: Any) -> None:
        #: The settings, as this class's :class:`Config` (checked: :class:`ProposeError` names the key).
        self.config = self.settings(cfg)
        self.cfg = cfg

    @classmethod
    def settings(cls, cfg: Any = None) -> Any:
        """``cfg`` (a config node, a mapping, an object with attributes, a ``Config``, or None) as
        :class:`Config`: the fields it has, the defaults for the rest; values outside their
        declared range raise :class:`ProposeError` naming ``propose.<key>``."""
        if isinstance(cfg, cls.Config):
            config = cfg
        else:
            get = (lambda k: cfg.get(k, _UNSET)) if hasattr(cfg, "get") else (lambda k: getattr(cfg, k, _UNSET))
            values = {f.name: get(f.name) for f in dataclasses.fields(cls.Config)} if cfg is not None else {}
            config = cls.Config(**{k: v for k, v in values.items() if v is not _UNSET})
        problems = range_problems(dataclasses.asdict(config), type(config), "propose") + cls.check(config)
        if problems:
            raise ProposeError("; ".join(problems))
        return config

    @classmethod
    def check(cls, config: Any) -> List[str]:
        """What the field ranges cannot say (one field against another), one line each; none here."""
        return []

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


#: A field the given settings do not have (so the ``Config`` default applies).
_UNSET = object()
