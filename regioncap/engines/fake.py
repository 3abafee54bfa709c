"""A deterministic engine with no model, for fast tests of the pipeline logic.

It opens each request's image (so a missing or broken file fails the way it
would in a real engine) and answers in the requested layout with captions
derived from the request, so tests can check that every caption lands on the
region it belongs to. Never the only test of a code path that a real engine runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Sequence

from regioncap.components import check, whole
from regioncap.engines.base import Engine, EngineInfo, Request, Response, error_response, make_response

if TYPE_CHECKING:
    from regioncap.families.base import Family


class FakeEngine(Engine):
    """Deterministic engine for fast tests of the pipeline logic (no model)."""

    @dataclass
    class Config(Engine.Config):
        batch_size: int = field(default=16, metadata=check(whole(1)))
        #: Region numbers (1-based, within a request) the fake leaves unanswered.
        skip_regions: List[int] = field(default_factory=list)
        #: Answer ``skip_regions`` when asked again (exercises the re-ask path).
        answer_on_reask: bool = True
        #: Request keys (substring match) that fail with an engine error.
        fail_keys: List[str] = field(default_factory=list)

    name = "fake"
    needs_model_path = False

    def __init__(self, *, model_cfg: Family.Config, engine_cfg: FakeEngine.Config, model_path: str | None = None) -> None:
        self.skip = set(engine_cfg.skip_regions or [])
        self.answer_on_reask = engine_cfg.answer_on_reask
        self.fail_keys = list(engine_cfg.fail_keys or [])
        self.calls: List[int] = []

    def describe(self) -> EngineInfo:
        return EngineInfo(engine=self.name, fail_keys=",".join(self.fail_keys) or None)

    def generate(self, requests: Sequence[Request]) -> List[Response]:
        self.calls.append(len(requests))
        return [self._one(r) for r in requests]

    def _one(self, req: Request) -> Response:
        from PIL import Image  # here, not at module level: composing a config imports this module

        start = time.perf_counter()
        if any(k in req.key for k in self.fail_keys):
            return error_response(req.key, "engine_error", f"fake failure for {req.key}")
        try:
            with Image.open(req.image_path) as im:
                w, h = im.size
        except OSError as exc:
            return error_response(req.key, "image_error", f"{req.image_path}: {exc}")
        if req.meta.get("task") == "ground":
            # Two objects, the image's top-left and bottom-right quarters (Qwen2.5-VL's grounding JSON).
            text = json.dumps([{"bbox_2d": [w // 8, h // 8, w // 2, h // 2], "label": "fake object 1"},
                               {"bbox_2d": [w // 2, h // 2, w - w // 8, h - h // 8], "label": "fake object 2"}])
            return Response(key=req.key, text=text, prompt_tokens=len(req.prompt.split()), output_tokens=20,
                            latency_s=time.perf_counter() - start, finish_reason="stop")
        numbers = list(req.meta.get("numbers", [1]))
        reask = bool(req.meta.get("reask"))
        if not (reask and self.answer_on_reask):
            numbers = [n for n in numbers if n not in self.skip]
        captions = {n: f"fake caption of region {n} in {req.key} ({w}x{h})" for n in numbers}
        fmt = req.meta.get("answer_format", "lines")
        if fmt == "json":
            text = json.dumps({"regions": [{"id": n, "caption": c} for n, c in captions.items()]})
        elif fmt == "free" and len(req.meta.get("numbers", [1])) == 1:
            text = next(iter(captions.values()), "")
        elif fmt == "free":
            text = " ".join(f"In <region{n}>, {c}." for n, c in captions.items())
        else:
            text = "\n".join(f"{n}: {c}" for n, c in captions.items())
        return make_response(
            key=req.key, text=text, prompt_tokens=len(req.prompt.split()) + (w // 28) * (h // 28),
            output_tokens=len(text.split()), latency_s=time.perf_counter() - start, finish_reason="stop",
        )
