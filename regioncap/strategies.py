"""Prompt strategies: how regions are put to the model, one class each, resolved by name.

A strategy owns the plan of a row's regions, from the numbers the model sees
to the captions read back:

* :meth:`PromptStrategy.slots` decides each region's chunk and number (once:
  the visualize stage writes them on the regions and nothing changes them later);
* :meth:`PromptStrategy.plan` groups the regions into requests;
* :meth:`PromptStrategy.render` makes the request images (pure: images in, images
  out; the stage writes them);
* :meth:`PromptStrategy.spec` writes a request's prompt, :meth:`PromptStrategy.constraint`
  what a constrained engine must keep the answer to, :meth:`PromptStrategy.parse`
  reads the captions out of it, and :meth:`PromptStrategy.reask_prompt` asks once more
  for regions an answer left out or captioned with answer-format debris
  (:func:`regioncap.prompts.caption_debris`).

A strategy is a component (:mod:`regioncap.components`): the ``prompt`` option
names its class (``_target_: regioncap.strategies.MarkedStrategy``) and the class
owns its settings (``Config``). A new strategy is a subclass, in any module (a
user's own package too, docs/plugins.md), plus one ``conf/prompt/NAME.yaml``
naming it: no file here changes.

========  =====================================================  ======
strategy  requests of a row                                      re-ask
========  =====================================================  ======
marked    one per chunk of ``max_boxes`` regions, boxes drawn     yes
crop      one per region, on a crop of it with a context margin   no
coords    one per chunk, the boxes written in the prompt text     yes
region    one per region, the family's own region task, no marks  no
========  =====================================================  ======

The config is read once, when the strategy is built (:func:`build_strategy`):
per row, a strategy reads plain attributes only.

Imports: the standard library, Pillow and regioncap's pure modules; no Hydra, no engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple


from regioncap import boxes as bx
from regioncap import prompts
from regioncap.components import (MISSING, Component, check, class_of, plain, real, resolve, setting, short_name,
                                  formats)
from regioncap.config import AnswerFormat, RegionCapConfig
from regioncap.draw import DrawStyle, draw_marks
from regioncap.errors import RunError
from regioncap.families.base import Family, build_family
from regioncap.images import crop_with_margin, file_extension, resize_to
from regioncap.record_types import Record, Region, RequestSpec
from regioncap.rundir import IMAGES_DIR


@dataclass
class Planned:
    """One request of a row as planned: its key suffix, its regions and their boxes in source pixels."""

    suffix: str
    regions: List[Region]
    boxes: List[bx.Box]


@dataclass
class Rendered:
    """A request's image: its file name under the run dir, the image to write there (None when an
    earlier request of the row already wrote that file) and its size."""

    planned: Planned
    name: str
    image: Any
    size: Tuple[int, int]


class PromptStrategy(Component):
    """Base class: the plan, images, prompts, answer constraint and parsing of a row's requests.

    A subclass is named in ``conf/prompt/*.yaml`` by ``_target_``; its ``Config``
    derives from this one's when it has settings of its own.
    """

    @dataclass
    class Config(Component.Config):
        """The ``prompt`` section: how regions are put to the model and how answers are read back."""

        #: The option's name (``dataflow`` uses the marked strategy): run names and the report.
        name: str = MISSING
        system: Optional[str] = None
        #: User text; its placeholders are :func:`regioncap.prompts.template_values`' (checked before the run).
        template: str = field(default=MISSING, metadata=check(formats(prompts.TEMPLATE_EXAMPLE)))
        #: ``lines`` (``1: ...``), ``json`` or ``free`` (DataFlow-MM's free text).
        answer_format: AnswerFormat = AnswerFormat.lines
        #: Context margin around a crop, as a fraction of the box size.
        crop_margin: float = field(default=0.15, metadata=check(real(0)))
        #: Re-ask once for regions missing from an answer or captioned with answer-format debris.
        reask_missing: bool = True
        #: Text of the one follow-up request for regions missing from an answer; placeholders
        #: ``{labels}`` and ``{format_instruction}`` (:func:`regioncap.prompts.reask_values`).
        reask_template: str = field(default=(
            "The image has numbered boxes drawn on it. Describe only the boxes "
            "labelled {labels}, each in one short sentence. {format_instruction}"
        ), metadata=check(formats(prompts.REASK_EXAMPLE)))

    name: ClassVar[str] = ""
    #: A request for regions an answer left out or captioned with debris (one per request, at most once).
    reasks: ClassVar[bool] = True
    #: Each request image is a crop of one region (the report and W&B show it without a box).
    one_region_per_image: ClassVar[bool] = False
    #: The word the prompt uses for a region.
    noun: ClassVar[str] = "box"

    def __init__(self, prompt: "PromptStrategy.Config", style: DrawStyle, family: Family, max_boxes: int) -> None:
        self.prompt = prompt
        self.style = style
        #: The model family: its input size, visual tokens and coordinates (``model``).
        self.family = family
        self.max_boxes = int(max_boxes)
        self.answer_format = str(prompt.answer_format)
        #: Extension of the request images (``draw.image_format``).
        self.ext = file_extension(style.image_format)

    # ------------------------------------------------------------- the plan
    def slots(self, count: int) -> List[Tuple[int, int]]:
        """``(chunk, number)`` of each of ``count`` regions: chunks of ``max_boxes``, numbered from 1."""
        return [(i // self.max_boxes, i % self.max_boxes + 1) for i in range(count)]

    def plan(self, regions: List[Region], boxes: Sequence[bx.Box]) -> List[Planned]:
        """The requests of a row: one per chunk (``slots``), in order."""
        planned: List[Planned] = []
        for reg, box in zip(regions, boxes):
            if not planned or planned[-1].suffix != f"c{reg.chunk}":
                planned.append(Planned(f"c{reg.chunk}", [], []))
            planned[-1].regions.append(reg)
            planned[-1].boxes.append(box)
        return planned

    def render(self, stem: str, image: Any, source: Any, original_size: Tuple[int, int],
               planned: List[Planned]) -> List[Rendered]:
        """The request images of ``planned`` (pure: nothing is written).

        ``image`` is the row's image at the model's input size (None for a strategy
        that works on ``source``); ``source`` the decoded image its boxes were
        scaled from, whose full-resolution size is ``original_size``.
        """
        raise NotImplementedError

    # ------------------------------------------------------------- prompts
    def spec(self, rec_id: Any, rendered: Rendered) -> RequestSpec:
        """One request spec: the image, its size, the prompt and the regions it asks about."""
        regions = rendered.planned.regions
        return RequestSpec(
            key=f"{rec_id}/{rendered.planned.suffix}", image=rendered.name, image_size=list(rendered.size),
            prompt=self.prompt_text(regions, rendered.size),
            numbers=[r.number for r in regions], region_ids=[r.id for r in regions],
        )

    def prompt_text(self, regions: List[Region], size: Tuple[int, int]) -> str:
        """``prompt.template`` filled for ``regions`` (see :func:`regioncap.prompts.build_prompt`)."""
        numbers = [r.number for r in regions]
        return prompts.build_prompt(str(self.prompt.template), numbers=numbers, labels=self.labels(numbers),
                                    answer_format=self.answer_format,
                                    regions_text=self.regions_text(regions, size), noun=self.noun)

    def regions_text(self, regions: List[Region], size: Tuple[int, int]) -> str:
        """The ``{regions}`` placeholder: empty unless the strategy writes the boxes in the text."""
        return ""

    def labels(self, numbers: Sequence[int]) -> List[str]:
        """The mark labels of region ``numbers`` (``draw.label_format``)."""
        return [self.style.label_format.format(n=n) for n in numbers]

    def reask_prompt(self, rec: Record, spec: RequestSpec, missing: List[int]) -> str:
        """The text of the follow-up request for the regions ``missing`` from ``spec``'s answer
        (left out, or captioned with answer-format debris)."""
        return str(self.prompt.reask_template).format(**prompts.reask_values(
            labels=self.labels(missing), answer_format=self.answer_format, numbers=missing))

    # ------------------------------------------------------------- answers
    def constraint(self, numbers: Sequence[int]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """``(regex, json_schema)`` a constrained engine keeps the answer about ``numbers`` to (or None)."""
        return (prompts.answer_regex(numbers, self.answer_format),
                prompts.answer_json_schema(numbers, self.answer_format))

    def parse(self, text: Optional[str], numbers: Sequence[int], *,
              shown: Optional[Sequence[int]] = None) -> prompts.ParsedAnswer:
        """The captions of ``numbers`` in an answer (:func:`regioncap.prompts.parse_answer`)."""
        return prompts.parse_answer(text, numbers, self.answer_format, shown=shown)


class MarkedStrategy(PromptStrategy):
    """Numbered boxes drawn on the image, one request per chunk of ``max_boxes`` regions."""

    name = "marked"

    def render(self, stem, image, source, original_size, planned):  # noqa: ANN001,ANN201 - see base
        return [Rendered(p, f"{IMAGES_DIR}/{stem}_c{c:02d}.{self.ext}",
                         draw_marks(image, [r.input_bbox for r in p.regions],
                                    self.labels([r.number for r in p.regions]), self.style), image.size)
                for c, p in enumerate(planned)]


class CoordsStrategy(PromptStrategy):
    """No marks: the boxes are written in the prompt in the model family's grounding format."""

    name = "coords"
    noun = "region"

    def render(self, stem, image, source, original_size, planned):  # noqa: ANN001,ANN201 - see base
        # One clean image, shared by every chunk's request.
        name = f"{IMAGES_DIR}/{stem}.{self.ext}"
        return [Rendered(p, name, image if c == 0 else None, image.size) for c, p in enumerate(planned)]

    def regions_text(self, regions, size):  # noqa: ANN001,ANN201 - see base
        return prompts.regions_text([r.number for r in regions],
                                    [self.family.box_text(tuple(r.input_bbox), size) for r in regions])

    def reask_prompt(self, rec, spec, missing):  # noqa: ANN001,ANN201 - see base
        # The regions are in the text, not on the image: ask the first prompt again for the ones to re-ask.
        regions = [r for r in rec.iter_regions() if r.id in spec.region_ids and r.number in missing]
        return self.prompt_text(regions, tuple(spec.image_size))


class CropStrategy(PromptStrategy):
    """One request per region, on a crop of its box with a context margin (each numbered 1)."""

    @dataclass
    class Config(PromptStrategy.Config):
        """A crop shows one region: its caption is the whole answer, and there is nothing to re-ask."""

        answer_format: AnswerFormat = AnswerFormat.free
        reask_missing: bool = False

    name = "crop"
    reasks = False
    one_region_per_image = True

    def slots(self, count: int) -> List[Tuple[int, int]]:
        # Every crop shows one region, numbered 1; the chunk stays the marked layout's (records keep it).
        return [(i // self.max_boxes, 1) for i in range(count)]

    def plan(self, regions, boxes):  # noqa: ANN001,ANN201 - see base
        return [Planned(f"r{reg.id}", [reg], [box]) for reg, box in zip(regions, boxes)]

    def render(self, stem, image, source, original_size, planned):  # noqa: ANN001,ANN201 - see base
        family = self.family
        scale_x, scale_y = source.width / original_size[0], source.height / original_size[1]
        max_aspect = family.max_crop_aspect()
        out = []
        for p in planned:
            crop, _rect = crop_with_margin(source, p.boxes[0].scale(scale_x, scale_y), float(self.prompt.crop_margin),
                                           max_aspect=max_aspect)
            size = family.input_size(crop.width, crop.height)
            out.append(Rendered(p, f"{IMAGES_DIR}/{stem}_r{p.regions[0].id:03d}.{self.ext}",
                                resize_to(crop, size), size))
        return out


class RegionStrategy(PromptStrategy):
    """No marks: one request per region in the model family's own region task (Florence-2's
    ``<REGION_TO_DESCRIPTION>`` with the box's location tokens); the whole answer is the caption."""

    @dataclass
    class Config(PromptStrategy.Config):
        """The request is the family's (``{regions}``); its answer is one caption, nothing to re-ask."""

        template: str = field(default="{regions}", metadata=check(formats(prompts.TEMPLATE_EXAMPLE)))
        answer_format: AnswerFormat = AnswerFormat.free
        reask_missing: bool = False

    name = "region"
    reasks = False
    noun = "region"

    def __init__(self, prompt: "PromptStrategy.Config", style: DrawStyle, family: Family, max_boxes: int) -> None:
        super().__init__(prompt, style, family, max_boxes)
        if family.region_prompt((0.0, 0.0, 1.0, 1.0), (1, 1)) is None:
            # Before any row is read: every request would fail the same way.
            raise RunError(f"prompt=region needs a model family with a region task of its own (Florence-2); "
                           f"model={getattr(family.cfg, 'name', None)} ({type(family).__name__}) has none: "
                           f"use prompt=marked, crop or coords")

    def slots(self, count: int) -> List[Tuple[int, int]]:
        # Every request names one region, numbered 1; the chunk stays the marked layout's (records keep it).
        return [(i // self.max_boxes, 1) for i in range(count)]

    def plan(self, regions, boxes):  # noqa: ANN001,ANN201 - see base
        return [Planned(f"r{reg.id}", [reg], [box]) for reg, box in zip(regions, boxes)]

    def render(self, stem, image, source, original_size, planned):  # noqa: ANN001,ANN201 - see base
        # One clean image, shared by every region's request.
        name = f"{IMAGES_DIR}/{stem}.{self.ext}"
        return [Rendered(p, name, image if c == 0 else None, image.size) for c, p in enumerate(planned)]

    def regions_text(self, regions, size):  # noqa: ANN001,ANN201 - see base
        return str(self.family.region_prompt(tuple(regions[0].input_bbox), tuple(size)))


def strategy_class(prompt: Any) -> type:
    """The :class:`PromptStrategy` subclass a ``prompt`` node names with ``_target_``
    (:class:`~regioncap.errors.RunError` naming ``prompt._target_`` when it does not resolve)."""
    return class_of(prompt, PromptStrategy, "prompt")


def settings(cls: type, prompt: Any) -> Any:
    """``cls.Config`` from the typed ``prompt`` section (itself when it is one), or filled from a mapping
    (its keys that are fields; the rest keep their defaults)."""
    if isinstance(prompt, cls.Config):
        return prompt
    values = plain(prompt)
    return cls.Config(**{f.name: values[f.name] for f in fields(cls.Config) if f.name in values})


def build_strategy(cfg: RegionCapConfig) -> PromptStrategy:
    """The strategy ``cfg.prompt`` names, built (and its config read) for this run, with the model's
    family object (:func:`regioncap.families.base.build_family`, built here once per strategy)."""
    cls = strategy_class(cfg.prompt)
    return cls(settings(cls, cfg.prompt), DrawStyle.from_config(cfg.draw), build_family(cfg.model),
               cfg.max_boxes)


def recorded_strategy(prompt: Any) -> Optional[type]:
    """The strategy class of a ``prompt`` section as a run recorded it (a plain dict), or None when it
    cannot be told: its ``_target_`` does not import here. A run recorded before strategies were
    components names it by ``strategy``."""
    if prompt is None or isinstance(prompt, (str, int, float, bool)):
        return None
    target = setting(prompt, "_target_") or _BEFORE_COMPONENTS.get(str(setting(prompt, "strategy")))
    if not target:
        return None
    try:
        return resolve(target, PromptStrategy, "prompt._target_")
    except Exception:  # noqa: BLE001 - a record read elsewhere: unknown, not an error
        return None


def recorded_name(prompt: Any) -> Optional[str]:
    """The short name (``marked``, ``crop``...) of the strategy a recorded ``prompt`` section names."""
    cls = recorded_strategy(prompt)
    if cls is not None:
        return short_name(cls)
    strategy = setting(prompt, "strategy") if prompt is not None else None
    return str(strategy) if strategy else None


#: ``prompt.strategy`` of runs recorded before strategies were named by ``_target_``.
_BEFORE_COMPONENTS = {cls.name: f"{cls.__module__}.{cls.__qualname__}"
                      for cls in (MarkedStrategy, CropStrategy, CoordsStrategy)}
