"""The run object: built once from the composed config, it runs the stages.

``build_run`` is the one place where objects are built from the config (data
source, draw style, prompt settings; the engine when the caption stage starts).
The stages stream: rows are read, processed and written one at a time
(visualize) or one engine batch at a time (caption), so memory does not grow
with the data set.

Outputs, all under ``output_dir``:
  visualize.jsonl   one record per input row: boxes, marked images, prompts
  captions.jsonl    the same rows with answers, parsed regions and errors
  images/           the marked images (or crops) sent to the model
  metrics.json      counts, timings, throughput, tokens
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

from regioncap import boxes as bx
from regioncap import prompts
from regioncap.data import InputRow, iter_rows, resolve_path
from regioncap.draw import DrawStyle, draw_marks
from regioncap.engines.base import Engine, Request, Response, Sampling
from regioncap.images import ImageLoadError, crop_with_margin, load_image, resize_to, save_image, target_size
from regioncap.records import JsonlWriter, dumps, read_jsonl

log = logging.getLogger("regioncap")

VISUALIZE_FILE = "visualize.jsonl"
CAPTIONS_FILE = "captions.jsonl"
METRICS_FILE = "metrics.json"
IMAGES_DIR = "images"

#: Keys regioncap writes; an input field with one of these names is kept under ``input``.
_OWN_KEYS = {
    "id", "index", "image", "image_path", "type", "bbox", "bbox_format", "image_size", "input_size",
    "normalized_bbox", "valid_bboxes_num", "dropped_boxes", "clipped_boxes", "regions", "requests",
    "image_with_bbox", "prompt", "result_file", "error", "status", "answer", "tokens", "timing", "line",
}


class RunError(RuntimeError):
    """The run cannot start or finish (bad config, model not available, too many errors)."""


@dataclass
class StageStats:
    name: str
    rows: int = 0
    seconds: float = 0.0
    errors: Counter = field(default_factory=Counter)
    #: Process that ran the stage (the caption stage may run in a child).
    pid: Optional[int] = None


def seed_everything(seed: int) -> None:
    """Seed every RNG regioncap or its engines use, before anything is built."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy comes with Pillow users almost always; not required
        pass
    import sys

    if "torch" in sys.modules:  # engines seed torch per request; this covers model init
        sys.modules["torch"].manual_seed(seed)


def draw_style(draw_cfg: Any) -> DrawStyle:
    return DrawStyle(
        palette=list(draw_cfg.palette), line_width=float(draw_cfg.line_width),
        min_line_px=int(draw_cfg.min_line_px), label_size=float(draw_cfg.label_size),
        min_label_px=int(draw_cfg.min_label_px), dim=float(draw_cfg.dim),
    )


class RegionCapRun:
    """One run: ``visualize`` then ``caption`` over the configured data."""

    def __init__(self, cfg: Any, *, model_path: Optional[str] = None, isolate: bool = False) -> None:
        self.cfg = cfg
        #: Run the caption stage in a spawned child process (see ``_caption_in_child``).
        self.isolate = isolate
        self.out = Path(cfg.output_dir)
        self.images_dir = self.out / IMAGES_DIR
        self.style = draw_style(cfg.draw)
        self.model_path = model_path
        self.engine: Optional[Engine] = None
        self.stats: Dict[str, StageStats] = {}
        if cfg.prompt.strategy not in prompts.STRATEGIES:
            raise RunError(f"prompt.strategy must be one of {prompts.STRATEGIES}, got {cfg.prompt.strategy!r}")
        if cfg.prompt.answer_format not in prompts.ANSWER_FORMATS:
            raise RunError(f"prompt.answer_format must be one of {prompts.ANSWER_FORMATS}")
        if cfg.data.bbox_format not in bx.BBOX_FORMATS:
            raise RunError(f"data.bbox_format must be one of {bx.BBOX_FORMATS}, got {cfg.data.bbox_format!r}")
        if cfg.max_boxes < 1:
            raise RunError(f"max_boxes must be at least 1, got {cfg.max_boxes}")
        unknown = [s for s in cfg.stages if s not in ("visualize", "caption")]
        if unknown:
            raise RunError(f"unknown stage(s) {unknown}; stages are 'visualize' and 'caption'")

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        """Run the configured stages and return the run's metrics."""
        self.out.mkdir(parents=True, exist_ok=True)
        if "visualize" in self.cfg.stages:
            self.visualize()
        if "caption" in self.cfg.stages:
            if not (self.out / VISUALIZE_FILE).exists():
                raise RunError(f"{self.out / VISUALIZE_FILE} is missing: run the visualize stage first")
            self.caption()
        metrics = self.metrics()
        (self.out / METRICS_FILE).write_text(dumps(metrics) + "\n", encoding="utf-8")
        return metrics

    # ------------------------------------------------------------ visualize
    def visualize(self) -> StageStats:
        """Read every row, validate boxes, resize, draw marks, write images and records."""
        stats = self.stats.setdefault("visualize", StageStats("visualize"))
        stats.pid = os.getpid()
        start = time.perf_counter()
        self.images_dir.mkdir(parents=True, exist_ok=True)
        with JsonlWriter(self.out / VISUALIZE_FILE) as writer:
            for row in _progress(iter_rows(self.cfg.data), "visualize", self.cfg.progress):
                record = self.visualize_row(row)
                if record.get("error"):
                    stats.errors[record["error"]["kind"]] += 1
                writer.write(record)
                stats.rows += 1
        stats.seconds = time.perf_counter() - start
        return stats

    def visualize_row(self, row: InputRow) -> Dict[str, Any]:
        """Everything the caption stage needs for one input row (or an error row)."""
        t0 = time.perf_counter()
        rec = self._base_record(row)
        if row.error:
            return self._fail(rec, "visualize", row.error["kind"], row.error["message"], t0)
        cfg, model = self.cfg, self.cfg.model
        source = row.image_path if row.image_path else row.image
        try:
            loaded = load_image(
                source, max_image_pixels=cfg.limits.max_image_pixels, max_file_bytes=cfg.limits.max_file_bytes,
                draft_target=lambda w, h: target_size(
                    w, h, min_pixels=model.min_pixels, max_pixels=model.max_pixels,
                    patch_size=model.patch_size, merge_size=model.merge_size),
            )
        except ImageLoadError as exc:
            return self._fail(rec, "visualize", exc.kind, exc.message, t0)
        width, height = loaded.original_size
        rec["image_size"] = [width, height]
        try:
            parsed = bx.parse_boxes(row.bbox, cfg.data.bbox_format, width, height)
        except bx.BoxFormatError as exc:
            return self._fail(rec, "visualize", "bad_bbox", f"{rec['image']}: {exc}", t0)
        rec["dropped_boxes"] = [asdict(i) for i in parsed.dropped]
        rec["clipped_boxes"] = [asdict(i) for i in parsed.clipped]
        rec["type"] = "with_bbox" if parsed.num_input else "without_bbox"
        try:
            tw, th = target_size(width, height, min_pixels=model.min_pixels, max_pixels=model.max_pixels,
                                 patch_size=model.patch_size, merge_size=model.merge_size)
        except ImageLoadError as exc:
            return self._fail(rec, "visualize", exc.kind, exc.message, t0)
        rec["input_size"] = [tw, th]
        kept = parsed.boxes
        rec["valid_bboxes_num"] = len(kept)
        rec["normalized_bbox"] = bx.pad_normalized(
            [bx.normalized_xyxy(b, width, height) for _, b in kept], cfg.max_boxes)
        if not kept:
            if parsed.num_input:
                reasons = ", ".join(sorted({i.reason for i in parsed.dropped}))
                return self._fail(rec, "visualize", "no_valid_boxes",
                                  f"{rec['image']}: none of its {parsed.num_input} boxes is usable ({reasons})", t0)
            rec["status"] = "no_regions"
            rec["timing"] = {"visualize_s": round(time.perf_counter() - t0, 4)}
            return rec

        sx, sy = tw / width, th / height
        regions = []
        for i, (src, box) in enumerate(kept):
            scaled = box.scale(sx, sy)
            regions.append({
                "id": i + 1, "source_index": src, "bbox": box.as_list(2),
                "input_bbox": scaled.round_int(), "chunk": i // cfg.max_boxes, "number": i % cfg.max_boxes + 1,
            })
        rec["regions"] = regions
        try:
            rec["requests"] = self._make_requests(row, rec, loaded, (tw, th), kept, regions)
        except (OSError, ValueError) as exc:  # a write failure or a drawing error on this image only
            return self._fail(rec, "visualize", "draw_error", f"{rec['image']}: {exc}", t0)
        rec["image_with_bbox"] = str(self.out / rec["requests"][0]["image"])
        rec["prompt"] = rec["requests"][0]["prompt"]
        rec["timing"] = {"visualize_s": round(time.perf_counter() - t0, 4)}
        return rec

    def _make_requests(self, row: InputRow, rec: Dict[str, Any], loaded: Any, size: tuple,
                       kept: Sequence, regions: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        cfg, pcfg = self.cfg, self.cfg.prompt
        stem = f"{row.index:07d}"
        ext = "png" if cfg.draw.image_format == "png" else "jpg"
        resized = resize_to(loaded.image, size)
        requests: List[Dict[str, Any]] = []
        if pcfg.strategy == "crop":
            scale_x = loaded.image.width / loaded.original_size[0]
            scale_y = loaded.image.height / loaded.original_size[1]
            for reg, (_, box) in zip(regions, kept):
                crop, rect = crop_with_margin(loaded.image, box.scale(scale_x, scale_y), pcfg.crop_margin)
                cw, ch = target_size(crop.width, crop.height, min_pixels=cfg.model.min_pixels,
                                     max_pixels=cfg.model.max_pixels, patch_size=cfg.model.patch_size,
                                     merge_size=cfg.model.merge_size)
                name = f"{IMAGES_DIR}/{stem}_r{reg['id']:03d}.{ext}"
                self._save(resize_to(crop, (cw, ch)), name)
                reg["number"] = 1
                requests.append(self._request_spec(rec, name, [reg], (cw, ch), f"r{reg['id']}"))
            return requests

        chunks = bx.chunk(regions, cfg.max_boxes)
        clean_name = None
        if pcfg.strategy == "coords":
            clean_name = f"{IMAGES_DIR}/{stem}.{ext}"
            self._save(resized, clean_name)
        for c, chunk_regions in enumerate(chunks):
            if pcfg.strategy == "marked":
                labels = [cfg.draw.label_format.format(n=r["number"]) for r in chunk_regions]
                boxes = [r["input_bbox"] for r in chunk_regions]
                name = f"{IMAGES_DIR}/{stem}_c{c:02d}.{ext}"
                self._save(draw_marks(resized, boxes, labels, self.style), name)
            else:
                name = clean_name
            requests.append(self._request_spec(rec, name, chunk_regions, size, f"c{c}"))
        return requests

    def _request_spec(self, rec: Dict[str, Any], image: str, regions: List[Dict[str, Any]],
                      size: tuple, suffix: str) -> Dict[str, Any]:
        pcfg = self.cfg.prompt
        numbers = [r["number"] for r in regions]
        prompt = self._prompt_text(pcfg.template, regions, size)
        return {
            "key": f"{rec['id']}/{suffix}", "image": image, "image_size": list(size), "prompt": prompt,
            "numbers": numbers, "region_ids": [r["id"] for r in regions],
        }

    def _prompt_text(self, template: str, regions: List[Dict[str, Any]], size: tuple) -> str:
        pcfg, model = self.cfg.prompt, self.cfg.model
        numbers = [r["number"] for r in regions]
        labels = [self.cfg.draw.label_format.format(n=n) for n in numbers]
        text = ""
        if pcfg.strategy == "coords":
            w, h = size
            coords = [
                bx.qwen2_coords(bx.Box(*r["input_bbox"]), w, h) if model.family == "qwen2_vl"
                else bx.qwen25_coords(bx.Box(*r["input_bbox"]), w, h)
                for r in regions
            ]
            text = prompts.regions_text(numbers, coords, model.family)
        noun = "region" if pcfg.strategy == "coords" else "box"
        return prompts.build_prompt(template, numbers=numbers, labels=labels,
                                    answer_format=pcfg.answer_format, regions_text=text, noun=noun)

    def _save(self, image: Any, name: str) -> None:
        save_image(image, self.out / name, fmt=self.cfg.draw.image_format, quality=self.cfg.draw.jpeg_quality)

    def _base_record(self, row: InputRow) -> Dict[str, Any]:
        rec: Dict[str, Any] = {}
        collisions = {}
        for k, v in row.extra.items():
            (collisions if k in _OWN_KEYS else rec)[k] = v
        if collisions:
            rec["input"] = collisions
        image = row.image if isinstance(row.image, str) else (row.image_path or "<in-memory image>")
        rec.update({
            "id": row.row_id, "index": row.index, "image": image, "image_path": row.image_path,
            "type": "with_bbox" if row.bbox else "without_bbox", "bbox": row.bbox,
            "bbox_format": self.cfg.data.bbox_format, "result_file": str(self.out),
            "image_with_bbox": None, "prompt": None, "valid_bboxes_num": 0,
            "normalized_bbox": bx.pad_normalized([], self.cfg.max_boxes),
            "regions": [], "requests": [], "dropped_boxes": [], "clipped_boxes": [],
            "status": "pending", "error": None,
        })
        if row.line is not None:
            rec["line"] = row.line
        return rec

    @staticmethod
    def _fail(rec: Dict[str, Any], stage: str, kind: str, message: str, t0: float) -> Dict[str, Any]:
        rec["status"] = "error"
        rec["error"] = {"stage": stage, "kind": kind, "message": message}
        rec["timing"] = {f"{stage}_s": round(time.perf_counter() - t0, 4)}
        return rec

    # -------------------------------------------------------------- caption
    def caption(self) -> StageStats:
        """Send every prepared request to the engine, parse answers, write caption records."""
        if self.isolate:
            return self._caption_in_child()
        from regioncap.engines import EngineError, build_engine

        stats = self.stats.setdefault("caption", StageStats("caption"))
        stats.pid = os.getpid()
        start = time.perf_counter()
        if self.engine is None:
            try:
                self.engine = build_engine(self.cfg.engine, self.cfg.model, self.model_path)
            except EngineError as exc:
                raise RunError(
                    f"engine {self.cfg.engine.name!r} could not start: {exc}. The visualize records are in "
                    f"{self.out / VISUALIZE_FILE}; after fixing this, run only the caption stage with "
                    f"stages=[caption] hydra.run.dir={self.out}") from None
            log.info("engine: %s", self.engine.describe())
        batch_size = max(1, int(self.cfg.engine.batch_size))
        try:
            with JsonlWriter(self.out / CAPTIONS_FILE) as writer:
                records = _progress(read_jsonl(self.out / VISUALIZE_FILE), "caption", self.cfg.progress)
                for batch in _batches(records, batch_size):
                    for rec in self._caption_batch(batch):
                        if rec["status"] == "error":
                            stats.errors[rec["error"]["kind"]] += 1
                        writer.write(rec)
                        stats.rows += 1
        finally:
            stats.seconds = time.perf_counter() - start
        return stats

    def _caption_in_child(self) -> StageStats:
        """The caption stage in a spawned process, so the engine's memory (a vLLM
        engine's GPU memory above all) is released when it ends, whatever the engine."""
        import multiprocessing as mp
        import queue as queue_mod

        from omegaconf import OmegaConf

        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        proc = ctx.Process(target=_caption_child, args=(cfg, self.model_path, results), name="regioncap-caption")
        start = time.perf_counter()
        proc.start()
        result = None
        while result is None:
            try:
                result = results.get(timeout=0.5)
            except queue_mod.Empty:
                if not proc.is_alive():
                    break
        proc.join()
        if result is None:
            raise RunError(f"the caption stage's process died (exit code {proc.exitcode}); "
                           f"the visualize records are in {self.out / VISUALIZE_FILE}")
        if "error" in result:
            raise RunError(result["error"])
        stats = self.stats.setdefault("caption", StageStats("caption"))
        stats.rows, stats.errors, stats.pid = result["rows"], Counter(result["errors"]), result["pid"]
        stats.seconds = time.perf_counter() - start
        return stats

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _sampling(self) -> Sampling:
        s = self.cfg.sampling
        return Sampling(temperature=float(s.temperature), top_p=float(s.top_p), max_tokens=int(s.max_tokens),
                        seed=int(s.seed if s.seed is not None else self.cfg.seed))

    def _engine_request(self, spec: Dict[str, Any], *, reask: bool = False) -> Request:
        pcfg = self.cfg.prompt
        numbers = spec["numbers"]
        return Request(
            key=spec["key"], image_path=str(self.out / spec["image"]), prompt=spec["prompt"],
            system=pcfg.system, sampling=self._sampling(), image_size=tuple(spec["image_size"]),
            regex=prompts.answer_regex(numbers, pcfg.answer_format),
            json_schema=prompts.answer_json_schema(numbers, pcfg.answer_format),
            meta={"numbers": numbers, "answer_format": pcfg.answer_format, "reask": reask},
        )

    def _caption_batch(self, batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        assert self.engine is not None
        pcfg = self.cfg.prompt
        pending = [(rec, spec) for rec in batch if rec["status"] == "pending" for spec in rec["requests"]]
        responses = self.engine.generate([self._engine_request(spec) for _, spec in pending])
        for (rec, spec), resp in zip(pending, responses):
            self._attach(spec, resp)

        # One re-ask for regions a (successful) answer left out; never invented.
        reasks = []
        if pcfg.reask_missing and pcfg.strategy != "crop":
            for rec, spec in pending:
                missing = [n for n in spec["numbers"] if n not in spec["captions"]]
                if spec["error"] is None and missing:
                    reasks.append((spec, self._reask_spec(rec, spec, missing)))
        if reasks:
            answers = self.engine.generate([self._engine_request(r, reask=True) for _, r in reasks])
            for (spec, rspec), resp in zip(reasks, answers):
                parsed = self._attach(rspec, resp)
                spec["reask"] = {k: rspec[k] for k in ("key", "prompt", "numbers", "answer", "error",
                                                       "prompt_tokens", "output_tokens", "latency_s")}
                for n, caption in parsed.items():
                    spec["captions"].setdefault(n, caption)
                    spec.setdefault("reasked_numbers", []).append(n)
        return [self._finish(rec) if rec["status"] == "pending" else rec for rec in batch]

    def _reask_spec(self, rec: Dict[str, Any], spec: Dict[str, Any], missing: List[int]) -> Dict[str, Any]:
        pcfg = self.cfg.prompt
        if pcfg.strategy == "coords":
            regions = [r for r in rec["regions"] if r["id"] in spec["region_ids"] and r["number"] in missing]
            prompt = self._prompt_text(pcfg.template, regions, tuple(spec["image_size"]))
        else:
            labels = [self.cfg.draw.label_format.format(n=n) for n in missing]
            prompt = pcfg.reask_template.format(
                labels=prompts.join_words(labels),
                format_instruction=prompts.format_instruction(pcfg.answer_format, missing))
        return {"key": spec["key"] + "/reask", "image": spec["image"], "image_size": spec["image_size"],
                "prompt": prompt, "numbers": missing, "region_ids": spec["region_ids"]}

    def _attach(self, spec: Dict[str, Any], resp: Response) -> Dict[int, str]:
        pcfg = self.cfg.prompt
        spec.update({"answer": resp.text, "error": resp.error, "prompt_tokens": resp.prompt_tokens,
                     "output_tokens": resp.output_tokens, "finish_reason": resp.finish_reason,
                     "latency_s": None if resp.latency_s is None else round(resp.latency_s, 4)})
        parsed = prompts.parse_answer(resp.text, spec["numbers"], pcfg.answer_format) if resp.ok else None
        spec["format_ok"] = bool(parsed and parsed.format_ok)
        spec["captions"] = dict(parsed.captions) if parsed else {}
        return spec["captions"]

    def _finish(self, rec: Dict[str, Any]) -> Dict[str, Any]:
        by_id = {r["id"]: r for r in rec["regions"]}
        answers, prompt_tokens, output_tokens = [], 0, 0
        first_error = None
        for spec in rec["requests"]:
            captions = spec.pop("captions", {})
            reasked = set(spec.pop("reasked_numbers", []))
            number_to_id = dict(zip(spec["numbers"], spec["region_ids"])) if len(spec["numbers"]) == len(
                spec["region_ids"]) else {}
            for n, rid in number_to_id.items():
                reg = by_id[rid]
                reg["caption"] = captions.get(n)
                reg["missing"] = reg["caption"] is None
                reg["attempt"] = 2 if n in reasked else 1
                if reg["missing"]:
                    reg["reason"] = (spec["error"] or {}).get("kind") or "not_in_answer"
            if spec.get("answer"):
                answers.append(spec["answer"])
            for s in (spec, spec.get("reask") or {}):
                prompt_tokens += s.get("prompt_tokens") or 0
                output_tokens += s.get("output_tokens") or 0
            if spec["error"] and first_error is None:
                first_error = spec["error"]
        rec["answer"] = "\n".join(answers) if answers else None
        rec["tokens"] = {"prompt": prompt_tokens, "output": output_tokens}
        captioned = sum(1 for r in rec["regions"] if r.get("caption"))
        if captioned == len(rec["regions"]):
            rec["status"] = "ok"
        elif captioned:
            rec["status"] = "partial"
        else:
            rec["status"] = "error"
        if first_error:
            rec["error"] = {"stage": "caption", **first_error}
        elif rec["status"] == "error":
            rec["error"] = {"stage": "caption", "kind": "no_caption_parsed",
                            "message": f"{rec['image']}: the model's answer named none of the regions"}
        return rec

    # -------------------------------------------------------------- metrics
    def metrics(self) -> Dict[str, Any]:
        """Counts, cost, answer shape and reference scores of what this run wrote
        (``regioncap.metrics.compute_metrics`` over the final records file)."""
        from regioncap.metrics import compute_metrics

        stages = {name: {"rows": st.rows, "seconds": st.seconds, "errors": dict(st.errors), "pid": st.pid}
                  for name, st in self.stats.items()}
        final = self.out / (CAPTIONS_FILE if "caption" in self.stats else VISUALIZE_FILE)
        records = read_jsonl(final) if final.exists() else iter(())
        model = self.cfg.model
        return compute_metrics(records, stages, patch_size=int(model.patch_size), merge_size=int(model.merge_size),
                               references_key=self.cfg.data.references_key)

    def summary(self, metrics: Dict[str, Any]) -> str:
        """A one-screen summary for the end of a run."""
        from regioncap.metrics import format_summary

        return format_summary(metrics, max_error_rate=float(self.cfg.max_error_rate), out_dir=str(self.out))


def _caption_child(cfg: Dict[str, Any], model_path: Optional[str], results: Any) -> None:
    """Entry of the spawned caption process: run the stage, report its stats, exit."""
    from omegaconf import OmegaConf

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    handler = logging.FileHandler(Path(cfg["output_dir"]) / "regioncap.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    run = RegionCapRun(OmegaConf.create(cfg), model_path=model_path)
    try:
        stats = run.caption()
        results.put({"rows": stats.rows, "errors": dict(stats.errors), "pid": os.getpid()})
    except RunError as exc:
        results.put({"error": str(exc)})
    except Exception as exc:  # report anything else to the parent rather than dying silently
        log.exception("caption stage failed")
        results.put({"error": f"caption stage failed: {type(exc).__name__}: {exc}"})
    finally:
        run.close()


def _progress(items: Iterable, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="row", dynamic_ncols=True, mininterval=1.0)


def _batches(records: Iterable[Dict[str, Any]], max_requests: int) -> Iterator[List[Dict[str, Any]]]:
    """Group rows so that each engine call gets about ``max_requests`` requests."""
    batch: List[Dict[str, Any]] = []
    n = 0
    for rec in records:
        batch.append(rec)
        n += len(rec.get("requests") or []) if rec.get("status") == "pending" else 0
        if n >= max_requests:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def build_run(cfg: Any, *, multirun: bool = False) -> RegionCapRun:
    """Build the run object from a composed config: the one place objects are built.

    Seeds every RNG first; resolves (and, for the offline model, builds) the
    model before any stage starts, so a model that is not available fails in
    seconds, not after the visualize stage. ``multirun``: the job is one of a
    sweep (the vLLM engine then runs in a child process unless
    ``engine.isolate`` says otherwise).
    """
    seed_everything(int(cfg.seed))
    model_path = None
    if "caption" in cfg.stages and cfg.engine.name not in ("fake", "openai"):
        from regioncap.engines.base import EngineError
        from regioncap.models import resolve_model_path

        try:
            model_path = resolve_model_path(cfg.model)
        except EngineError as exc:
            raise RunError(str(exc)) from None
    isolate = cfg.engine.isolate
    if isolate is None:
        # vLLM does not hand a GPU back inside one process: in a sweep, each
        # job's engine lives and dies in its own process.
        isolate = multirun and cfg.engine.name in ("vllm", "auto")
    run = RegionCapRun(cfg, model_path=model_path, isolate=bool(isolate) and "caption" in cfg.stages)
    data_path = resolve_path(cfg.data.path) if cfg.data.path else None
    log.info("run: model=%s (%s) engine=%s prompt=%s draw=%s data=%s max_boxes=%d seed=%d -> %s",
             cfg.model.name, model_path or cfg.model.path, cfg.engine.name, cfg.prompt.name, cfg.draw.name,
             data_path, cfg.max_boxes, cfg.seed, run.out)
    return run
