"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option in ``conf/<group>/`` lists its schema first in its defaults
list (``- /schema/draw/base@_here_``, ``- /schema/model/qwen25vl_3b@_here_``, see ``register_configs``), so a misspelt key
or a value of the wrong type (``max_boxes=ten``) fails while Hydra composes the
config, before anything is built.

This module imports only the standard library, OmegaConf, Hydra's ConfigStore
``regioncap.engines.base`` and ``regioncap.families.base`` (standard library and OmegaConf only): building the config
must stay cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING

from regioncap.choice import Choice

from regioncap.components import SEEDS, Rule, check, formats, optional, real, whole
from regioncap.densecap import METEOR_TIMEOUT_S
from regioncap.intervals import DEFAULT_RESAMPLES
# The sampling section's schema is the engines' own Sampling: one set of defaults for both.
from regioncap.engines.base import Sampling
from regioncap.stages import STAGE_NAMES
from regioncap.families.base import Family


class AnswerFormat(Choice):
    """``prompt.answer_format``."""

    lines = "lines"
    json = "json"
    free = "free"


@dataclass
class BeforeFamilies(Family.Config):
    """``schema/model/base``: the ``model`` schema of options written before ``model`` named its class
    (``family: qwen2_vl``, no ``_target_``). Such an option still composes; the run maps ``family`` to its
    class with a deprecation warning (:meth:`regioncap.families.base.Family.upgraded`)."""

    #: Deprecated: ``qwen2_5_vl`` or ``qwen2_vl``; name the class with ``_target_`` instead.
    family: Optional[str] = None


#: The default ``draw.palette``: ten colours that stay distinct from each other (Sasha Trubetskoy's
#: list). The one copy: :class:`regioncap.draw.DrawStyle` and the report read it from here.
DEFAULT_PALETTE: tuple = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990",
)


def _colours() -> Rule:
    """At least one colour, each one Pillow reads (what :func:`regioncap.draw.draw_marks` fills with)."""
    def ok(v: Any) -> bool:
        from PIL import ImageColor  # at check time only: composing a config imports no Pillow

        try:
            return len(v) > 0 and all(isinstance(c, str) and ImageColor.getrgb(c) for c in v)
        except (TypeError, ValueError):
            return False

    return ok, "a list of at least one colour Pillow reads ('#e6194b', 'rgb(230,25,75)', 'red')"


def _image_formats() -> Rule:
    """An encoding :func:`regioncap.images.encode_image` writes (it holds the list)."""
    def ok(v: Any) -> bool:
        from regioncap.images import save_format  # at check time only (Pillow)

        try:
            save_format(v, 92)
        except (TypeError, ValueError, AttributeError):
            return False
        return True

    return ok, "'jpeg' or 'png'"


@dataclass
class DrawConfig:
    """How regions are marked on the image the model sees."""

    name: str = MISSING
    #: Box colours, cycled per region (any Pillow colour string).
    palette: List[str] = field(default_factory=lambda: list(DEFAULT_PALETTE), metadata=check(_colours()))
    #: Line width as a fraction of the image's shorter side (at least ``min_line_px``); wider than
    #: half of it, an outline only fills boxes slower.
    line_width: float = field(default=0.008, metadata=check(real(0, 0.5, above=True)))
    #: The pixel floors are bounded so a typo (100000) cannot stall the drawing of every image.
    min_line_px: int = field(default=2, metadata=check(whole(1, 1000)))
    #: Label text height as a fraction of the shorter side (at least ``min_label_px``).
    label_size: float = field(default=0.045, metadata=check(real(0, 1, above=True)))
    min_label_px: int = field(default=10, metadata=check(whole(1, 1000)))
    #: Label text: ``{n}`` is the region number shown to the model.
    label_format: str = field(default="{n}", metadata=check(formats({"n": 1})))
    #: Darken the image outside the boxes by this factor (0 = off, DataFlow-MM look ~0.5).
    dim: float = field(default=0.0, metadata=check(real(0, 1)))
    #: Encoding of written images: ``jpeg`` or ``png``.
    image_format: str = field(default="jpeg", metadata=check(_image_formats()))
    jpeg_quality: int = field(default=92, metadata=check(whole(1, 100)))


@dataclass
class LimitsConfig:
    """Bounds on what one input can cost (a bad file never hangs or exhausts a run)."""

    #: Pixels of the largest image decoded (width x height, from the header). It replaces Pillow's
    #: own decompression-bomb limit (about 179 million pixels), so raising it past that takes effect.
    max_image_pixels: int = field(default=100_000_000, metadata=check(whole(1)))
    max_file_bytes: int = field(default=200 * 1024 * 1024, metadata=check(whole(1)))


@dataclass
class MetricsConfig:
    """Reference scorers that cost more than a pass over the records run only when asked."""

    #: METEOR (pycocoevalcap's jar: starts a JVM, about 10-15 s per run and per sweep job).
    #: BLEU-4, ROUGE-L, CIDEr, exact match and attribute accuracy are always computed.
    meteor: bool = False
    #: Most seconds METEOR may take before its Java process is killed.
    meteor_timeout_s: float = field(default=METEOR_TIMEOUT_S, metadata=check(real(0, above=True)))
    #: Resamples of the cluster bootstrap behind the 95% intervals of the reference scores
    #: (``references.intervals``; seeded with the run's ``seed``); 0 leaves the intervals out.
    bootstrap_resamples: int = field(default=DEFAULT_RESAMPLES, metadata=check(whole(0)))
    #: DenseCap mAP (IoU x METEOR thresholds, regioncap.densecap) where truth boxes and
    #: references are known: proposal runs with ``propose.when=always``, and given-box runs
    #: (an upper bound that measures the captions). Runs METEOR in a JVM of its own, once
    #: for every prediction that can be a true positive; measured on a shared 2-core machine
    #: (load 6-10): 16-41 s for 1-25 predictions (the JVM's start), 33-38 s for 1,000,
    #: 45-64 s for 10,000 (2-4 ms a prediction after the start).
    densecap: bool = False


@dataclass
class RegionCapConfig:
    #: Component groups: each option names its class with ``_target_`` and is typed by the class's
    #: ``Config`` (regioncap.components), so any class, a user's own too, can be named; ``model``'s
    #: class is its family (regioncap.families).
    model: Any = MISSING
    engine: Any = MISSING
    data: Any = MISSING
    draw: DrawConfig = MISSING
    prompt: Any = MISSING
    logger: Any = MISSING
    executor: Any = MISSING
    propose: Any = MISSING
    sampling: Sampling = field(default_factory=Sampling)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: Most regions marked on one image; more are split into further chunks. At most 1000: every row's
    #: ``normalized_bbox`` is padded to it (DataFlow-MM's layout), so a huge value exhausted the memory.
    max_boxes: int = field(default=10, metadata=check(whole(1, 1000)))
    #: Seeds Python, NumPy and torch before anything is built, and every request.
    seed: int = field(default=0, metadata=check(SEEDS))
    #: Stages to run, in order: ``visualize``, ``caption`` (:data:`regioncap.stages.STAGES`).
    stages: List[str] = field(default_factory=lambda: list(STAGE_NAMES))
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
    #: With ``resume``: redo the error rows that may pass another time (``error.retryable``: engine
    #: errors, timeouts, failed reads...).
    retry_errors: bool = False
    #: Visualize rows written per commit (write + fsync); a crash loses at most these.
    commit_every: int = field(default=32, metadata=check(whole(1)))
    #: Image preparation worker processes (decode, resize, draw, encode).
    #: null: the cores the engine does not use (see regioncap.prepare.resolve_workers);
    #: 0: prepare in the main process.
    workers: Optional[int] = None
    #: CPU threads of the engine (torch's pools; vLLM CPU's OpenMP threads). null: the CPUs this
    #: process may use (affinity mask, cgroup quota, SLURM_CPUS_PER_TASK: the smallest) minus the
    #: preparation workers running beside the engine, at least 1 (see regioncap.cpus).
    threads: Optional[int] = field(default=None, metadata=check(optional(whole(1))))
    #: With both stages in one process: caption rows while the next ones are
    #: prepared (needs workers >= 1); false runs the stages one after the other.
    overlap: bool = True
    #: Print the composed config as a tree (rich; secrets masked) when the job starts.
    print_config: bool = False


def config_to_dict(cfg: Any) -> Tuple[Dict[str, Any], bool]:
    """The config (a ``DictConfig``, a typed :class:`RegionCapConfig` or a dict) as plain data, resolved
    when possible; the flag says whether it is resolved (Hydra's own files, the secrets masked in them)."""
    from omegaconf import OmegaConf

    from regioncap.components import plain

    if not OmegaConf.is_config(cfg):
        return json.loads(json.dumps(plain(cfg), default=str)), True
    try:
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), True
    except Exception:  # an interpolation that cannot resolve here (${hydra:...} outside a job)
        return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True), False


def show_value(value: Any) -> str:
    """``value`` as a user types it on the command line (``null``, ``false``, ``[a,b]``)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


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
    # --help shows each option with its value in the composed config (conf/hydra/help/regioncap.yaml),
    # so the schema stays the one place a default is written.
    OmegaConf.register_new_resolver("show", show_value, replace=True)
    OmegaConf.register_new_resolver("opt", lambda name, value: f"{name}={show_value(value)}".ljust(21),
                                    replace=True)
    cs = ConfigStore.instance()
    cs.store(name="regioncap_schema", node=RegionCapConfig)
    cs.store(group="schema/model", name="base", node=BeforeFamilies)
    cs.store(group="schema/draw", name="base", node=DrawConfig)
    # propose=none names no class: its node is the settings every proposer has.
    from regioncap.propose.base import Proposer

    cs.store(group="schema/propose", name="none", node=Proposer.Config)
    register_schemas(Path(__file__).resolve().parent / "conf", cs)
    _REGISTERED = True


_REGISTERED = False
