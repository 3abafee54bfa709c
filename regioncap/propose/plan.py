"""Per-row decisions around proposals, as pure functions the stages call.

- :func:`should_propose`: whether a row gets proposals under ``propose.when``.
- :func:`select_proposals`: which proposals are kept (``when=add`` overlap
  filter, the ``max_regions`` cap).
- :func:`plan_regions`: the regions one row is captioned with, given its own
  boxes and the proposals (original pixels), under ``propose.when``; each
  region says where it came from.
- :func:`check_box_key`: before a run starts, whether the box field is missing
  from every row looked at (a misnamed ``data.bbox_key``), with a message that
  names the keys the rows do have and the fix.

Standard library only.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from regioncap.boxes import Box, iou
from regioncap.propose.base import Proposal, ProposeWhen

#: ``source`` of a region that came with the row.
INPUT_SOURCE = "input"

#: Values of ``propose.when``.
PROPOSE_WHEN: Tuple[str, ...] = tuple(w.value for w in ProposeWhen)


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


@dataclass(frozen=True)
class PlannedRegion:
    """One region to caption: its box in original pixels and where it came from."""

    box: Box
    #: ``input`` for a given box, else the proposer's name (``contours``, ``vlm``...).
    source: str
    #: Position in the row's box list for a given box (``source_index`` in the records); None for proposals.
    source_index: Optional[int] = None
    score: Optional[float] = None
    label: Optional[str] = None


@dataclass
class RegionPlan:
    """What :func:`plan_regions` decided for one row."""

    regions: List[PlannedRegion] = field(default_factory=list)
    #: Proposals the proposer returned (before the ``add`` filter and the cap).
    proposed: int = 0
    #: Proposals dropped by ``when=add`` because a given box already covers them.
    overlapping_given: int = 0
    #: Proposals left out by ``propose.max_regions`` (counted, to be recorded).
    capped: int = 0
    #: ``when=always``: the row's own boxes, not captioned, kept as the truth for proposal quality.
    truth: List[Box] = field(default_factory=list)
    #: The input index (``source_index``) of each ``truth`` box: where its references are.
    truth_index: List[int] = field(default_factory=list)


def plan_regions(
    given: Sequence[Tuple[int, Box]],
    proposals: Optional[Sequence[Proposal]],
    when: Any,
    *,
    add_iou: float = 0.5,
    max_regions: Optional[int] = None,
) -> RegionPlan:
    """The regions of one row.

    ``given`` is ``ParsedBoxes.boxes`` (``(source index, Box)`` in original
    pixels); ``proposals`` are already in original pixels (``Proposal.scale``),
    or None when the row was not proposed for (:func:`should_propose`
    said no, or ``propose=none``).

    - no proposals: the given boxes, as ``source: input``;
    - ``missing``: the proposals (the row had no box field, so ``given`` is empty);
    - ``always``: the proposals only; the given boxes go to ``truth``;
    - ``add``: the given boxes, then the proposals that overlap none of them above ``add_iou``.

    Proposals are kept in the proposer's order (best first) and capped at
    ``max_regions``; given boxes are never dropped.
    """
    inputs = [PlannedRegion(box, INPUT_SOURCE, index) for index, box in given]
    if proposals is None:
        return RegionPlan(regions=inputs)
    when = _value(when)
    boxes = [b for _, b in given]
    after_add, _ = select_proposals(boxes, proposals, when, add_iou=add_iou, max_regions=None)
    kept, capped = select_proposals([], after_add, "missing", max_regions=max_regions)
    plan = RegionPlan(proposed=len(proposals), overlapping_given=len(proposals) - len(after_add), capped=capped)
    proposed = [PlannedRegion(p.box(), p.source, None, p.score, p.label) for p in kept]
    if when == "always":
        plan.regions, plan.truth, plan.truth_index = proposed, boxes, [int(i) for i, _ in given]
    else:  # add; missing (where the row has no given boxes)
        plan.regions = inputs + proposed
    return plan


@dataclass(frozen=True)
class BoxKeyProblem:
    """The box field is missing from every row looked at."""

    message: str
    #: True when nothing would be captioned (``propose=none``): the run should stop with ``message``.
    fatal: bool
    #: Keys whose values look like lists of boxes: the likely ``data.bbox_key``.
    candidates: Tuple[str, ...] = ()


def _looks_like_boxes(value: Any) -> bool:
    if isinstance(value, str):
        return False
    if isinstance(value, Mapping):
        return "bbox" in value or {"x", "y", "w", "h"} <= set(value) or {"x1", "y1", "x2", "y2"} <= set(value)
    if not isinstance(value, (list, tuple)) or not value:
        return False
    first = value[0]
    if isinstance(first, (list, tuple)) and len(first) == 4:
        return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in first)
    if isinstance(first, Mapping):
        return _looks_like_boxes(first)
    return len(value) == 4 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)


def check_box_key(rows: Sequence[Mapping[str, Any]], bbox_key: str, propose_method: str) -> Optional[BoxKeyProblem]:
    """A :class:`BoxKeyProblem` when no row of ``rows`` (the first rows of the data) has ``bbox_key``, else None.

    ``rows`` are the rows' fields as read (for an ``InputRow``: ``{**row.extra,
    bbox_key: row.bbox}`` when ``row.bbox`` is not None, else ``row.extra``); a
    null box field counts as missing. Rows that are empty mappings (unreadable
    lines) are ignored; no rows at all gives None. The message names the keys
    the rows have, the keys that look like boxes, and the two fixes.
    """
    seen = [r for r in rows if r]
    if not seen or any(r.get(bbox_key) is not None for r in seen):
        return None
    keys = sorted({str(k) for r in seen for k in r})
    candidates = tuple(k for k in keys if any(_looks_like_boxes(r.get(k)) for r in seen))
    fix_key = f"data.bbox_key={candidates[0]}" if candidates else "data.bbox_key=<the field with the boxes>"
    n = len(seen)
    head = (f"none of the first {n} row(s) has a {bbox_key!r} field (data.bbox_key); their keys: "
            f"{', '.join(keys) or '(none)'}")
    if candidates:
        head += f"; {', '.join(repr(c) for c in candidates)} look{'s' if len(candidates) == 1 else ''} like boxes"
    method = getattr(propose_method, "value", propose_method)
    if method in (None, "none"):
        return BoxKeyProblem(
            f"{head}. With propose=none nothing would be captioned: set {fix_key} if the boxes are there, "
            "or let regions be proposed (propose=contours or propose=vlm).", True, candidates)
    return BoxKeyProblem(
        f"{head}. Every row gets propose={method} regions instead; if the rows do have boxes, set {fix_key}.",
        False, candidates)
