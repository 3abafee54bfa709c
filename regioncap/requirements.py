"""Optional packages a config needs, checked before any work starts.

``check_requirements(cfg)`` looks up every module the classes the config's
component groups name (engine, logger, executor...) list in their ``requires``,
with ``importlib.util.find_spec`` (nothing heavy is imported), and raises
:class:`~regioncap.errors.RunError` with one line naming the extra to install
(``pip install "regioncap[transformers]"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

from regioncap.components import GROUPS, OPTIONAL_GROUPS, TARGET, class_of, group_base, requirement_problem, short_name
from regioncap.errors import RunError
from regioncap.stages import CaptionStage

if TYPE_CHECKING:
    from regioncap.config import RegionCapConfig


def missing_requirements(cfg: RegionCapConfig) -> List[str]:
    """One line per unmet requirement of ``cfg`` (empty when everything is installed)."""
    problems = []
    for group in GROUPS:
        node = getattr(cfg, group)
        if node is None or (group == "engine" and CaptionStage.name not in cfg.stages):
            continue  # the engine is built by the caption stage only
        if group in OPTIONAL_GROUPS and getattr(node, TARGET, None) is None:
            continue  # propose=none: no class, nothing to install
        node = group_base(group).upgraded(node, group)
        cls = class_of(node, group_base(group), group)
        built = cls.chosen(node)  # engine=auto: the engine it becomes here
        picked = f"{group}={short_name(cls)}" + (f" (here: {short_name(built)})" if built is not cls else "")
        problem = requirement_problem(built, picked)
        if problem:
            problems.append(problem)
        for key, part in built.parts(node):  # logger=many: each tracker it uses
            part_cls = class_of(part, group_base(group), key)
            problem = requirement_problem(part_cls, f"{picked} with {key.rpartition('.')[2]}")
            if problem:
                problems.append(problem)
    return problems


def check_requirements(cfg: RegionCapConfig) -> None:
    """Raise :class:`RunError` (one line per missing extra) when ``cfg`` needs a package that is not installed."""
    problems = missing_requirements(cfg)
    if problems:
        raise RunError("; ".join(problems))
