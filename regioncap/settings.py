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
from regioncap.config import RegionCapConfig
from regioncap.errors import RunError

__all__ = ["check_config", "check_settings", "typed_config"]


def check_settings(cfg: Any) -> None:
    """Raise one :class:`RunError` naming every setting of ``cfg`` outside what it can mean."""
    from omegaconf import OmegaConf

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


def typed_config(cfg: Any) -> RegionCapConfig:
    """The composed config as typed objects, once, at the job's start: a :class:`RegionCapConfig`
    whose component groups are instances of their classes' ``Config`` dataclasses (a user's own
    class too), every interpolation resolved.

    Types and checks ``cfg`` first (:func:`check_config`, which types the
    groups of ``cfg`` in place), so every error names its key. ``cfg`` is the composed config (a
    ``DictConfig``), or a plain dict with every group given; a :class:`RegionCapConfig` is
    returned as it is. Nothing below the job reads a ``DictConfig``: this is the boundary.
    """
    if isinstance(cfg, RegionCapConfig):
        return cfg
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not (isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is RegionCapConfig):
        # A plain dict or an untyped node: onto the schema, so its keys and types are checked.
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(RegionCapConfig), cfg)
        except OmegaConfBaseException as exc:
            raise RunError(f"{getattr(exc, 'full_key', '') or 'config'}: {str(exc).splitlines()[0]}") from None
    check_config(cfg)
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:  # a value still missing (???), or one that does not resolve
        raise RunError(f"{getattr(exc, 'full_key', '') or 'config'}: {str(exc).splitlines()[0]}") from None
    assert isinstance(typed, RegionCapConfig)
    return typed
