"""Region proposals: boxes for rows that come without them, from the class ``propose._target_`` names.

A proposer looks at one image, already at the model's input resolution, and
returns :class:`Proposal` s in that image's pixels. ``conf/propose/NAME.yaml``
names its :class:`Proposer` subclass by ``_target_`` (``regioncap.propose.contours.ContoursProposer``);
the module is imported only when the section is read, and OpenCV (``contours``)
or a detector's weights only when it proposes. ``propose=none`` names no class:
rows keep exactly their given boxes.

Adding a detector (OWLv2, Grounding-DINO, SAM boxes) is one module holding a
:class:`Proposer` subclass (with its ``Config``) plus one ``conf/propose/NAME.yaml``,
in regioncap or in a package of one's own (docs/plugins.md).

The pure helpers (in :mod:`regioncap.propose.plan`, re-exported here) decide,
per row, whether to propose (:func:`should_propose`) and which regions it is
captioned with (:func:`plan_regions`, built on :func:`select_proposals`), and,
before a run, whether the box field is misnamed (:func:`check_box_key`), so
every stage applies the same rules.
"""

from __future__ import annotations

from typing import Any, Optional, Type

from regioncap.boxes import Box
from regioncap.components import TARGET, class_of, setting, short_name
from regioncap.propose.base import Proposal, Proposer, ProposeError, ProposeWhen
from regioncap.propose.plan import (
    INPUT_SOURCE, PROPOSE_WHEN, BoxKeyProblem, PlannedRegion, RegionPlan, check_box_key, plan_regions,
    select_proposals, should_propose,
)

#: The name of "no proposer" (``propose=none``: the section names no class).
NONE = "none"


def proposer_type(section: Any) -> Optional[Type[Proposer]]:
    """The :class:`Proposer` subclass the ``propose`` section names by ``_target_`` (its module
    imported); None when it names none (``propose=none``, or no section).

    Raises:
        RunError: the target does not import, or is not a :class:`Proposer` (the message names ``propose._target_``).
    """
    if setting(section, TARGET) is None:
        return None
    return class_of(section, Proposer, "propose")


def proposer_name(section: Any) -> str:
    """The short name of the section's proposer (``contours``, ``vlm``; ``none`` for none): the
    ``method`` of the records, the run key and the messages."""
    cls = proposer_type(section)
    return NONE if cls is None else short_name(cls)


def build_proposer(section: Any, **context: Any) -> Optional[Proposer]:
    """The proposer the ``propose`` section names, built with its settings; None for ``propose=none``.

    ``context`` goes to the class as keyword arguments: a proposer with
    ``needs_engine`` takes ``engine=`` (the caption engine) and ``family=``
    (the model's :class:`~regioncap.families.base.Family` object); the others ignore what they do not use.
    """
    cls = proposer_type(section)
    return None if cls is None else cls(section, **context)


__all__ = [
    "PROPOSE_WHEN", "ProposeWhen", "NONE", "INPUT_SOURCE", "Box", "Proposal", "Proposer", "ProposeError",
    "PlannedRegion", "RegionPlan", "BoxKeyProblem",
    "proposer_type", "proposer_name", "build_proposer", "should_propose", "select_proposals", "plan_regions", "check_box_key",
]
