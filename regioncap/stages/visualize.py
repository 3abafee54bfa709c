"""The visualize stage: one input row -> one record with validated boxes, the images to send and their prompts.

:class:`Visualizer` does one row at a time (:meth:`Visualizer.process_row`,
what the preparation workers of :mod:`regioncap.prepare` run) and knows nothing
of files other than the images it writes under the run dir. Every failure of
a row is an error row naming the input; a resource failure (disk full, too
many open files) stops the run instead, since the next rows would fail the
same way and a resume goes on once it is fixed.
"""

from __future__ import annotations

import errno
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from regioncap import boxes as bx
from regioncap.draw import DrawStyle
from regioncap.errors import RunError
from regioncap.images import ImageLoadError, load_image, resize_to, save_image, target_size, uri_label
from regioncap.record_types import RECORD_KEYS
from regioncap.rundir import IMAGES_DIR, resume_args
from regioncap.signals import stop_requested
from regioncap.stages import Stage

#: Keys regioncap writes (the fields of a record, :data:`~regioncap.record_types.RECORD_KEYS`);
#: an input field with one of these names is kept under ``input``.
OWN_KEYS = RECORD_KEYS

#: OS errors that say the machine, not the row, is the problem.
RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EROFS}


class ResourceError(RunError):
    """The machine ran out of something a row needs (disk space, file handles): the run stops, resume goes on."""


def draw_style(draw_cfg: Any) -> DrawStyle:
    """The :class:`DrawStyle` of a ``draw`` config section."""
    return DrawStyle(
        palette=list(draw_cfg.palette), line_width=float(draw_cfg.line_width),
        min_line_px=int(draw_cfg.min_line_px), label_size=float(draw_cfg.label_size),
        min_label_px=int(draw_cfg.min_label_px), dim=float(draw_cfg.dim),
    )


def resource_error(exc: BaseException) -> Optional[OSError]:
    """``exc`` (or its cause) when it is an OS error about the machine's resources, else None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


class Visualizer(Stage):
    """Input row -> record: decode, validate boxes, resize to the model's budget, draw, write, prompts."""

    name = "visualize"

    def __init__(self, cfg: Any, out_dir: Optional[Any] = None) -> None:
        from regioncap.strategies import build_strategy

        self.cfg = cfg
        self.out = Path(out_dir if out_dir is not None else cfg.output_dir)
        self.style = draw_style(cfg.draw)
        self.strategy = build_strategy(cfg, self.style, self._save)
        self.max_boxes = int(cfg.max_boxes)
        #: The row preparation pool (set by the run; ``None``: every row in this process).
        self.pool: Any = None
        self.propose_cfg = cfg.get("propose")
        #: A proposer that runs here (``contours``); one that needs the engine (``vlm``) runs in the
        #: caption stage, on the rows this stage leaves ``status: grounding``.
        self.proposer: Any = None
        self.grounding = False
        from regioncap.propose import build_proposer, proposer_name, proposer_type

        #: The proposer's short name (``contours``; ``none``): the ``method`` of the records.
        self.propose_method = proposer_name(self.propose_cfg)
        cls = proposer_type(self.propose_cfg)
        if cls is not None and cls.needs_engine:
            self.grounding = True
        elif cls is not None:
            self.proposer = build_proposer(self.propose_cfg)

    @staticmethod
    def identity(item: Any) -> Tuple[Any, Any, Any]:
        return item.index, item.row_id, getattr(item, "digest", None)

    def batches(self, todo: Iterable[Any]) -> Iterator[List[Dict[str, Any]]]:
        """Records of the rows, ``commit_every`` at a time (sooner when a stop is asked for)."""
        every = max(1, int(self.cfg.commit_every))
        records = self.pool.map(todo) if self.pool is not None else (self.process_row(r) for r in todo)
        buf: List[Dict[str, Any]] = []
        for record in records:
            buf.append(record)
            if len(buf) >= every or stop_requested():
                yield buf
                buf = []
                if stop_requested():
                    return
        if buf:
            yield buf

    # ------------------------------------------------------------- one row
    def process_row(self, row: Any) -> Dict[str, Any]:
        """Everything the caption stage needs for one input row, or an error row; never raises for a row.

        A :class:`ResourceError` (disk full...) is raised: it is the machine's
        problem, not the row's.
        """
        t0 = time.perf_counter()
        rec = self.base_record(row)
        try:
            return self._process(row, rec, t0)
        except RunError:
            raise
        except Exception as exc:  # noqa: BLE001 - no single row may stop a run
            if resource_error(exc) is not None:
                raise self.resource_stop(rec, row.index, exc) from None
            return self.fail(rec, "internal_error", f"{rec['image']}: {type(exc).__name__}: {exc}", t0)

    def resource_stop(self, rec: Dict[str, Any], index: int, exc: BaseException) -> ResourceError:
        """The :class:`ResourceError` that stops the run for the resource error in ``exc``."""
        res = resource_error(exc) or exc
        return ResourceError(f"{rec['image']}: {getattr(res, 'strerror', None) or res} while preparing row {index} "
                             f"({type(res).__name__} errno {getattr(res, 'errno', None)}); free the resource and go "
                             f"on with {resume_args(self.out)}")

    def _process(self, row: Any, rec: Dict[str, Any], t0: float) -> Dict[str, Any]:
        if row.error:
            return self.fail(rec, row.error["kind"], row.error["message"], t0)
        cfg, model = self.cfg, self.cfg.model
        source = row.image_path if row.image_path else row.image
        try:
            loaded = load_image(
                source, max_image_pixels=cfg.limits.max_image_pixels, max_file_bytes=cfg.limits.max_file_bytes,
                draft_target=lambda w, h: target_size(
                    w, h, min_pixels=model.min_pixels, max_pixels=model.max_pixels,
                    patch_size=model.patch_size, merge_size=model.merge_size, source=str(rec["image"])),
            )
        except ImageLoadError as exc:
            return self.fail(rec, exc.kind, exc.message, t0)
        width, height = loaded.original_size
        rec["image_size"] = [width, height]
        try:
            parsed = bx.parse_boxes(row.bbox, str(cfg.data.bbox_format), width, height)
        except bx.BoxFormatError as exc:
            return self.fail(rec, "bad_bbox", f"{rec['image']}: {exc}", t0)
        rec["dropped_boxes"] = [asdict(i) for i in parsed.dropped]
        rec["clipped_boxes"] = [asdict(i) for i in parsed.clipped]
        rec["type"] = "with_bbox" if parsed.num_input else "without_bbox"
        try:
            tw, th = target_size(width, height, min_pixels=model.min_pixels, max_pixels=model.max_pixels,
                                 patch_size=model.patch_size, merge_size=model.merge_size, source=str(rec["image"]))
        except ImageLoadError as exc:
            return self.fail(rec, exc.kind, exc.message, t0)
        rec["input_size"] = [tw, th]
        image = None
        proposals = None
        if self._proposes(row):
            image = resize_to(loaded.image, (tw, th))
            if self.grounding:  # the engine grounds it in the caption stage, then draws and asks
                return self.ground_later(rec, row, image, parsed, t0)
            proposals = [p.scale(width / tw, height / th) for p in self.proposer.propose(image)]
        return self.finish_row(rec, row, loaded, image, parsed, proposals, t0)

    def _proposes(self, row: Any) -> bool:
        if self.proposer is None and not self.grounding:
            return False
        from regioncap.propose import should_propose

        return should_propose(row.bbox, self.propose_cfg.when)

    def finish_row(self, rec: Dict[str, Any], row: Any, loaded: Any, image: Any, parsed: Any,
                   proposals: Optional[List[Any]], t0: float) -> Dict[str, Any]:
        """Regions (given boxes and proposals), the request images and prompts of a decoded row."""
        from regioncap.propose import plan_regions

        (width, height), (tw, th) = rec["image_size"], rec["input_size"]
        pcfg = self.propose_cfg
        plan = plan_regions(parsed.boxes, proposals, pcfg.when if pcfg is not None else "missing",
                            add_iou=float(pcfg.add_iou) if pcfg is not None else 0.5,
                            max_regions=pcfg.max_regions if pcfg is not None else None)
        if proposals is not None:
            rec["proposals"] = {"method": self.propose_method, "when": str(pcfg.when), "proposed": plan.proposed,
                                "capped": plan.capped, "overlapping_given": plan.overlapping_given}
            if plan.truth:
                rec["proposals"]["truth_bbox"] = [b.as_list(2) for b in plan.truth]
                rec["proposals"]["truth_index"] = plan.truth_index
        kept = [(r.source_index, r.box) for r in plan.regions]
        rec["valid_bboxes_num"] = len(kept)
        rec["normalized_bbox"] = bx.pad_normalized(
            [bx.normalized_xyxy(b, width, height) for _, b in kept], self.max_boxes)
        if not kept:
            if parsed.num_input and proposals is None:
                reasons = ", ".join(sorted({i.reason for i in parsed.dropped}))
                return self.fail(rec, "no_valid_boxes",
                                 f"{rec['image']}: none of its {parsed.num_input} boxes is usable ({reasons})", t0)
            rec["status"] = "no_regions"
            rec["timing"] = {"visualize_s": round(time.perf_counter() - t0, 4)}
            return rec

        rec["regions"] = self.regions(kept, width, height, tw, th)
        for reg, planned in zip(rec["regions"], plan.regions):
            reg["source"] = planned.source
            if planned.score is not None:
                reg["score"] = round(float(planned.score), 4)
            if planned.label is not None:
                reg["label"] = planned.label
        if image is None and not self.strategy.one_region_per_image:
            image = resize_to(loaded.image, (tw, th))
        try:
            rec["requests"] = self.strategy.requests(rec, f"{row.index:07d}", image, loaded, (tw, th), kept,
                                                     rec["regions"])
        except ImageLoadError as exc:
            return self.fail(rec, exc.kind, exc.message, t0)
        except (OSError, ValueError) as exc:  # a write failure or a drawing error on this image only
            if resource_error(exc) is not None:
                # A ResourceError here, not in process_row: the caption stage draws grounded rows with this too.
                raise self.resource_stop(rec, row.index, exc) from None
            return self.fail(rec, "draw_error", f"{rec['image']}: {exc}", t0)
        rec["image_with_bbox"] = str(self.out / rec["requests"][0]["image"])
        rec["prompt"] = rec["requests"][0]["prompt"]
        rec["status"] = "pending"
        rec["timing"] = {"visualize_s": round(time.perf_counter() - t0, 4)}
        return rec

    def ground_later(self, rec: Dict[str, Any], row: Any, image: Any, parsed: Any, t0: float) -> Dict[str, Any]:
        """A row the engine proposes regions for: its clean image at the input size and the grounding request."""
        name = f"{IMAGES_DIR}/{row.index:07d}_ground.{self.strategy.ext()}"
        self._save(image, name)
        rec["status"] = "grounding"
        rec["grounding"] = {"image": name, "image_size": list(rec["input_size"]),
                            "given": [[i, b.as_list(4)] for i, b in parsed.boxes]}
        rec["timing"] = {"visualize_s": round(time.perf_counter() - t0, 4)}
        return rec

    def regions(self, kept: List[Tuple[int, bx.Box]], width: int, height: int, tw: int, th: int
                ) -> List[Dict[str, Any]]:
        """The region entries of the kept boxes: source and input-size boxes, chunk and number."""
        sx, sy = tw / width, th / height
        return [{
            "id": i + 1, "source_index": src, "bbox": box.as_list(2),
            "input_bbox": box.scale(sx, sy).round_int(), "chunk": i // self.max_boxes,
            "number": i % self.max_boxes + 1,
        } for i, (src, box) in enumerate(kept)]

    def _save(self, image: Any, name: str) -> None:
        save_image(image, self.out / name, fmt=str(self.cfg.draw.image_format), quality=self.cfg.draw.jpeg_quality)

    def base_record(self, row: Any) -> Dict[str, Any]:
        """The record of a row before any work: its input fields, id, index and empty results."""
        rec: Dict[str, Any] = {}
        collisions = {}
        for k, v in row.extra.items():
            (collisions if k in OWN_KEYS else rec)[k] = v
        if collisions:
            rec["input"] = collisions
        image = uri_label(row.image) if isinstance(row.image, str) else (row.image_path or "<in-memory image>")
        rec.update({
            "id": row.row_id, "index": row.index, "image": image, "image_path": row.image_path,
            "type": "with_bbox" if row.bbox else "without_bbox", "bbox": row.bbox,
            "bbox_format": str(self.cfg.data.bbox_format), "result_file": str(self.out),
            "image_with_bbox": None, "prompt": None, "valid_bboxes_num": 0,
            "normalized_bbox": bx.pad_normalized([], self.max_boxes),
            "regions": [], "requests": [], "dropped_boxes": [], "clipped_boxes": [],
            "status": "pending", "error": None,
        })
        digest = getattr(row, "digest", None)
        if digest:
            rec["digest"] = digest
        if row.line is not None:
            rec["line"] = row.line
        return rec

    @staticmethod
    def fail(rec: Dict[str, Any], kind: str, message: str, t0: float, stage: str = "visualize") -> Dict[str, Any]:
        """Make ``rec`` an error row of ``stage``."""
        rec["status"] = "error"
        rec["error"] = {"stage": stage, "kind": kind, "message": message}
        rec["timing"] = {f"{stage}_s": round(time.perf_counter() - t0, 4)}
        return rec
