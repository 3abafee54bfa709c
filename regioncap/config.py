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
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """Which model to run and the image budget it is fed."""

    #: Short name used in run names and reports.
    name: str = MISSING
    #: Hub id (``Qwen/Qwen2.5-VL-3B-Instruct``) or a local model folder.
    path: str = MISSING
    #: Model family: decides the resize rule and the grounding format.
    #: One of ``qwen2_5_vl``, ``qwen2_vl``.
    family: str = "qwen2_5_vl"
    #: Hub revision (branch, tag or commit) when ``path`` is a hub id.
    revision: Optional[str] = None
    #: Pixel budget of one image (Qwen2-VL's ``min_pixels`` / ``max_pixels``).
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 1280 * 28 * 28
    #: Vision patch size and spatial merge size (28 px per visual token for Qwen2-VL/2.5-VL).
    patch_size: int = 14
    merge_size: int = 2
    #: Context length given to the engine; requests that cannot fit are error rows.
    max_model_len: int = 8192
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
class EngineConfig:
    """Fields shared by every engine."""

    #: ``transformers``, ``vllm``, ``openai``, ``auto`` or ``fake`` (tests).
    name: str = MISSING
    #: Requests handed to the engine at once (a vLLM ``generate`` call, a
    #: transformers batch, the in-flight window of the OpenAI client).
    batch_size: int = 8
    #: Run the caption stage in a spawned child process, so the engine's
    #: memory is freed when the stage ends. null: yes for vLLM in a multirun.
    isolate: Optional[bool] = None


@dataclass
class TransformersEngineConfig(EngineConfig):
    name: str = "transformers"
    #: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
    device: str = "auto"
    #: Attention implementation passed to ``from_pretrained`` (``sdpa``, ``eager``...).
    attn_implementation: Optional[str] = None
    #: Constrain ``lines`` answers to one ``<number>: <text>`` line per region
    #: (a logits processor; the same layout vLLM enforces with structured outputs).
    structured_outputs: bool = True


@dataclass
class VllmEngineConfig(EngineConfig):
    name: str = "vllm"
    batch_size: int = 256
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    #: Skip CUDA graphs / torch.compile (slower decode, much faster start).
    enforce_eager: bool = False
    #: Constrain the answer to the prompt's format with vLLM structured outputs.
    structured_outputs: bool = True
    #: Extra keyword arguments for ``vllm.LLM`` (anything its signature takes).
    extra_args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OpenAIEngineConfig(EngineConfig):
    name: str = "openai"
    batch_size: int = 64
    base_url: str = "http://127.0.0.1:8000/v1"
    #: Name of the environment variable holding the API key (the key itself is
    #: never part of the config, so it never reaches an output file).
    api_key_env: str = "OPENAI_API_KEY"
    #: Model name sent to the server; defaults to ``model.path``.
    served_model: Optional[str] = None
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    #: Send vLLM's structured-output constraint in ``extra_body`` (vLLM servers only).
    structured_outputs: bool = False


@dataclass
class AutoEngineConfig(VllmEngineConfig, TransformersEngineConfig):
    """vLLM where CUDA and vLLM are available, else transformers: the fields of both."""

    name: str = "auto"
    batch_size: int = 8


@dataclass
class FakeEngineConfig(EngineConfig):
    """Deterministic engine for fast tests of the pipeline logic (no model)."""

    name: str = "fake"
    #: Region numbers (1-based, within a request) the fake leaves unanswered.
    skip_regions: List[int] = field(default_factory=list)
    #: Answer ``skip_regions`` when asked again (exercises the re-ask path).
    answer_on_reask: bool = True
    #: Request keys (substring match) that fail with an engine error.
    fail_keys: List[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where rows come from and how their boxes are written."""

    name: str = MISSING
    #: ``jsonl`` (DataFlow-MM format), ``hf`` (Hugging Face ``datasets``), or an
    #: annotation file: ``coco`` (instances JSON), ``vg`` (Visual Genome region
    #: descriptions JSON), ``refcoco`` (RefCOCO-style refs as JSON/JSONL); see docs/formats.md.
    source: str = "jsonl"
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
    bbox_format: str = "xywh"
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


@dataclass
class DrawConfig:
    """How regions are marked on the image the model sees."""

    name: str = MISSING
    #: Box colours, cycled per region (any Pillow colour string).
    palette: List[str] = field(
        default_factory=lambda: [
            "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
            "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990",
        ]
    )
    #: Line width as a fraction of the image's shorter side (at least ``min_line_px``).
    line_width: float = 0.008
    min_line_px: int = 2
    #: Label text height as a fraction of the shorter side (at least ``min_label_px``).
    label_size: float = 0.045
    min_label_px: int = 10
    #: Label text: ``{n}`` is the region number shown to the model.
    label_format: str = "{n}"
    #: Darken the image outside the boxes by this factor (0 = off, DataFlow-MM look ~0.5).
    dim: float = 0.0
    #: Encoding of written images: ``jpeg`` or ``png``.
    image_format: str = "jpeg"
    jpeg_quality: int = 92


@dataclass
class PromptConfig:
    """How regions are put to the model and how answers are read back."""

    name: str = MISSING
    #: ``marked`` (numbered marks, one request per chunk), ``crop`` (one
    #: request per region on a crop) or ``coords`` (box coordinates in text).
    strategy: str = "marked"
    system: Optional[str] = None
    #: User text; placeholders are filled by ``regioncap.prompts``.
    template: str = MISSING
    #: ``lines`` (``1: ...``), ``json`` or ``free`` (DataFlow-MM's free text).
    answer_format: str = "lines"
    #: Context margin around a crop, as a fraction of the box size.
    crop_margin: float = 0.15
    #: Re-ask once for regions missing from an answer.
    reask_missing: bool = True
    #: Text of the one follow-up request for regions missing from an answer.
    reask_template: str = (
        "The image has numbered boxes drawn on it. Describe only the boxes "
        "labelled {labels}, each in one short sentence. {format_instruction}"
    )


@dataclass
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    #: Per-request sampling seed; ``null`` uses the run's ``seed``.
    seed: Optional[int] = None


@dataclass
class LoggerConfig:
    """Experiment logging; ``none`` logs to the run dir only."""

    name: str = "none"


@dataclass
class WandbLoggerConfig(LoggerConfig):
    """Weights & Biases: one W&B run per Hydra job, inside the run dir."""

    name: str = "wandb"
    project: str = "regioncap"
    entity: Optional[str] = None
    #: ``online``, ``offline`` or ``disabled``; null: ``$WANDB_MODE`` if set, else
    #: online when an API key is configured, else offline.
    mode: Optional[str] = None
    #: W&B group; null: the sweep dir's name in a multirun, none in a single run.
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    #: Marked images logged with native box overlays (0 = none).
    log_images: int = 8
    #: A table of every region (image, box, caption, reference, scores), capped at ``table_rows``.
    log_table: bool = True
    table_rows: int = 2000
    #: The caption records as a W&B artifact.
    log_artifact: bool = True
    #: Seconds to wait for W&B to start before going on without it.
    init_timeout_s: float = 60.0
    #: Most seconds ``finish`` waits for uploads (online); what is left stays on disk
    #: for ``wandb sync``. null waits until everything is uploaded.
    finish_timeout_s: Optional[float] = 600.0


@dataclass
class ExecutorConfig:
    """Where the caption stage runs: ``local`` (this process, or one spawned child)."""

    #: ``local`` or ``ray``.
    name: str = "local"


@dataclass
class RayExecutorConfig(ExecutorConfig):
    """The caption stage over a Ray cluster: a pool of engine replicas (Ray Data actors).

    Needs the ``ray`` extra (``pip install "regioncap[ray]"``); Ray is imported
    only when this executor is picked. Every replica must see the run dir and
    the model folder at the same paths (one machine, or a shared filesystem).
    """

    name: str = "ray"
    #: Cluster to join: ``auto`` (a running ``ray start`` cluster), ``ray://host:10001``;
    #: null starts a local cluster for the run and stops it at the end.
    address: Optional[str] = None
    #: Engine replicas (Ray actors), each with its own copy of the model.
    num_replicas: int = 1
    #: CPUs and GPUs Ray reserves for each replica (``num_gpus=1``: one GPU per replica).
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: Rows handed to a replica at once (a replica splits them into ``engine.batch_size`` engine calls).
    batch_size: int = 64
    #: A local cluster only (``address: null``): CPUs and GPUs it may use (null: all
    #: of the machine) and the size of its object store in MiB (null: Ray's default).
    local_num_cpus: Optional[int] = None
    local_num_gpus: Optional[int] = None
    object_store_mb: Optional[int] = None
    #: Extra keyword arguments for ``ray.init`` (``runtime_env``, ``namespace``...).
    init_args: Dict[str, Any] = field(default_factory=dict)
    #: Extra Ray options for each replica actor (``max_restarts``, ``resources``, ``memory``...).
    remote_args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LimitsConfig:
    """Bounds on what one input can cost (a bad file never hangs or exhausts a run)."""

    max_image_pixels: int = 100_000_000
    max_file_bytes: int = 200 * 1024 * 1024


@dataclass
class RegionCapConfig:
    model: ModelConfig = MISSING
    engine: EngineConfig = MISSING
    data: DataConfig = MISSING
    draw: DrawConfig = MISSING
    prompt: PromptConfig = MISSING
    logger: LoggerConfig = MISSING
    executor: ExecutorConfig = MISSING
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    #: Most regions marked on one image; more are split into further chunks.
    max_boxes: int = 10
    seed: int = 0
    #: Stages to run, in order: ``visualize``, ``caption``.
    stages: List[str] = field(default_factory=lambda: ["visualize", "caption"])
    #: Exit non-zero when more than this fraction of rows are error rows.
    max_error_rate: float = 0.1
    #: Where everything of the run is written (Hydra's run dir by default).
    output_dir: str = "${hydra:runtime.output_dir}"
    progress: bool = True
    #: Metric the job returns to Hydra (a key of metrics.json, for sweepers
    #: such as Optuna); null returns the whole metrics dict.
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
    commit_every: int = 32
    #: Image preparation worker processes (decode, resize, draw, encode).
    #: null: the cores the engine does not use (see regioncap.prepare.resolve_workers);
    #: 0: prepare in the main process.
    workers: Optional[int] = None
    #: With both stages in one process: caption rows while the next ones are
    #: prepared (needs workers >= 1); false runs the stages one after the other.
    overlap: bool = True


ENGINE_SCHEMAS = {
    "transformers": TransformersEngineConfig,
    "vllm": VllmEngineConfig,
    "openai": OpenAIEngineConfig,
    "auto": AutoEngineConfig,
    "fake": FakeEngineConfig,
}


def register_configs() -> None:
    """Register the schemas under ``schema/<group>``; each option's YAML starts
    from one (``- /schema/model/base@_here_``), so its keys and types are checked
    while Hydra composes, and ``--help`` lists them apart from the options."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="regioncap_schema", node=RegionCapConfig)
    cs.store(group="schema/model", name="base", node=ModelConfig)
    for name, node in ENGINE_SCHEMAS.items():
        cs.store(group="schema/engine", name=name, node=node)
    cs.store(group="schema/data", name="base", node=DataConfig)
    cs.store(group="schema/draw", name="base", node=DrawConfig)
    cs.store(group="schema/prompt", name="base", node=PromptConfig)
    cs.store(group="schema/logger", name="none", node=LoggerConfig)
    cs.store(group="schema/logger", name="wandb", node=WandbLoggerConfig)
    cs.store(group="schema/executor", name="local", node=ExecutorConfig)
    cs.store(group="schema/executor", name="ray", node=RayExecutorConfig)
