"""Regions the caption engine proposes (``propose=vlm``): grounding, then drawing, inside the caption stage.

The visualize stage leaves a row it cannot give regions to ``status:
grounding``, with its clean image at the model's input size. Here the engine
answers the grounding prompt for that image (Qwen2.5-VL: a JSON list of
``{"bbox_2d", "label"}`` in pixels of the image it saw), the answer is parsed,
de-duplicated and planned with the row's given boxes exactly as the
``contours`` proposals are in the visualize stage, and the row's request images
are drawn, so the same batch goes on to caption them.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Dict

from regioncap import boxes as bx
from regioncap.engines.base import Request, Response, Sampling
from regioncap.images import ImageLoadError, load_image
from regioncap.stages.visualize import Visualizer


class Grounder:
    """Grounding request of a ``grounding`` row, and the row finished from the engine's answer."""

    def __init__(self, cfg: Any, out_dir: Any) -> None:
        from regioncap.propose import build_proposer

        self.visualizer = Visualizer(cfg, out_dir)
        self.proposer = build_proposer(cfg.propose, family=str(cfg.model.family))

    def request(self, rec: Dict[str, Any], sampling: Sampling) -> Request:
        g = rec["grounding"]
        return self.proposer.request(f"{rec['id']}/ground", str(self.visualizer.out / g["image"]),
                                     tuple(g["image_size"]), sampling)

    def finish(self, rec: Dict[str, Any], resp: Response) -> Dict[str, Any]:
        """Turn ``rec`` into a ``pending`` row with proposed regions (or an error / no-regions row)."""
        t0 = time.perf_counter()
        g = rec.pop("grounding")
        g["answer"], g["error"] = resp.text, resp.error
        g["prompt_tokens"], g["output_tokens"] = resp.prompt_tokens, resp.output_tokens
        v = self.visualizer
        if not resp.ok:
            rec["proposals"] = {"method": "vlm", "grounding": g}
            return v.fail(rec, (resp.error or {}).get("kind", "grounding_failed"),
                          f"{rec['image']}: the grounding request failed: {(resp.error or {}).get('message')}",
                          t0, stage="caption")
        tw, th = rec["input_size"]
        width, height = rec["image_size"]
        try:
            limits = v.cfg.limits
            image = load_image(str(v.out / g["image"]), max_image_pixels=limits.max_image_pixels,
                               max_file_bytes=limits.max_file_bytes).image
        except ImageLoadError as exc:
            return v.fail(rec, exc.kind, exc.message, t0, stage="caption")
        proposals = [p.scale(width / tw, height / th) for p in self.proposer.parse(resp.text, tw, th)]
        given = [(int(i), bx.Box(*b)) for i, b in g.get("given", [])]
        parsed = SimpleNamespace(boxes=given, num_input=len(given), dropped=[])
        loaded = SimpleNamespace(image=image, original_size=(width, height))
        row = SimpleNamespace(index=rec["index"])
        out = v.finish_row(rec, row, loaded, image, parsed, proposals, t0)
        out.setdefault("proposals", {})["grounding"] = {k: g[k] for k in ("image", "answer", "prompt_tokens",
                                                                          "output_tokens")}
        return out
