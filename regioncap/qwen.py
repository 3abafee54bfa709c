"""Facts about Qwen-VL model folders: ``config.json`` fixes (the family's other facts: :mod:`regioncap.families.qwen`).

A leaf module (standard library only), read by whoever loads or builds a model
folder: the engines, :mod:`regioncap.random_weights` and the tests.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Optional


def fixed_rope_scaling(config_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Return a corrected ``rope_scaling`` for an old Qwen2/2.5-VL ``config.json``, or None.

    Qwen2-VL and Qwen2.5-VL checkpoints published before transformers settled on
    ``rope_type`` have ``"rope_scaling": {"type": "mrope", "mrope_section": [...]}``.
    Some transformers versions then fail with ``KeyError: "Missing required keys
    in rope_scaling for 'rope_type'='None'"``. M-RoPE is the default rotary
    embedding applied per section, so newer transformers maps ``mrope`` to
    ``rope_type="default"`` (keeping ``mrope_section``); this does the same,
    and sets the legacy ``type`` to the same value so no reader sees a conflict.

    Looks at the top level first (the flat layout of hub configs), then in
    ``text_config``. None when there is nothing to fix (no rope_scaling, or it
    already has a ``rope_type``).
    """
    holders = [config_dict]
    if isinstance(config_dict.get("text_config"), dict):
        holders.append(config_dict["text_config"])
    for holder in holders:
        scaling = holder.get("rope_scaling")
        if not isinstance(scaling, dict) or scaling.get("rope_type"):
            continue
        legacy = scaling.get("type")
        if legacy is None and "mrope_section" not in scaling:
            continue
        fixed = dict(scaling)
        rope_type = "default" if legacy in (None, "mrope") else legacy
        fixed["rope_type"] = rope_type
        fixed["type"] = rope_type
        return fixed
    return None


def patched_config_dict(config_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A copy of ``config_dict`` with every old-style ``rope_scaling`` fixed, or None if none needed it."""
    fixed = fixed_rope_scaling(config_dict)
    if fixed is None:
        return None
    patched = copy.deepcopy(config_dict)
    for holder in (patched, patched.get("text_config")):
        if isinstance(holder, dict) and isinstance(holder.get("rope_scaling"), dict):
            one = fixed_rope_scaling({"rope_scaling": holder["rope_scaling"]})
            if one is not None:
                holder["rope_scaling"] = one
    return patched


def read_config_dict(model_path: str) -> Optional[Dict[str, Any]]:
    """The parsed ``config.json`` of a local model folder, or None when there is none."""
    try:
        with open(Path(model_path) / "config.json", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
