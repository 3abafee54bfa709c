"""Range checks of the composed config that its schema's types cannot express.

Hydra refuses a wrong type or an unknown key while composing. A number of the
right type that cannot mean anything (a batch of 0, a ``top_p`` of 2, a NaN
line width, ``max_pixels`` under ``min_pixels``) would otherwise fail later:
once per row as error rows, as a traceback from deep inside a stage, or not at
all, silently clamped. :func:`check_settings` finds every such value at once,
before anything is read or written, and names each with what it must be.

One table, :data:`RULES`: a key a config does not have (an engine's own
settings under another engine) is not checked. Settings with checks of their
own elsewhere are left to them: ``data.skip``/``limit``/shards
(:func:`regioncap.data.check_data_config`), the ``propose`` heuristics (the
proposer's ``check``), ``workers`` (:mod:`regioncap.prepare`), the Ray pool.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

from regioncap.errors import RunError

__all__ = ["RULES", "check_settings"]

_MISSING = object()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole(lo: int, hi: Optional[int] = None) -> Tuple[Callable[[Any], bool], str]:
    """An integer in ``lo..hi``."""
    ok = (lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v and (hi is None or v <= hi))
    return ok, f"a whole number >= {lo}" if hi is None else f"a whole number in {lo}..{hi}"


def real(lo: float, hi: Optional[float] = None, *, above: bool = False) -> Tuple[Callable[[Any], bool], str]:
    """A finite number ``>= lo`` (``> lo`` with ``above``), at most ``hi``."""
    def ok(v: Any) -> bool:
        return _number(v) and (v > lo if above else v >= lo) and (hi is None or v <= hi)

    low = f"> {lo:g}" if above else f">= {lo:g}"
    return ok, f"a finite number {low}" + ("" if hi is None else f" and <= {hi:g}")


def optional(rule: Tuple[Callable[[Any], bool], str]) -> Tuple[Callable[[Any], bool], str]:
    """``rule``, or null."""
    ok, what = rule
    return (lambda v: v is None or ok(v)), f"null or {what}"


#: ``(dotted key, (test, what it must be))``, checked in this order.
RULES: List[Tuple[str, Tuple[Callable[[Any], bool], str]]] = [
    ("max_boxes", whole(1)),
    ("max_error_rate", real(0, 1)),
    ("commit_every", whole(1)),
    ("threads", optional(whole(1))),
    ("model.min_pixels", whole(1)),
    ("model.max_pixels", whole(1)),
    ("model.patch_size", whole(1)),
    ("model.merge_size", whole(1)),
    ("model.max_model_len", optional(whole(1))),
    ("engine.batch_size", whole(1)),
    ("engine.gpu_memory_utilization", real(0, 1, above=True)),
    ("engine.tensor_parallel_size", whole(1)),
    ("engine.concurrency", whole(1)),
    ("engine.timeout_s", real(0, above=True)),
    ("engine.max_retries", whole(0)),
    ("engine.backoff_s", real(0)),
    ("engine.max_backoff_s", real(0)),
    ("draw.line_width", real(0, above=True)),
    ("draw.min_line_px", whole(1)),
    ("draw.label_size", real(0, above=True)),
    ("draw.min_label_px", whole(1)),
    ("draw.dim", real(0, 1)),
    ("draw.jpeg_quality", whole(1, 100)),
    ("prompt.crop_margin", real(0)),
    ("propose.add_iou", real(0, 1)),
    ("propose.max_regions", optional(whole(1))),
    ("propose.max_tokens", whole(1)),
    ("propose.max_items", whole(1)),
    ("sampling.temperature", real(0)),
    ("sampling.top_p", real(0, 1, above=True)),
    ("sampling.max_tokens", whole(1)),
    ("limits.max_image_pixels", whole(1)),
    ("limits.max_file_bytes", whole(1)),
    ("metrics.meteor_timeout_s", real(0, above=True)),
    ("logger.log_images", whole(0)),
]


def check_settings(cfg: Any) -> None:
    """Raise one :class:`RunError` naming every setting of ``cfg`` outside what it can mean."""
    from omegaconf import OmegaConf

    def _get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=_MISSING)

    problems = []
    for key, (ok, what) in RULES:
        value = _get(key)
        if value is not _MISSING and not ok(value):
            problems.append(f"{key} must be {what}, got {value!r}")
    lo, hi = _get("model.min_pixels"), _get("model.max_pixels")
    if _number(lo) and _number(hi) and 0 < hi < lo:
        problems.append(f"model.max_pixels ({hi}) is under model.min_pixels ({lo}): no image size fits both")
    if problems:
        raise RunError("; ".join(problems))
