"""Typing and range checks of the composed config, before anything is read or written.

Hydra refuses a wrong type or an unknown key of a shipped option while
composing; :func:`check_config` types again every component group (engine,
executor, logger...) against the ``Config`` of the class its ``_target_`` names,
so a user's own option is checked the same way (:func:`regioncap.components.type_groups`).

A number of the right type that cannot mean anything (a batch of 0, a
``top_p`` of 2, a NaN line width, ``max_pixels`` under ``min_pixels``) would
otherwise fail later: once per row as error rows, as a traceback from deep
inside a stage, or not at all, silently clamped. :func:`check_settings` finds
every such value at once and names each with what it must be. The ranges are
metadata of the schema fields that declare the settings
(``field(default=8, metadata=check(whole(1)))``, see :mod:`regioncap.components`).
Settings with checks of their own elsewhere are left to them:
``data.skip``/``limit``/shards (:func:`regioncap.data.check_data_config`), the
``propose`` heuristics (the proposer's ``check``), ``workers``
(:mod:`regioncap.prepare`), the Ray pool.
"""

from __future__ import annotations

from typing import Any

from regioncap.components import finite_number, range_problems, type_groups
from regioncap.errors import RunError

__all__ = ["check_config", "check_settings"]


def check_settings(cfg: Any) -> None:
    """Raise one :class:`RunError` naming every setting of ``cfg`` outside what it can mean."""
    from omegaconf import OmegaConf

    from regioncap.config import RegionCapConfig

    problems = range_problems(cfg, RegionCapConfig, "")
    lo = OmegaConf.select(cfg, "model.min_pixels", default=None)
    hi = OmegaConf.select(cfg, "model.max_pixels", default=None)
    if finite_number(lo) and finite_number(hi) and 0 < hi < lo:
        problems.append(f"model.max_pixels ({hi}) is under model.min_pixels ({lo}): no image size fits both")
    lo = OmegaConf.select(cfg, "model.min_tiles", default=None)  # a tiling family's budget (InternVL)
    hi = OmegaConf.select(cfg, "model.max_tiles", default=None)
    if finite_number(lo) and finite_number(hi) and 0 < hi < lo:
        problems.append(f"model.max_tiles ({hi}) is under model.min_tiles ({lo}): no tile grid fits both")
    if problems:
        raise RunError("; ".join(problems))


def check_config(cfg: Any) -> None:
    """Type the component groups of ``cfg`` (in place) and check every value range: one
    :class:`RunError` naming the key, before anything is read, built or started."""
    type_groups(cfg)
    check_settings(cfg)
