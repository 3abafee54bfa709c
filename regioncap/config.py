"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option in ``conf/<group>/`` lists its schema first in its defaults
list (``- /schema/model/base@_here_``, see ``register_configs``), so a misspelt key
or a value of the wrong type (``max_boxes=ten``) fails while Hydra composes the
config, before anything is built.

This module imports only the standard library, OmegaConf and Hydra's
ConfigStore: building the config must stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from regioncap.components import check, optional, real, whole


class Choice(str, Enum):
    """A closed choice of a config field: Hydra rejects any other value while composing.

    A ``str`` whose value is its name, so code compares it with plain strings
    (``cfg.prompt.answer_format == "free"``) and it prints and serialises as the string.
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class AnswerFormat(Choice):
    """``prompt.answer_format``."""

    lines = "lines"
    json = "json"
    free = "free"


class BboxFormat(Choice):
    """``data.bbox_format``: see :data:`regioncap.boxes.BBOX_FORMATS`."""

    xywh = "xywh"
    xyxy = "xyxy"
    cxcywh = "cxcywh"
    xywh_norm = "xywh_norm"
    xyxy_norm = "xyxy_norm"
    cxcywh_norm = "cxcywh_norm"
    qwen1000 = "qwen1000"


class ModelFamily(Choice):
    """``model.family``: decides the resize rule and the grounding format."""

    qwen2_5_vl = "qwen2_5_vl"
    qwen2_vl = "qwen2_vl"


class DataSource(Choice):
    """``data.source``: the readers of :mod:`regioncap.data`."""

    jsonl = "jsonl"
    hf = "hf"
    coco = "coco"
    vg = "vg"
    refcoco = "refcoco"


@dataclass
class ModelConfig:
    """Which model to run and the image budget it is fed."""

    #: Short name used in run names and reports.
    name: str = MISSING
    #: Hub id (``Qwen/Qwen2.5-VL-3B-Instruct``) or a local model folder.
    path: str = MISSING
    #: Model family: decides the resize rule and the grounding format.
    #: One of ``qwen2_5_vl``, ``qwen2_vl``.
    family: ModelFamily = ModelFamily.qwen2_5_vl
    #: Hub revision (branch, tag or commit) when ``path`` is a hub id.
    revision: Optional[str] = None
    #: Pixel budget of one image (Qwen2-VL's ``min_pixels`` / ``max_pixels``).
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
    #: (``tiny``: the offline Qwen2.5-VL built by ``regioncap.tiny``).
    builder: Optional[str] = None
    #: ``real``: load the trained weights. ``random``: the real architecture with
    #: random weights and no weights file (vLLM ``load_format="dummy"``,
    #: transformers from the config): for throughput, memory and token-budget
    #: checks; captions are noise and every output says so.
    weights: str = "real"


@dataclass
class DataConfig:
    """Where rows come from and how their boxes are written."""

    name: str = MISSING
    #: ``jsonl`` (DataFlow-MM format), ``hf`` (Hugging Face ``datasets``), or an
    #: annotation file: ``coco`` (instances JSON), ``vg`` (Visual Genome region
    #: descriptions JSON), ``refcoco`` (RefCOCO-style refs as JSON/JSONL); see docs/formats.md.
    source: DataSource = DataSource.jsonl
    #: JSONL file; a ``datasets`` name, data dir, saved dataset or data file.
    #: ``pkg://regioncap/...`` points inside the installed package.
    path: Optional[str] = None
    #: ``datasets`` only: builder name for local files (``json``, ``parquet``,
    #: ``imagefolder``...), config name, split, and extra ``load_dataset`` kwargs.
    hf_builder: Optional[str] = None
    hf_config: Optional[str] = None
    split: str = "train"
    hf_kwargs: Dict[str, Any] = field(default_factory=dict)
    #: Image and box columns/fields; for ``hf`` a dotted path reads a nested field
    #: (``objects.bbox`` in Hugging Face detection datasets).
    image_key: str = "image"
    bbox_key: str = "bbox"
    #: Field holding a stable row id; rows without it get ``row-<position>``.
    id_key: Optional[str] = "id"
    #: Field holding reference captions, one entry per box in ``bbox`` order
    #: (a string or a list of strings each); rows without it are not scored.
    references_key: Optional[str] = "references"
    #: ``xywh`` (DataFlow-MM), ``xyxy``, ``cxcywh``, ``xywh_norm``,
    #: ``xyxy_norm``, ``cxcywh_norm``, ``qwen1000`` (Qwen2-VL's 0-1000 grid).
    bbox_format: BboxFormat = BboxFormat.xywh
    #: Read at most this many rows (after ``skip``).
    limit: Optional[int] = None
    skip: int = 0
    #: Split the run into ``num_shards`` runs: shard ``shard_index`` reads the rows
    #: (after ``skip``/``limit``) whose index is ``shard_index`` modulo ``num_shards``.
    #: ``python -m regioncap.merge`` joins the shards' records.
    num_shards: int = 1
    shard_index: int = 0
    #: ``coco``/``vg``/``refcoco``: folder holding the images their file names (or,
    #: for ``vg``, ``<image_id>.jpg``) resolve against; relative to the annotation
    #: file's folder; unset: that folder itself.
    images_dir: Optional[str] = None
    #: ``coco``: ``keep`` crowd annotations (``iscrowd: 1``, a box around a group) as
    #: regions, or ``skip`` them (their ids listed in the row's ``crowd_annotation_ids``).
    coco_iscrowd: str = "keep"
    #: ``refcoco``: read only the refs whose ``split`` field is this (``train``,
    #: ``val``, ``testA``...); unset: every ref.
    ref_split: Optional[str] = None
    #: ``hf``: column holding one reference (or a list of them) per box, copied to
    #: ``references_key``; a dotted path reads a nested field (``objects.category``);
    #: class-label ids become their names.
    hf_references_key: Optional[str] = None


#: The default ``draw.palette``: ten colours that stay distinct from each other (Sasha Trubetskoy's
#: list). The one copy: :class:`regioncap.draw.DrawStyle` and the report read it from here.
DEFAULT_PALETTE: tuple = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990",
)


@dataclass
class DrawConfig:
    """How regions are marked on the image the model sees."""

    name: str = MISSING
    #: Box colours, cycled per region (any Pillow colour string).
    palette: List[str] = field(default_factory=lambda: list(DEFAULT_PALETTE))
    #: Line width as a fraction of the image's shorter side (at least ``min_line_px``).
    line_width: float = field(default=0.008, metadata=check(real(0, above=True)))
    min_line_px: int = field(default=2, metadata=check(whole(1)))
    #: Label text height as a fraction of the shorter side (at least ``min_label_px``).
    label_size: float = field(default=0.045, metadata=check(real(0, above=True)))
    min_label_px: int = field(default=10, metadata=check(whole(1)))
    #: Label text: ``{n}`` is the region number shown to the model.
    label_format: str = "{n}"
    #: Darken the image outside the boxes by this factor (0 = off, DataFlow-MM look ~0.5).
    dim: float = field(default=0.0, metadata=check(real(0, 1)))
    #: Encoding of written images: ``jpeg`` or ``png``.
    image_format: str = "jpeg"
    jpeg_quality: int = field(default=92, metadata=check(whole(1, 100)))


@dataclass
class SamplingConfig:
    temperature: float = field(default=0.0, metadata=check(real(0)))
    top_p: float = field(default=1.0, metadata=check(real(0, 1, above=True)))
    max_tokens: int = field(default=512, metadata=check(whole(1)))
    #: Per-request sampling seed; ``null`` uses the run's ``seed``.
    seed: Optional[int] = None


class ProposeMethod(Choice):
    """``propose.method``: :data:`regioncap.propose.PROPOSERS` plus ``none``."""

    none = "none"
    contours = "contours"
    vlm = "vlm"


class ProposeWhen(Choice):
    """Which rows get region proposals (``propose.when``)."""

    #: Rows whose box field is absent or null (DataFlow-MM's rule); ``[]`` stays no regions.
    missing = "missing"
    #: Every row; given boxes are ignored (with them as ground truth for proposal quality).
    always = "always"
    #: Every row: its given boxes plus proposals that overlap none of them above ``add_iou``.
    add = "add"


class NmsMetric(Choice):
    """Overlap measure of an NMS: IoU, or intersection over the smaller box (DataFlow-MM's contours)."""

    iou = "iou"
    iomin = "iomin"


class GroundingConstraint(Choice):
    """How a ``vlm`` grounding answer is constrained (``propose.constraint``)."""

    regex = "regex"
    json = "json"
    none = "none"


@dataclass
class ProposeConfig:
    """Region proposals for rows without boxes (``propose=none|contours|vlm``)."""

    name: str = MISSING
    #: Proposer (a key of ``regioncap.propose.PROPOSERS``), or ``none``.
    method: ProposeMethod = ProposeMethod.none
    when: ProposeWhen = ProposeWhen.missing
    #: ``when=add``: a proposal overlapping a given box above this IoU is dropped.
    add_iou: float = field(default=0.5, metadata=check(real(0, 1)))
    #: Most proposals kept per image, best first (the rest are counted and recorded); null: all.
    #: Kept proposals are chunked by ``max_boxes`` like given boxes, never dropped.
    max_regions: Optional[int] = field(default=20, metadata=check(optional(whole(1))))


@dataclass
class ContoursSettings:
    """DataFlow-MM's contour heuristic; the defaults are its published values.

    Sizes are pixels of the image at the model's input resolution. The one
    list of its knobs: the config schema below and the proposer's own
    ``regioncap.propose.contours.ContoursParams`` both take them from here.
    """

    #: Gaussian blur kernel (odd; 0 or 1: none).
    blur_kernel: int = 5
    #: Adaptive Gaussian threshold: block side (odd) and constant C.
    block_size: int = 11
    threshold_c: float = 2.0
    #: Morphological closing kernel side (0: none).
    close_kernel: int = 8
    #: Contour area as a fraction of the image.
    min_area_ratio: float = 0.01
    max_area_ratio: float = 0.8
    #: Box aspect ratio w / h.
    min_aspect: float = 0.1
    max_aspect: float = 5.0
    #: Boxes wider or taller than this fraction of the image are dropped.
    max_side_ratio: float = 0.9
    #: NMS over the boxes, largest first: drop a box whose overlap with a larger kept box is above
    #: this; ``iomin`` (intersection over the smaller box, DataFlow-MM's) or ``iou``.
    nms_threshold: float = 0.3
    nms_metric: NmsMetric = NmsMetric.iomin


@dataclass
class ContoursProposeConfig(ContoursSettings, ProposeConfig):
    """``propose=contours``: :class:`ContoursSettings` on top of the common proposal settings."""

    method: ProposeMethod = ProposeMethod.contours


@dataclass
class VlmProposeConfig(ProposeConfig):
    """The caption model grounds the objects first (Qwen2.5-VL JSON boxes / Qwen2-VL box tokens)."""

    method: ProposeMethod = ProposeMethod.vlm
    #: Grounding request text; null: the model family's (regioncap.propose.vlm.grounding_prompt).
    prompt: Optional[str] = None
    #: Token budget of the grounding answer.
    max_tokens: int = field(default=1024, metadata=check(whole(1)))
    #: How engines with structured outputs constrain the answer: ``regex`` (one compact
    #: JSON layout, no free whitespace), ``json`` (the JSON schema) or ``none``.
    constraint: GroundingConstraint = GroundingConstraint.regex
    #: Most boxes kept from one answer, in answer order after dropping repeats (also the
    #: JSON schema's ``maxItems`` with ``constraint=json``); bounds the work on a hostile answer.
    max_items: int = field(default=50, metadata=check(whole(1)))
    #: Repeated boxes in one answer: NMS at this IoU, answer order kept.
    nms_threshold: float = 0.7
    #: Boxes with a side under this many pixels (model input) after clipping are dropped.
    min_size: float = 1.0


@dataclass
class LimitsConfig:
    """Bounds on what one input can cost (a bad file never hangs or exhausts a run)."""

    max_image_pixels: int = field(default=100_000_000, metadata=check(whole(1)))
    max_file_bytes: int = field(default=200 * 1024 * 1024, metadata=check(whole(1)))


@dataclass
class MetricsConfig:
    """Reference scorers that cost more than a pass over the records run only when asked."""

    #: METEOR (pycocoevalcap's jar: starts a JVM, about 10-15 s per run and per sweep job).
    #: BLEU-4, ROUGE-L, CIDEr, exact match and attribute accuracy are always computed.
    meteor: bool = False
    #: Most seconds METEOR may take before its Java process is killed.
    meteor_timeout_s: float = field(default=300.0, metadata=check(real(0, above=True)))
    #: Resamples of the cluster bootstrap behind the 95% intervals of the reference scores
    #: (``references.intervals``; seeded with the run's ``seed``); 0 leaves the intervals out.
    bootstrap_resamples: int = 1000
    #: DenseCap mAP (IoU x METEOR thresholds, regioncap.densecap) where truth boxes and
    #: references are known: proposal runs with ``propose.when=always``, and given-box runs
    #: (an upper bound that measures the captions). Runs METEOR in a JVM of its own, once
    #: for every prediction that can be a true positive; measured on a shared 2-core machine
    #: (load 6-10): 16-41 s for 1-25 predictions (the JVM's start), 33-38 s for 1,000,
    #: 45-64 s for 10,000 (2-4 ms a prediction after the start).
    densecap: bool = False


@dataclass
class RegionCapConfig:
    model: ModelConfig = MISSING
    #: Component groups (engine, prompt, logger, executor): each option names its class with
    #: ``_target_`` and is typed by the class's ``Config`` (regioncap.components), so any class,
    #: a user's own too, can be named.
    engine: Any = MISSING
    data: DataConfig = MISSING
    draw: DrawConfig = MISSING
    prompt: Any = MISSING
    logger: Any = MISSING
    executor: Any = MISSING
    propose: ProposeConfig = MISSING
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: Most regions marked on one image; more are split into further chunks.
    max_boxes: int = field(default=10, metadata=check(whole(1)))
    seed: int = 0
    #: Stages to run, in order: ``visualize``, ``caption``.
    stages: List[str] = field(default_factory=lambda: ["visualize", "caption"])
    #: Exit non-zero when more than this fraction of rows are error rows.
    max_error_rate: float = field(default=0.1, metadata=check(real(0, 1)))
    #: More key names whose values are secrets (names or ``fnmatch`` patterns such as ``*_dsn``),
    #: masked like the built-in ones (``*_key``, ``*token*``, ``*password*``...) everywhere a run writes.
    secret_names: List[str] = field(default_factory=list)
    #: Where everything of the run is written (Hydra's run dir by default).
    output_dir: str = "${hydra:runtime.output_dir}"
    progress: bool = True
    #: Metric the job returns to Hydra (for sweepers such as Optuna): a dotted path
    #: of a number in metrics.json (``regions_per_s``, ``references.exact_match``,
    #: ``stages.caption.regions_per_s``), checked before the job starts; null
    #: returns the whole metrics dict.
    objective: Optional[str] = None
    #: Go on with the run in ``hydra.run.dir``: rows already in a stage's file
    #: are skipped (see docs/reliability.md). Without it, a run dir that holds
    #: outputs is refused rather than overwritten.
    resume: bool = False
    #: Resume even though the settings that decide the answers changed (``run_key.json``).
    resume_force: bool = False
    #: With ``resume``: redo the caption stage's error rows (engine errors, timeouts...).
    retry_errors: bool = False
    #: Visualize rows written per commit (write + fsync); a crash loses at most these.
    commit_every: int = field(default=32, metadata=check(whole(1)))
    #: Image preparation worker processes (decode, resize, draw, encode).
    #: null: the cores the engine does not use (see regioncap.prepare.resolve_workers);
    #: 0: prepare in the main process.
    workers: Optional[int] = None
    #: With both stages in one process: caption rows while the next ones are
    #: prepared (needs workers >= 1); false runs the stages one after the other.
    overlap: bool = True


PROPOSE_SCHEMAS = {
    "none": ProposeConfig,
    "contours": ContoursProposeConfig,
    "vlm": VlmProposeConfig,
}


def register_configs() -> None:
    """Register the schemas under ``schema/<group>``; each option's YAML starts
    from one (``- /schema/model/base@_here_``), so its keys and types are checked
    while Hydra composes, and ``--help`` lists them apart from the options.

    The options that name a class (``_target_``) start from their class's
    ``Config``, registered as ``schema/<group>/<option>`` by
    :func:`regioncap.components.register_schemas`. Once per process.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    import os
    from pathlib import Path

    from regioncap.components import register_schemas

    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    # ${pid:} in the default run and sweep dirs: unique for runs started in the same second.
    OmegaConf.register_new_resolver("pid", lambda: os.getpid(), replace=True)
    cs = ConfigStore.instance()
    cs.store(name="regioncap_schema", node=RegionCapConfig)
    cs.store(group="schema/model", name="base", node=ModelConfig)
    cs.store(group="schema/data", name="base", node=DataConfig)
    cs.store(group="schema/draw", name="base", node=DrawConfig)
    for name, node in PROPOSE_SCHEMAS.items():
        cs.store(group="schema/propose", name=name, node=node)
    register_schemas(Path(__file__).resolve().parent / "conf", cs)
    _REGISTERED = True


_REGISTERED = False
