"""``vlm``: the captioning model grounds the objects of the image itself.

What to ask and how to read the answer is the model family's
(:class:`regioncap.families.base.Family`: ``grounding_prompt``,
``grounding_constraint``, ``parse_grounding``): Qwen2.5-VL answers ``bbox_2d``
JSON in pixels, Qwen3-VL the same JSON on a 0-1000 grid, Qwen2-VL box tokens on
a 0-1000 grid. The readers and constraints families share are in :mod:`regioncap.families.grounding`
(``parse_grounding``, ``grounding_regex``, ``grounding_json_schema``). Here the
proposer builds the request (:meth:`VlmProposer.request`) and reads the answer
(:meth:`VlmProposer.parse`); the run sends the requests through its engine.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from regioncap.boxes import nms
from regioncap.components import check, real, whole
from regioncap.choice import Choice
from regioncap.families.grounding import MAX_GROUNDED
from regioncap.propose.base import Proposal, Proposer, ProposeError
from regioncap.record_types import RecordError


class GroundingConstraint(Choice):
    """How a ``vlm`` grounding answer is constrained where the engine can (``propose.constraint``)."""

    regex = "regex"
    json = "json"
    none = "none"


#: ``propose.constraint`` values.
CONSTRAINTS: Tuple[str, ...] = tuple(c.value for c in GroundingConstraint)


class VlmProposer(Proposer):
    """The caption model grounds every object first; its labels are kept beside the captions.

    The run uses it without an engine of its own: the caption stage
    (:class:`regioncap.stages.grounding.Grounder`) sends its :meth:`request` s through the
    caption engine in the same batches as the captions and reads each answer with
    :meth:`parse`. Built with ``engine=...``, :meth:`propose` grounds one image at a time
    (for use outside a run).
    """

    @dataclass
    class Config(Proposer.Config):
        """The caption model grounds the objects first, in its family's format (``bbox_2d`` JSON, box tokens...)."""

        #: Grounding request text; null: the model family's (``Family.grounding_prompt``).
        prompt: Optional[str] = None
        #: Token budget of the grounding answer.
        max_tokens: int = field(default=1024, metadata=check(whole(1)))
        #: How engines with structured outputs constrain the answer: ``regex`` (one compact
        #: JSON layout, no free whitespace), ``json`` (the JSON schema) or ``none``.
        constraint: GroundingConstraint = GroundingConstraint.regex
        #: Most boxes kept from one answer, in answer order after dropping repeats (also the
        #: JSON schema's ``maxItems`` with ``constraint=json``); bounds the work on a hostile answer.
        max_items: int = field(default=MAX_GROUNDED, metadata=check(whole(1)))
        #: Repeated boxes in one answer: NMS at this IoU, answer order kept.
        nms_threshold: float = field(default=0.7, metadata=check(real(0)))
        #: Boxes with a side under this many pixels (model input) after clipping are dropped.
        min_size: float = field(default=1.0, metadata=check(real(0)))

    name: ClassVar[str] = "vlm"
    needs_engine: ClassVar[bool] = True

    def __init__(self, cfg: Any = None, *, engine: Any = None, family: Any = None, **context: Any) -> None:
        """``family``: the model's :class:`~regioncap.families.base.Family` object (default: Qwen2.5-VL's)."""
        super().__init__(cfg)
        c = self.config
        self.engine = engine
        if family is None:
            from regioncap.families.qwen import Qwen25VL

            family = Qwen25VL()
        self.family = family
        self.prompt: str = c.prompt or family.grounding_prompt()
        self.max_tokens = int(c.max_tokens)
        self.nms_threshold = float(c.nms_threshold)
        self.min_size = float(c.min_size)
        self.max_items = int(c.max_items)
        self.constraint = str(getattr(c.constraint, "value", c.constraint))

    @classmethod
    def check(cls, config: Any) -> List[str]:
        constraint = str(getattr(config.constraint, "value", config.constraint))
        if constraint not in CONSTRAINTS:
            return [f"propose.constraint must be one of {', '.join(CONSTRAINTS)}, got {constraint!r}"]
        return []

    def request(self, key: str, image_path: str, image_size: Tuple[int, int], sampling: Any = None) -> Any:
        """The engine :class:`~regioncap.engines.base.Request` grounding one image (already at the model's size).

        Carries the ``constraint`` for engines with structured outputs as the family gives it
        (``Family.grounding_constraint``): :func:`grounding_regex` (default) or
        :func:`grounding_json_schema` for the JSON families; none for Qwen2-VL, which answers
        with box tokens that either would forbid.
        ``sampling`` (an engine ``Sampling``: the caption requests' seed, temperature...) is copied with
        ``max_tokens`` set to the proposer's (``propose.max_tokens``), larger or smaller than the captions'.
        """
        from dataclasses import replace

        from regioncap.engines.base import Request, Sampling

        s = sampling if sampling is not None else Sampling()
        s = replace(s, max_tokens=self.max_tokens)
        constraint = self.family.grounding_constraint(self.constraint, self.max_items)
        return Request(key=key, image_path=str(image_path), prompt=self.prompt, sampling=s,
                       regex=constraint.get("regex"), json_schema=constraint.get("json_schema"),
                       image_size=tuple(image_size), meta={"task": "ground"})

    def parse(self, text: Any, width: float, height: float) -> List[Proposal]:
        """The family's ``parse_grounding``, then NMS at ``nms_threshold`` (drops repeats),
        keeping the first ``max_items`` distinct boxes in answer order."""
        props = self.family.parse_grounding(text, width, height, min_size=self.min_size)
        # Capped inside the suppression: NMS over every box of a hostile answer is quadratic.
        keep = nms([p.bbox for p in props], None, self.nms_threshold, limit=self.max_items)
        return [props[i] for i in sorted(keep)]

    def propose(self, image: Any) -> List[Proposal]:
        """Ground one PIL image through the engine (one request); raises :class:`ProposeError` on an engine error."""
        if self.engine is None:
            raise ProposeError("the vlm proposer needs the caption engine: build it with "
                               "build_proposer(cfg, engine=engine, family=build_family(cfg.model))")
        with tempfile.TemporaryDirectory(prefix="regioncap-ground-") as tmp:
            path = os.path.join(tmp, "image.png")
            image.convert("RGB").save(path, format="PNG")
            (resp,) = self.engine.generate([self.request("ground", path, image.size)])
        if not resp.ok:
            err = RecordError.from_dict(resp.error or {})
            raise ProposeError(f"grounding request failed: {err.kind or 'error'}: {err.message or ''}")
        return self.parse(resp.text, image.width, image.height)

    def describe(self) -> Dict[str, Any]:
        return {"proposer": self.name, "family": self.family.name, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "nms_threshold": self.nms_threshold}
