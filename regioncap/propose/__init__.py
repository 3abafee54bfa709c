"""Region proposals: boxes for rows that come without them, resolved by name.

A proposer looks at one image, already at the model's input resolution, and
returns :class:`Proposal` s in that image's pixels. :data:`PROPOSERS` maps a
name (``propose.method``) to ``"module:Class"``; the module is imported only
when that proposer is built, so OpenCV (``contours``) or a detector's weights
are never touched by a run that does not use them.

Adding a detector (OWLv2, Grounding-DINO, SAM boxes) is one module holding a
:class:`Proposer` subclass plus one ``conf/propose/NAME.yaml``; see docs/design.md.

The pure helpers decide, per row, whether to propose (:func:`should_propose`)
and which regions it is captioned with (:func:`plan_regions`, built on
:func:`select_proposals`), and, before a run, whether the box field is
misnamed (:func:`check_box_key`), so every stage applies the same rules.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from regioncap.boxes import Box, iou
from regioncap.propose.base import Proposal, Proposer, ProposeError

#: name -> "module:Class"; a module is imported only when its proposer is built.
PROPOSERS: Dict[str, str] = {
    "contours": "regioncap.propose.contours:ContoursProposer",
    "vlm": "regioncap.propose.vlm:VlmProposer",
}

#: ``propose.method`` that proposes nothing (rows keep exactly their given boxes).
NONE = "none"

#: Values of ``propose.when`` (the schema holds them as the ``ProposeWhen`` enum).
PROPOSE_WHEN: Tuple[str, ...] = ("missing", "always", "add")


def proposer_class(method: str) -> Type[Proposer]:
    """The :class:`Proposer` subclass registered as ``method`` (imports its module).

    Raises:
        ProposeError: ``method`` is not in :data:`PROPOSERS`, or its module cannot be imported
            (the message names the method and the missing package).
    """
    if method not in PROPOSERS:
        raise ProposeError(f"unknown proposer {method!r} (propose.method); choose one of "
                           f"{sorted(PROPOSERS) + [NONE]}")
    module_name, cls_name = PROPOSERS[method].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProposeError(f"proposer {method!r} cannot be imported: {exc}") from exc
    return getattr(module, cls_name)


def build_proposer(cfg: Any, **context: Any) -> Optional[Proposer]:
    """The proposer ``cfg.method`` names, built from the ``propose`` config section; None for ``none``.

    ``context`` goes to the class as keyword arguments: a proposer with
    ``needs_engine`` takes ``engine=`` (the caption engine) and ``family=``
    (``model.family``); the others ignore what they do not use.
    """
    method = _value(getattr(cfg, "method", None) or NONE)
    if method == NONE:
        return None
    cls = proposer_class(method)
    return cls(cfg, **context)


def _value(v: Any) -> Any:
    # Enum members from the schema (ProposeWhen) compare by value; plain strings pass through.
    return getattr(v, "value", v)


def should_propose(raw_bbox: Any, when: Any) -> bool:
    """Whether a row whose box field holds ``raw_bbox`` gets proposals under ``propose.when``.

    ``missing``: only when the field is absent or null (read by the data layer as
    None), as DataFlow-MM does; an explicit empty list stays a row with no
    regions. ``always`` and ``add``: every row.
    """
    when = _value(when)
    if when not in PROPOSE_WHEN:
        raise ValueError(f"propose.when must be one of {', '.join(PROPOSE_WHEN)}, got {when!r}")
    if when == "missing":
        return raw_bbox is None
    return True


def select_proposals(
    given: Sequence[Any],
    proposals: Sequence[Proposal],
    when: Any,
    *,
    add_iou: float = 0.5,
    max_regions: Optional[int] = None,
) -> Tuple[List[Proposal], int]:
    """``(proposals to caption, how many the cap left out)``.

    ``given`` are the row's own boxes (:class:`~regioncap.boxes.Box` or xyxy), in
    the same pixels as ``proposals``. With ``when=add`` a proposal whose IoU
    with any given box is above ``add_iou`` is dropped (the given box already
    covers it); ``missing`` and ``always`` keep every proposal (under
    ``always`` the caller ignores the given boxes). ``max_regions`` keeps the
    first that many, in the proposer's order (best first); None keeps all.
    Given boxes are never dropped.
    """
    when = _value(when)
    if when not in PROPOSE_WHEN:
        raise ValueError(f"propose.when must be one of {', '.join(PROPOSE_WHEN)}, got {when!r}")
    kept = list(proposals)
    if when == "add" and given:
        kept = [p for p in kept if all(iou(p.bbox, g) <= add_iou for g in given)]
    capped = 0
    if max_regions is not None and len(kept) > max_regions:
        capped = len(kept) - max(0, int(max_regions))
        kept = kept[: max(0, int(max_regions))]
    return kept, capped


from regioncap.propose.plan import (  # noqa: E402  (plan uses select_proposals above)
    INPUT_SOURCE, BoxKeyProblem, PlannedRegion, RegionPlan, check_box_key, plan_regions,
)

__all__ = [
    "PROPOSERS", "PROPOSE_WHEN", "NONE", "INPUT_SOURCE", "Box", "Proposal", "Proposer", "ProposeError",
    "PlannedRegion", "RegionPlan", "BoxKeyProblem",
    "proposer_class", "build_proposer", "should_propose", "select_proposals", "plan_regions", "check_box_key",
]
