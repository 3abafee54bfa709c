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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from regioncap import boxes as bx
from regioncap.errors import RunError
from regioncap.images import ImageLoadError, load_image, resize_to, save_image, uri_label
from regioncap.record_types import ABSENT, IN_MEMORY_IMAGE, NO_IMAGE, RECORD_KEYS, Record, RecordError, Region, RequestSpec
from regioncap.rundir import IMAGES_DIR, resume_args
from regioncap.signals import stop_requested
from regioncap.stages import VisualizeStage
from regioncap.strategies import PromptStrategy, build_strategy

if TYPE_CHECKING:
    from regioncap.config import RegionCapConfig

#: ``grounding`` (a row the engine proposes regions for): the request's fields and, under this key,
#: the row's usable given boxes ``[[source index, xyxy], ...]``.
GIVEN = "given"

#: OS errors that say the machine, not the row, is the problem.
RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EROFS}


class ResourceError(RunError):
    """The machine ran out of something a row needs (disk space, file handles): the run stops, resume goes on."""


def resource_error(exc: BaseException) -> Optional[OSError]:
    """``exc`` (or its cause) when it is an OS error about the machine's resources, else None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


#: Exceptions of a row's work that may pass another time: the machine or a read was at fault, not
#: the input (``error.retryable``; ``retry_errors=true`` redoes those rows).
TRANSIENT_EXCEPTIONS = (MemoryError, TimeoutError, ConnectionError)
#: Image errors of a read that may pass another time (an I/O error, a flaky mount); the others
#: (no such file, not an image, too large) say what is wrong with the input.
TRANSIENT_IMAGE_KINDS = frozenset({"unreadable_file"})


def transient(exc: BaseException) -> bool:
    """Whether a row that failed with ``exc`` may pass another time (``error.retryable``)."""
    if isinstance(exc, ImageLoadError):
        return exc.kind in TRANSIENT_IMAGE_KINDS
    # Any OS error here is a read or write of this row's files failing (a resource error stops the run).
    return isinstance(exc, (*TRANSIENT_EXCEPTIONS, OSError))


def fail(rec: Record, kind: str, message: str, t0: float, stage: str = VisualizeStage.name,
         retryable: bool = False) -> Record:
    """Make ``rec`` an error row of ``stage``; ``retryable``: the failure may pass another time."""
    rec.status = "error"
    rec.error = RecordError(stage=stage, kind=kind, message=message, retryable=retryable)
    rec.timing = {f"{stage}_s": round(time.perf_counter() - t0, 4)}
    return rec


def resource_stop(out: Path, rec: Record, index: int, exc: BaseException) -> ResourceError:
    """The :class:`ResourceError` that stops the run for the resource error in ``exc``."""
    res = resource_error(exc) or exc
    return ResourceError(f"{rec.image}: {getattr(res, 'strerror', None) or res} while preparing row {index} "
                         f"({type(res).__name__} errno {getattr(res, 'errno', None)}); free the resource and go "
                         f"on with {resume_args(out)}")


@dataclass(frozen=True)
class ProposeSettings:
    """What the region plan reads of the ``propose`` section (defaults: no proposer), read once."""

    method: str = "none"
    when: str = "missing"
    add_iou: float = 0.5
    max_regions: Optional[int] = None

    @classmethod
    def from_config(cls, section: Any) -> "ProposeSettings":
        """The settings of a ``propose`` config section (None: no proposer)."""
        if section is None:
            return cls()
        from regioncap.propose import proposer_name

        return cls(method=proposer_name(section), when=str(section.when),
                   add_iou=float(section.add_iou),
                   max_regions=None if section.max_regions is None else int(section.max_regions))


class RowRequests:
    """A decoded row's regions (given boxes and proposals) and its requests, images written.

    What the visualize stage does once a row is decoded, and what the caption
    stage does for a row whose regions the engine grounded (``propose=vlm``):
    one code path, with the row's parts passed in.
    """

    def __init__(self, strategy: PromptStrategy, propose: ProposeSettings, out: Path) -> None:
        self.strategy = strategy
        self.propose = propose
        self.out = out

    def save(self, image: Any, name: str) -> None:
        """Write ``image`` as ``name`` under the run dir, in the strategy's ``draw.image_format``."""
        style = self.strategy.style
        save_image(image, self.out / name, fmt=style.image_format, quality=style.jpeg_quality)

    def finish(self, rec: Record, index: int, source: Any, image: Any, given: Sequence[Tuple[int, bx.Box]],
               num_input: int, dropped: Sequence[Any], proposals: Optional[List[Any]], t0: float,
               stage: str = VisualizeStage.name) -> Record:
        """Regions, request images and prompts of a decoded row.

        ``source`` is the decoded image its boxes scale from (``rec.image_size``
        is its full-resolution size), ``image`` the row's image at the input size
        when already made, ``given`` the row's usable boxes (``(source index,
        Box)`` in source pixels), ``proposals`` in source pixels or None.
        """
        from regioncap.propose import plan_regions

        (width, height), (tw, th) = rec.image_size, rec.input_size
        p = self.propose
        plan = plan_regions(given, proposals, p.when, add_iou=p.add_iou, max_regions=p.max_regions)
        if proposals is not None:
            rec.proposals = {"method": p.method, "when": p.when, "proposed": plan.proposed,
                             "capped": plan.capped, "overlapping_given": plan.overlapping_given}
            if plan.truth:
                rec.proposals["truth_bbox"] = [b.as_list(2) for b in plan.truth]
                rec.proposals["truth_index"] = plan.truth_index
        kept = [r.box for r in plan.regions]
        max_boxes = self.strategy.max_boxes
        rec.valid_bboxes_num = len(kept)
        rec.normalized_bbox = bx.pad_normalized([bx.normalized_xyxy(b, width, height) for b in kept], max_boxes)
        if not kept:
            if num_input and proposals is None:
                reasons = ", ".join(sorted({i.reason for i in dropped}))
                # The first box's own detail says what was wrong and, for a box format that does not
                # fit the values (pixels read as fractions...), which one it may be.
                first = f"; {dropped[0].detail}" if dropped else ""
                return fail(rec, "no_valid_boxes",
                            f"{rec.image}: none of its {num_input} boxes is usable ({reasons}){first}", t0, stage)
            rec.status = "no_regions"
            rec.timing = {f"{stage}_s": round(time.perf_counter() - t0, 4)}
            return rec

        sx, sy = tw / width, th / height
        rec.regions = regions = []
        for i, ((chunk, number), planned) in enumerate(zip(self.strategy.slots(len(kept)), plan.regions)):
            regions.append(Region(
                id=i + 1, source_index=planned.source_index, bbox=planned.box.as_list(2),
                input_bbox=planned.box.scale(sx, sy).round_int(), chunk=chunk, number=number,
                source=planned.source,
                score=ABSENT if planned.score is None else round(float(planned.score), 4),
                label=ABSENT if planned.label is None else planned.label))
        if image is None and not self.strategy.one_region_per_image:
            image = resize_to(source, (tw, th))
        try:
            rendered = self.strategy.render(f"{index:07d}", image, source, (width, height),
                                            self.strategy.plan(regions, kept))
            for r in rendered:
                if r.image is not None:
                    self.save(r.image, r.name)
        except ImageLoadError as exc:
            return fail(rec, exc.kind, exc.message, t0, stage, retryable=transient(exc))
        except (OSError, ValueError) as exc:  # a write failure or a drawing error on this image only
            if resource_error(exc) is not None:
                # A ResourceError here: the caption stage draws grounded rows with this too.
                raise resource_stop(self.out, rec, index, exc) from None
            return fail(rec, "draw_error", f"{rec.image}: {exc}", t0, stage, retryable=transient(exc))
        rec.requests = [self.strategy.spec(rec.id, r) for r in rendered]
        rec.image_with_bbox = str(self.out / rec.requests[0].image)
        rec.prompt = rec.requests[0].prompt
        rec.status = "pending"
        rec.timing = {f"{stage}_s": round(time.perf_counter() - t0, 4)}
        return rec


class Visualizer(VisualizeStage):
    """Input row -> record: decode, validate boxes, resize to the model's budget, draw, write, prompts.

    The config is read once, here: per row, the stage reads plain attributes.
    """

    def __init__(self, cfg: RegionCapConfig, out_dir: Optional[Any] = None, strategy: Optional[PromptStrategy] = None) -> None:
        self.cfg = cfg
        self.out = Path(out_dir if out_dir is not None else cfg.output_dir)
        self.strategy = strategy if strategy is not None else build_strategy(cfg)
        self.style = self.strategy.style
        self.family = self.strategy.family
        self.max_boxes = self.strategy.max_boxes
        self.commit_every = max(1, cfg.commit_every)
        self.bbox_format = str(cfg.data.bbox_format)
        self.max_image_pixels = cfg.limits.max_image_pixels
        self.max_file_bytes = cfg.limits.max_file_bytes
        #: The row preparation pool (set by the run; ``None``: every row in this process).
        self.pool: Any = None
        propose_cfg = cfg.propose
        self.propose = ProposeSettings.from_config(propose_cfg)
        self.rows = RowRequests(self.strategy, self.propose, self.out)
        #: A proposer that runs here (``contours``); one that needs the engine (``vlm``) runs in the
        #: caption stage, on the rows this stage leaves ``status: grounding``.
        self.proposer: Any = None
        self.grounding = False
        from regioncap.propose import build_proposer, proposer_type

        cls = proposer_type(propose_cfg)
        if cls is not None and cls.needs_engine:
            self.grounding = True
        elif cls is not None:
            self.proposer = build_proposer(propose_cfg)

    @staticmethod
    def identity(item: Any) -> Tuple[Any, Any, Any]:
        return item.index, item.row_id, getattr(item, "digest", None)

    def batches(self, todo: Iterable[Any]) -> Iterator[List[Dict[str, Any]]]:
        """Records of the rows, ``commit_every`` at a time (sooner when a stop is asked for)."""
        every = self.commit_every
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
            # Records leave the stage as the JSON objects written: the pool, the commit and the
            # caption stage (in this process or another) take plain data.
            return self._process(row, rec, t0).to_dict()
        except RunError:
            raise
        except Exception as exc:  # noqa: BLE001 - no single row may stop a run
            if resource_error(exc) is not None:
                raise resource_stop(self.out, rec, row.index, exc) from None
            return fail(rec, "internal_error", f"{rec.image}: {type(exc).__name__}: {exc}", t0,
                        retryable=transient(exc)).to_dict()

    def _process(self, row: Any, rec: Record, t0: float) -> Record:
        if row.error:
            # The data source's verdict on the row itself (not JSON, no image field...): bad input.
            err = RecordError.from_dict(row.error)
            return fail(rec, err.kind, err.message, t0)
        family = self.family
        source = row.image_path if row.image_path else row.image
        label = str(rec.image)
        try:
            loaded = load_image(source, max_image_pixels=self.max_image_pixels, max_file_bytes=self.max_file_bytes,
                                draft_target=lambda w, h: family.input_size(w, h, source=label))
        except ImageLoadError as exc:
            return fail(rec, exc.kind, exc.message, t0, retryable=transient(exc))
        width, height = loaded.original_size
        rec.image_size = [width, height]
        try:
            parsed = bx.parse_boxes(row.bbox, self.bbox_format, width, height)
        except bx.BoxFormatError as exc:
            return fail(rec, "bad_bbox", f"{rec.image}: {exc}", t0)
        rec.dropped_boxes = [asdict(i) for i in parsed.dropped]
        rec.clipped_boxes = [asdict(i) for i in parsed.clipped]
        rec.type = "with_bbox" if parsed.num_input else "without_bbox"
        try:
            tw, th = family.input_size(width, height, source=label)
        except ImageLoadError as exc:
            return fail(rec, exc.kind, exc.message, t0, retryable=transient(exc))
        rec.input_size = [tw, th]
        image = None
        proposals = None
        if self._proposes(row):
            image = resize_to(loaded.image, (tw, th))
            if self.grounding:  # the engine grounds it in the caption stage, then draws and asks
                return self.ground_later(rec, row, image, parsed, t0)
            proposals = [p.scale(width / tw, height / th) for p in self.proposer.propose(image)]
        return self.rows.finish(rec, row.index, loaded.image, image, parsed.boxes, parsed.num_input,
                                parsed.dropped, proposals, t0)

    def _proposes(self, row: Any) -> bool:
        if self.proposer is None and not self.grounding:
            return False
        from regioncap.propose import should_propose

        return should_propose(row.bbox, self.propose.when)

    def ground_later(self, rec: Record, row: Any, image: Any, parsed: Any, t0: float) -> Record:
        """A row the engine proposes regions for: its clean image at the input size and the grounding request."""
        name = f"{IMAGES_DIR}/{row.index:07d}_ground.{self.strategy.ext}"
        self.rows.save(image, name)
        rec.status = "grounding"
        rec.grounding = RequestSpec(image=name, image_size=list(rec.input_size)).to_dict()
        rec.grounding[GIVEN] = [[i, b.as_list(4)] for i, b in parsed.boxes]
        rec.timing = {f"{self.name}_s": round(time.perf_counter() - t0, 4)}
        return rec

    def base_record(self, row: Any) -> Record:
        """The record of a row before any work: its input fields, id, index and empty results."""
        carried: Dict[str, Any] = {}
        collisions = {}
        for k, v in row.extra.items():
            # A name the record model declares (RECORD_KEYS) is the record's own: kept under ``input``.
            (collisions if k in RECORD_KEYS else carried)[k] = v
        if isinstance(row.image, str):
            image = uri_label(row.image)
        elif row.image_path:
            image = row.image_path
        elif row.image is None or isinstance(row.image, (bool, int, float, list)):
            # No image at all (an invalid line, no image field, a null or a number in it): never
            # "<in-memory image>", which says the row held one, and no image in metrics.json's count.
            image = NO_IMAGE
        else:
            image = IN_MEMORY_IMAGE
        digest = getattr(row, "digest", None)
        return Record(
            input=collisions or ABSENT, id=row.row_id, index=row.index, image=image, image_path=row.image_path,
            type="with_bbox" if row.bbox else "without_bbox", bbox=row.bbox,
            bbox_format=self.bbox_format, result_file=str(self.out),
            image_with_bbox=None, prompt=None, valid_bboxes_num=0,
            normalized_bbox=bx.pad_normalized([], self.max_boxes),
            regions=[], requests=[], dropped_boxes=[], clipped_boxes=[],
            status="pending", error=None,
            digest=digest or ABSENT, line=ABSENT if row.line is None else row.line,
        ).carrying(carried)
