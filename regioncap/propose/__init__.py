"""Region proposals: boxes for rows that come without them, resolved by name.

A proposer looks at one image, already at the model's input resolution, and
returns :class:`Proposal` s in that image's pixels. :data:`PROPOSERS` maps a
name (``propose.method``) to ``"module:Class"``; the module is imported only
when that proposer is built, so OpenCV (``contours``) or a detector's weights
are never touched by a run that does not use them.

Adding a detector (OWLv2, Grounding-DINO, SAM boxes) is one module holding a
:class:`Proposer` subclass plus one ``conf/propose/NAME.yaml``; see docs/design.md.

The pure helpers (in :mod:`regioncap.propose.plan`, re-exported here) decide,
per row, whether to propose (:func:`should_propose`) and which regions it is
captioned with (:func:`plan_regions`, built on :func:`select_proposals`), and,
before a run, whether the box field is misnamed (:func:`check_box_key`), so
every stage applies the same rules.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Optional, Type

from regioncap.boxes import Box
from regioncap.propose.base import Proposal, Proposer, ProposeError
from regioncap.propose.plan import (
    INPUT_SOURCE, PROPOSE_WHEN, BoxKeyProblem, PlannedRegion, RegionPlan, check_box_key, plan_regions,
    select_proposals, should_propose,
)

#: name -> "module:Class"; a module is imported only when its proposer is built.
PROPOSERS: Dict[str, str] = {
    "contours": "regioncap.propose.contours:ContoursProposer",
    "vlm": "regioncap.propose.vlm:VlmProposer",
}

#: ``propose.method`` that proposes nothing (rows keep exactly their given boxes).
NONE = "none"


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
    method = getattr(cfg, "method", None) or NONE
    method = getattr(method, "value", method)
    if method == NONE:
        return None
    cls = proposer_class(method)
    return cls(cfg, **context)


__all__ = [
    "PROPOSERS", "PROPOSE_WHEN", "NONE", "INPUT_SOURCE", "Box", "Proposal", "Proposer", "ProposeError",
    "PlannedRegion", "RegionPlan", "BoxKeyProblem",
    "proposer_class", "build_proposer", "should_propose", "select_proposals", "plan_regions", "check_box_key",
]
