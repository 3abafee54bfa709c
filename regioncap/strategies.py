"""Prompt strategies: how regions are put to the model, one class each, resolved by name.

A strategy turns one row's regions into request specs (the images to send and
their prompt text) and, when an answer leaves regions out or captions them with
answer-format debris (:func:`regioncap.prompts.caption_debris`), into the text
of the one follow-up request. ``prompt.strategy`` names it; :data:`STRATEGIES` maps
the name to the class. A new strategy is one class here (or in a module of its
own, registered in :data:`STRATEGIES`) plus one ``conf/prompt/NAME.yaml``.

========  =====================================================  ======
strategy  requests of a row                                      re-ask
========  =====================================================  ======
marked    one per chunk of ``max_boxes`` regions, boxes drawn     yes
crop      one per region, on a crop of it with a context margin   no
coords    one per chunk, the boxes written in the prompt text     yes
========  =====================================================  ======

Pure module: no Hydra, no engine imports.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

from regioncap import boxes as bx
from regioncap import prompts
from regioncap.draw import DrawStyle, draw_marks
from regioncap.images import crop_aspect_limit, crop_with_margin, resize_to, target_size
from regioncap.rundir import IMAGES_DIR


#: ``save(image, name)`` writes an image under the run dir (``name`` relative to it).
Save = Callable[[Any, str], None]



class PromptStrategy:
    """Base class: the request specs of a row and the prompt text of a request."""

    name: ClassVar[str] = ""
    #: A request for regions an answer left out or captioned with debris (one per request, at most once).
    reasks: ClassVar[bool] = True
    #: Each request image is a crop of one region (the report and W&B show it without a box).
    one_region_per_image: ClassVar[bool] = False
    #: The word the prompt uses for a region.
    noun: ClassVar[str] = "box"

    def __init__(self, cfg: Any, style: Optional[DrawStyle] = None, save: Optional[Save] = None) -> None:
        self.cfg = cfg
        self.prompt = cfg.prompt
        self.style = style
        self._save = save

    # ------------------------------------------------------------- requests
    def requests(self, rec: Dict[str, Any], stem: str, image: Any, loaded: Any, size: Tuple[int, int],
                 kept: Sequence, regions: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The request specs of one row; writes their images through ``save``.

        ``image`` is the row's image at the model's input ``size``; ``loaded``
        the decoded source (:class:`regioncap.images.LoadedImage`); ``kept`` the
        validated boxes in source pixels; ``regions`` the row's regions (numbers
        may be changed here).
        """
        raise NotImplementedError

    def spec(self, rec: Dict[str, Any], image: str, regions: List[Dict[str, Any]], size: Tuple[int, int],
             suffix: str) -> Dict[str, Any]:
        """One request spec: the image, its size, the prompt and the regions it asks about."""
        return {
            "key": f"{rec['id']}/{suffix}", "image": image, "image_size": list(size),
            "prompt": self.prompt_text(self.prompt.template, regions, size),
            "numbers": [r["number"] for r in regions], "region_ids": [r["id"] for r in regions],
        }

    def prompt_text(self, template: str, regions: List[Dict[str, Any]], size: Tuple[int, int]) -> str:
        """``template`` filled for ``regions`` (see :func:`regioncap.prompts.build_prompt`)."""
        numbers = [r["number"] for r in regions]
        return prompts.build_prompt(template, numbers=numbers, labels=self.labels(numbers),
                                    answer_format=str(self.prompt.answer_format),
                                    regions_text=self.regions_text(regions, size), noun=self.noun)

    def regions_text(self, regions: List[Dict[str, Any]], size: Tuple[int, int]) -> str:
        """The ``{regions}`` placeholder: empty unless the strategy writes the boxes in the text."""
        return ""

    def labels(self, numbers: Sequence[int]) -> List[str]:
        return [str(self.cfg.draw.label_format).format(n=n) for n in numbers]

    def reask_prompt(self, rec: Dict[str, Any], spec: Dict[str, Any], missing: List[int]) -> str:
        """The text of the follow-up request for the regions ``missing`` from ``spec``'s answer
        (left out, or captioned with answer-format debris)."""
        return str(self.prompt.reask_template).format(
            labels=prompts.join_words(self.labels(missing)),
            format_instruction=prompts.format_instruction(str(self.prompt.answer_format), missing))

    def save(self, image: Any, name: str) -> None:
        if self._save is None:
            raise RuntimeError(f"strategy {self.name!r} was built without a way to save images")
        self._save(image, name)

    def ext(self) -> str:
        return "png" if str(self.cfg.draw.image_format) == "png" else "jpg"


class MarkedStrategy(PromptStrategy):
    """Numbered boxes drawn on the image, one request per chunk of ``max_boxes`` regions."""

    name = "marked"

    def requests(self, rec, stem, image, loaded, size, kept, regions):  # noqa: ANN001,ANN201 - see base
        specs = []
        for c, chunk_regions in enumerate(bx.chunk(regions, int(self.cfg.max_boxes))):
            labels = self.labels([r["number"] for r in chunk_regions])
            name = f"{IMAGES_DIR}/{stem}_c{c:02d}.{self.ext()}"
            assert self.style is not None
            self.save(draw_marks(image, [r["input_bbox"] for r in chunk_regions], labels, self.style), name)
            specs.append(self.spec(rec, name, chunk_regions, size, f"c{c}"))
        return specs


class CoordsStrategy(PromptStrategy):
    """No marks: the boxes are written in the prompt in the model family's grounding format."""

    name = "coords"
    noun = "region"

    def requests(self, rec, stem, image, loaded, size, kept, regions):  # noqa: ANN001,ANN201 - see base
        name = f"{IMAGES_DIR}/{stem}.{self.ext()}"
        self.save(image, name)
        return [self.spec(rec, name, chunk_regions, size, f"c{c}")
                for c, chunk_regions in enumerate(bx.chunk(regions, int(self.cfg.max_boxes)))]

    def regions_text(self, regions, size):  # noqa: ANN001,ANN201 - see base
        w, h = size
        family = str(self.cfg.model.family)
        coords = [bx.qwen2_coords(bx.Box(*r["input_bbox"]), w, h) if family == "qwen2_vl"
                  else bx.qwen25_coords(bx.Box(*r["input_bbox"]), w, h) for r in regions]
        return prompts.regions_text([r["number"] for r in regions], coords, family)

    def reask_prompt(self, rec, spec, missing):  # noqa: ANN001,ANN201 - see base
        # The regions are in the text, not on the image: ask the first prompt again for the ones to re-ask.
        regions = [r for r in rec["regions"] if r["id"] in spec["region_ids"] and r["number"] in missing]
        return self.prompt_text(self.prompt.template, regions, tuple(spec["image_size"]))


class CropStrategy(PromptStrategy):
    """One request per region, on a crop of its box with a context margin (each numbered 1)."""

    name = "crop"
    reasks = False
    one_region_per_image = True

    def requests(self, rec, stem, image, loaded, size, kept, regions):  # noqa: ANN001,ANN201 - see base
        model = self.cfg.model
        scale_x = loaded.image.width / loaded.original_size[0]
        scale_y = loaded.image.height / loaded.original_size[1]
        specs = []
        for reg, (_, box) in zip(regions, kept):
            crop, _rect = crop_with_margin(loaded.image, box.scale(scale_x, scale_y), float(self.prompt.crop_margin),
                                           max_aspect=crop_aspect_limit(int(model.max_pixels), int(model.patch_size),
                                                                        int(model.merge_size)))
            cw, ch = target_size(crop.width, crop.height, min_pixels=model.min_pixels,
                                 max_pixels=model.max_pixels, patch_size=model.patch_size,
                                 merge_size=model.merge_size)
            name = f"{IMAGES_DIR}/{stem}_r{reg['id']:03d}.{self.ext()}"
            self.save(resize_to(crop, (cw, ch)), name)
            reg["number"] = 1
            specs.append(self.spec(rec, name, [reg], (cw, ch), f"r{reg['id']}"))
        return specs


#: ``prompt.strategy`` -> class.
STRATEGIES: Dict[str, Type[PromptStrategy]] = {
    cls.name: cls for cls in (MarkedStrategy, CropStrategy, CoordsStrategy)
}


def strategy_class(name: Any) -> Type[PromptStrategy]:
    """The class of ``prompt.strategy`` ``name``; ``ValueError`` naming the choices for an unknown one."""
    try:
        return STRATEGIES[str(name)]
    except KeyError:
        raise ValueError(f"unknown prompt.strategy {str(name)!r}; choose one of {sorted(STRATEGIES)}") from None


def build_strategy(cfg: Any, style: Optional[DrawStyle] = None, save: Optional[Save] = None) -> PromptStrategy:
    """The strategy ``cfg.prompt.strategy`` names, built for this run."""
    return strategy_class(cfg.prompt.strategy)(cfg, style, save)
