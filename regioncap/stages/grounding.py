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
from typing import TYPE_CHECKING, Any, Dict

from regioncap import boxes as bx
from regioncap.engines.base import Request, Response, Sampling
from regioncap.images import ImageLoadError, load_image
from regioncap.stages import CaptionStage
from regioncap.stages.visualize import ProposeSettings, RowRequests, fail
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

    def request(self, rec: Dict[str, Any], sampling: Sampling) -> Request:
        """The engine request grounding ``rec``'s image (written by the visualize stage)."""
        g = rec["grounding"]
        return self.proposer.request(f"{rec['id']}/ground", str(self.out / g["image"]), tuple(g["image_size"]),
                                     sampling)

    def finish(self, rec: Dict[str, Any], resp: Response) -> Dict[str, Any]:
        """Turn ``rec`` into a ``pending`` row with proposed regions (or an error / no-regions row)."""
        t0 = time.perf_counter()
        g = rec.pop("grounding")
        g["answer"], g["error"] = resp.text, resp.error
        g["prompt_tokens"], g["output_tokens"] = resp.prompt_tokens, resp.output_tokens
        if not resp.ok:
            rec["proposals"] = {"method": "vlm", "grounding": g}
            return fail(rec, (resp.error or {}).get("kind", "grounding_failed"),
                        f"{rec['image']}: the grounding request failed: {(resp.error or {}).get('message')}",
                        t0, stage=CaptionStage.name)
        tw, th = rec["input_size"]
        width, height = rec["image_size"]
        try:
            image = load_image(str(self.out / g["image"]), max_image_pixels=self.max_image_pixels,
                               max_file_bytes=self.max_file_bytes).image
        except ImageLoadError as exc:
            return fail(rec, exc.kind, exc.message, t0, stage=CaptionStage.name)
        proposals = [p.scale(width / tw, height / th) for p in self.proposer.parse(resp.text, tw, th)]
        given = [(int(i), bx.Box(*b)) for i, b in g.get("given", [])]
        # The image at the input size is the source of its regions: a crop is cut from it.
        out = self.rows.finish(rec, rec["index"], image, image, given, len(given), [], proposals, t0)
        out.setdefault("proposals", {})["grounding"] = {k: g[k] for k in ("image", "answer", "prompt_tokens",
                                                                          "output_tokens")}
        return out
