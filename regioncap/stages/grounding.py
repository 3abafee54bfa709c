"""Regions the caption engine proposes (``propose=vlm``): grounding, then drawing, inside the caption stage.

The visualize stage leaves a row it cannot give regions to ``status:
grounding``, with its clean image at the model's input size. Here the engine
answers the grounding prompt for that image (Qwen2.5-VL: a JSON list of
``{"bbox_2d", "label"}`` in pixels of the image it saw), the answer is parsed,
de-duplicated, and the row goes on through the same code as a decoded row of
the visualize stage (:class:`regioncap.stages.visualize.RowRequests`): its
regions planned with its given boxes exactly as the ``contours`` proposals are,
its request images rendered by the prompt strategy, so the same batch goes on
to caption them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regioncap import boxes as bx
from regioncap.engines.base import Request, Response, Sampling, retryable_answer
from regioncap.images import ImageLoadError, load_image
from regioncap.record_types import Record, RecordError, RequestSpec
from regioncap.stages import CaptionStage
from regioncap.stages.visualize import GIVEN, ProposeSettings, RowRequests, fail
from regioncap.strategies import PromptStrategy

if TYPE_CHECKING:
    from regioncap.config import RegionCapConfig


class Grounder:
    """Grounding request of a ``grounding`` row, and the row finished from the engine's answer."""

    def __init__(self, cfg: RegionCapConfig, out_dir: Any, strategy: PromptStrategy) -> None:
        from regioncap.propose import build_proposer

        self.out = Path(out_dir)
        self.rows = RowRequests(strategy, ProposeSettings.from_config(cfg.propose), self.out)
        self.max_image_pixels = int(cfg.limits.max_image_pixels)
        self.max_file_bytes = int(cfg.limits.max_file_bytes)
        self.proposer = build_proposer(cfg.propose, family=strategy.family)

    def request(self, rec: Record, sampling: Sampling) -> Request:
        """The engine request grounding ``rec``'s image (written by the visualize stage)."""
        g = RequestSpec.from_dict(rec.grounding)
        return self.proposer.request(f"{rec.id}/ground", str(self.out / g.image), tuple(g.image_size), sampling)

    def finish(self, rec: Record, resp: Response) -> Record:
        """Turn ``rec`` into a ``pending`` row with proposed regions (or an error / no-regions row)."""
        t0 = time.perf_counter()
        # ``grounding`` holds a request's fields (``image``, ``image_size``) and the row's given boxes.
        g = RequestSpec.from_dict(rec.grounding)
        rec.drop("grounding")
        g.answer, g.error = resp.text, resp.error
        g.prompt_tokens, g.output_tokens = resp.prompt_tokens, resp.output_tokens
        if not resp.ok:
            err = RecordError.from_dict(resp.error or {})
            rec.proposals = {"method": "vlm", "grounding": g.to_dict()}
            return fail(rec, err.kind or "grounding_failed",
                        f"{rec.image}: the grounding request failed: {err.message}",
                        t0, stage=CaptionStage.name, retryable=retryable_answer(err.kind))
        tw, th = rec.input_size
        width, height = rec.image_size
        try:
            image = load_image(str(self.out / g.image), max_image_pixels=self.max_image_pixels,
                               max_file_bytes=self.max_file_bytes).image
        except ImageLoadError as exc:
            # The image the visualize stage wrote: reading it back failing is the machine's, not the row's.
            return fail(rec, exc.kind, exc.message, t0, stage=CaptionStage.name, retryable=True)
        proposals = [p.scale(width / tw, height / th) for p in self.proposer.parse(resp.text, tw, th)]
        given = [(int(i), bx.Box(*b)) for i, b in g.extras().get(GIVEN, [])]
        # The image at the input size is the source of its regions: a crop is cut from it.
        out = self.rows.finish(rec, rec.index, image, image, given, len(given), [], proposals, t0)
        if out.proposals is None:
            out.proposals = {}
        out.proposals["grounding"] = RequestSpec(image=g.image, answer=g.answer, prompt_tokens=g.prompt_tokens,
                                                 output_tokens=g.output_tokens).to_dict()
        return out
