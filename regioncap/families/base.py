"""A model family: the conventions regioncap's correctness depends on, in one class.

A family is the ``model`` group's component (``conf/model/*.yaml`` names it with
``_target_: regioncap.families.qwen.Qwen25VL``). Its ``Config`` is the ``model``
section (which weights, the pixel budget, the context length) with the family's
own defaults; the class answers every question whose answer differs between
families and is silent when wrong (boxes drawn or parsed in the wrong frame give
fluent captions of the wrong regions):

- pixels: the size an image is resized to before marks are drawn (the size the
  model sees), and the visual tokens it costs there (equal to the engine's count);
- coordinates: how a box is written in a prompt (``prompt=coords``), the
  grounding request (``propose=vlm``), its answer constraint and its parser;
- chat: the user turn's content (where the image goes);
- building: the architecture folders kept under ``regioncap/archs`` (for
  ``model.weights=random``) and a tiny random-weight build for tests.

This module imports the standard library only; a family's module imports
nothing heavy at module level (transformers and torch only inside methods that
build models or tokenizers).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

from regioncap.components import MISSING, Component, check, optional, plain, setting, whole


log = logging.getLogger("regioncap")

#: ``(x1, y1, x2, y2)`` in pixels of the image the model sees.
PixelBox = Tuple[float, float, float, float]


class Family(Component):
    """Base class of the ``model`` group: one model family's conventions.

    An instance is built from the typed ``model`` section (``Family(cfg)``) and is
    cheap: no weights, tokenizer or processor is loaded by building it.
    """

    @dataclass
    class Config(Component.Config):
        """The ``model`` section: which model to run and the image budget it is fed."""

        #: Short name used in run names and reports.
        name: str = MISSING
        #: Hub id (``Qwen/Qwen2.5-VL-3B-Instruct``) or a local model folder.
        path: str = MISSING
        #: Hub revision (branch, tag or commit) when ``path`` is a hub id.
        revision: Optional[str] = None
        #: Pixel budget of one image (the processor's ``min_pixels`` / ``max_pixels``);
        #: a family with a fixed input size ignores it and says so.
        min_pixels: int = field(default=4 * 28 * 28, metadata=check(whole(1)))
        max_pixels: int = field(default=1280 * 28 * 28, metadata=check(whole(1)))
        #: Vision patch size and spatial merge size (28 px per visual token for Qwen2-VL/2.5-VL).
        patch_size: int = field(default=14, metadata=check(whole(1)))
        merge_size: int = field(default=2, metadata=check(whole(1)))
        #: Context length given to the engine; requests that cannot fit are error rows.
        max_model_len: int = field(default=8192, metadata=check(optional(whole(1))))
        #: Torch dtype name for the weights: ``auto``, ``bfloat16``, ``float16``, ``float32``.
        dtype: str = "auto"
        #: Never on unless a user asks: it runs code shipped with the model.
        trust_remote_code: bool = False
        #: When set, regioncap builds the model itself if ``path`` does not exist
        #: (``tiny``: the family's tiny random-weight build, :meth:`Family.build_tiny`).
        builder: Optional[str] = None
        #: ``real``: load the trained weights. ``random``: the real architecture with random
        #: weights and no weights file: for throughput, memory and token-budget checks.
        weights: str = "real"

    #: ``model.family`` in the manifest, the report and exports (``qwen2_5_vl``).
    name: ClassVar[str] = ""
    #: ``model_type`` values of a ``config.json`` this family reads (``qwen2_5_vl``).
    model_types: ClassVar[Tuple[str, ...]] = ()
    #: The transformers class when ``AutoModelForImageTextToText`` does not map the model
    #: (older transformers); None: the auto class only.
    transformers_class: ClassVar[Optional[str]] = None
    #: Coordinates of boxes in prompts and grounding answers: None for absolute pixels of the
    #: image the model sees, else the side of the relative grid (1000 for 0..1000).
    grid: ClassVar[Optional[int]] = None
    #: Published architectures kept under ``regioncap/archs``: hub id -> folder name.
    archs: ClassVar[Mapping[str, str]] = {}
    #: The token the chat template writes where the image goes (the processor expands it,
    #: :meth:`expand_images`).
    image_placeholder: ClassVar[str] = "<|image_pad|>"
    #: What to know when vLLM cannot load a model of this family (added to its load error); None: nothing.
    vllm_hint: ClassVar[Optional[str]] = None

    def __init__(self, cfg: Optional[Family.Config] = None) -> None:
        #: The typed ``model`` section; without one, the class's defaults (enough for coordinates and grounding).
        self.cfg = cfg if cfg is not None else self.Config()

    @classmethod
    def config(cls, **values: Any) -> Any:
        """A ``model`` section (this class's ``Config``) naming this class, with ``values`` set: for code and
        tests that build a model section without Hydra."""
        return cls.Config(_target_=f"{cls.__module__}.{cls.__qualname__}", **values)

    @classmethod
    def upgraded(cls, node: Any, key: str) -> Any:
        """A ``model`` node written before the section named its class (``family: qwen2_vl`` and no
        ``_target_``), as a node that names it: ``family`` mapped to its class (see
        :data:`FAMILIES_BEFORE_TARGETS`), with a deprecation warning. ``node`` itself when it names one."""
        from regioncap.components import TARGET
        from regioncap.errors import RunError

        if node is None or setting(node, TARGET) is not None:
            return node
        family = setting(node, "family") or "qwen2_5_vl"  # the default of model.family then
        target = FAMILIES_BEFORE_TARGETS.get(str(family))
        if target is None:
            raise RunError(f"{key}.family={family} is not a model family regioncap knows "
                           f"({', '.join(FAMILIES_BEFORE_TARGETS)}); a model option now names its class "
                           f"with {key}.{TARGET} (see docs/plugins.md)")
        log.warning("%s.family=%s without %s.%s is deprecated: the model option names its class now "
                    "(%s: %s, see docs/plugins.md)", key, family, key, TARGET, TARGET, target)
        values = plain(node)  # a plain dict: the caller types it by the class it names
        values.pop("family", None)
        values[TARGET] = target
        return values

    # -- pixels --------------------------------------------------------------

    def input_size(self, width: int, height: int, source: str = "image") -> Tuple[int, int]:
        """``(width, height)`` a ``width x height`` image is resized to: the pixels the model sees.

        Marks are drawn at this size; the processor must leave an image of this size
        unchanged (or the family says where it does not, :meth:`is_fixed_size`).
        Raises :class:`regioncap.images.ImageLoadError` for an image the model refuses
        (an aspect ratio over its limit), naming ``source``.
        """
        raise NotImplementedError

    def is_fixed_size(self, width: int, height: int) -> bool:
        """True when an image already at ``width x height`` reaches the model unchanged."""
        try:
            return self.input_size(width, height) == (width, height)
        except Exception:  # noqa: BLE001 - any refusal means "not fixed"
            return False

    def visual_tokens(self, width: int, height: int) -> int:
        """Visual tokens of an image at its input size: the count the engine puts in the prompt."""
        raise NotImplementedError

    def expand_images(self, text: str, width: int, height: int) -> str:
        """``text`` (a rendered chat prompt) with each :attr:`image_placeholder` expanded as the processor
        expands it for a ``width x height`` image: the text the model's tokenizer reads, so its token
        count is the engine's (both engines count a prompt this way). Qwen: the placeholder once per
        visual token."""
        p = self.image_placeholder
        return text.replace(p, p * self.visual_tokens(width, height))

    def processor_kwargs(self) -> Dict[str, Any]:
        """Settings for the model's processor when an engine starts: the transformers engine sets them on
        the loaded image processor (``TransformersEngine._set_processor_settings``), and they are vLLM's
        ``mm_processor_kwargs`` unless :meth:`mm_processor_kwargs` says otherwise. Qwen: the pixel budget,
        ``model.min_pixels`` / ``model.max_pixels``."""
        return {"min_pixels": self.cfg.min_pixels, "max_pixels": self.cfg.max_pixels}

    def mm_processor_kwargs(self) -> Dict[str, Any]:
        """vLLM's ``mm_processor_kwargs``: :meth:`processor_kwargs`; a family whose processor call takes
        other names than its attributes (InternVL's tile budget) gives its own."""
        return self.processor_kwargs()

    # -- coordinates -----------------------------------------------------------

    def box_coords(self, box: PixelBox, size: Tuple[int, int]) -> List[int]:
        """The four integers the family writes for ``box`` (pixels of an image of ``size``)."""
        raise NotImplementedError

    def box_text(self, box: PixelBox, size: Tuple[int, int]) -> str:
        """``box`` written the way the family grounds (``{"bbox_2d": [x1, y1, x2, y2]}``)."""
        raise NotImplementedError

    def grounding_prompt(self) -> str:
        """The request text that asks the model for every object with its box."""
        raise NotImplementedError

    def region_prompt(self, box: PixelBox, size: Tuple[int, int]) -> Optional[str]:
        """The family's own request for the caption of one region, named by ``box`` (pixels of an image
        of ``size``) with no marks drawn; None where the family has no region task (``prompt=region``
        then refuses to run)."""
        return None

    def grounding_constraint(self, kind: str, max_items: int) -> Dict[str, Any]:
        """``{"regex": ...}`` or ``{"json_schema": ...}`` constraining a grounding answer where the
        family's answer is constrainable with ``kind`` (``regex``, ``json``); ``{}`` where not."""
        return {}

    def parse_grounding(self, text: Any, width: float, height: float, *, min_size: float = 1.0,
                        source: str = "vlm") -> List[Any]:
        """The boxes of a grounding answer as :class:`regioncap.propose.base.Proposal` s in pixels of
        the ``width x height`` image the model saw. Never raises on any ``text``."""
        raise NotImplementedError

    # -- chat ------------------------------------------------------------------

    def user_content(self, prompt: str) -> List[Dict[str, Any]]:
        """The user turn's content for ``processor.apply_chat_template``: the image, then the text."""
        return [{"type": "image"}, {"type": "text", "text": prompt}]

    # -- building --------------------------------------------------------------

    @classmethod
    def build_tiny(cls, out_dir: Path) -> Path:
        """Build a tiny random-weight model of this family in ``out_dir`` (config, weights,
        tokenizer, processor, chat template; no hub) and return the folder."""
        raise NotImplementedError(f"{cls.__name__} has no tiny build")

    @classmethod
    def write_arch_files(cls, folder: Path) -> None:
        """Write what a weightless architecture folder needs besides ``config.json`` and
        ``preprocessor_config.json`` (an offline tokenizer with the model's special tokens at
        their ids, the chat template) into ``folder``: ``model.weights=random`` without a hub."""
        raise NotImplementedError(f"{cls.__name__} cannot build its architecture folders offline")

    def max_crop_aspect(self) -> float:
        """The longest crop (``n : 1``) ``prompt=crop`` may cut (:func:`regioncap.images.crop_with_margin`):
        one whose input size stays within the pixel budget and the processor's aspect limit."""
        from regioncap.images import crop_aspect_limit

        return crop_aspect_limit(self.cfg.max_pixels, self.cfg.patch_size, self.cfg.merge_size)

    @classmethod
    def key_fields(cls) -> Tuple[str, ...]:
        """The family's own ``model`` settings (its ``Config`` fields beyond :class:`Family.Config`'s, such as
        InternVL's ``max_tiles``): they decide the answers, so they are part of a run's key."""
        base = {f.name for f in dataclasses.fields(Family.Config)}
        return tuple(f.name for f in dataclasses.fields(cls.Config) if f.name not in base)

    @classmethod
    def arch_folder(cls, hub_id: str) -> Optional[str]:
        """The folder under ``regioncap/archs`` of ``hub_id``'s published architecture, or None."""
        return cls.archs.get(hub_id)



#: ``model.family`` of configs written before the ``model`` option named its class: the class it means.
FAMILIES_BEFORE_TARGETS: Dict[str, str] = {
    "qwen2_5_vl": "regioncap.families.qwen.Qwen25VL",
    "qwen2_vl": "regioncap.families.qwen.Qwen2VL",
}


def family_class(node: Any, key: str = "model") -> type:
    """The :class:`Family` subclass a ``model`` node (a config node or the plain dict a run recorded)
    names: its ``_target_``, else its old ``family`` (:meth:`Family.upgraded`). Raises
    :class:`regioncap.errors.RunError` naming ``key`` when it does not resolve."""
    from regioncap.components import class_of

    return class_of(Family.upgraded(node, key), Family, key)


def build_family(model: Any) -> Family:
    """The family object of a typed ``model`` section: built once where the run's objects are built."""
    return family_class(model)(model)


def visual_tokens_counter(node: Any) -> Optional[Callable[[int, int], int]]:
    """The ``visual_tokens(width, height)`` of the family a ``model`` node names (a config node or the plain
    dict a run recorded), for counting a finished run's visual tokens; None when the family cannot be
    built here (then the caller falls back to Qwen's rule)."""
    if node is None or isinstance(node, (str, int, float, bool)):
        return None
    try:
        cls = family_class(node)
        if not isinstance(node, cls.Config):  # a recorded dict: the settings its Config knows, read as attributes
            values = plain(node)
            node = cls.Config(**{f.name: values[f.name] for f in dataclasses.fields(cls.Config) if f.name in values})
        return cls(node).visual_tokens
    except Exception:  # noqa: BLE001 - a record read elsewhere (an old run, a class not installed)
        return None


def family_name(node: Any) -> Optional[str]:
    """``model.family`` as manifests, reports and exports say it (``qwen2_5_vl``) for a ``model`` node or
    the plain dict a run recorded; None when it cannot be told here (a class that does not import)."""
    if node is None or isinstance(node, (str, int, float, bool)):
        return None
    if setting(node, "_target_") is None:
        return str(setting(node, "family") or "qwen2_5_vl")
    try:
        return family_class(node).name or None
    except Exception:  # noqa: BLE001 - a record read elsewhere: unknown, not an error
        return None


@functools.lru_cache(maxsize=1)
def shipped_families() -> Dict[str, type]:
    """``{name: class}`` of the families the shipped ``conf/model`` options name (found from their
    ``_target_`` lines, so no list is kept by hand; read once per process)."""
    from regioncap.components import resolve, shipped_targets

    conf = Path(__file__).resolve().parents[1] / "conf"
    out: Dict[str, type] = {}
    for group, _option, target in shipped_targets(conf):
        if group == "model":
            cls = resolve(target, Family, "model._target_")
            out.setdefault(cls.name, cls)
    return out
