"""The real config tree composes for every option of every group, and bad values fail at compose time."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF_DIR, REPO, compose

#: The groups whose options set keys anywhere (``# @package _global_``): composed in their own tests below.
GLOBAL_GROUPS = ("experiment", "hparams_search", "debug")
#: Every config group: each folder of conf/ but the global ones and hydra/ (Hydra's).
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in (*GLOBAL_GROUPS, "hydra"))


def options(group: str):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option in ("jsonl", "hf"):
        overrides.append("data.path=rows.jsonl")
    cfg = compose(overrides, output_dir=tmp_path)
    # Every value resolves (no missing mandatory value, no bad interpolation).
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    from regioncap.components import node_name

    # A component's short name is its option's name; propose=none names no class; the data
    # options name their source (data=demo reads with JsonlSource) and a prompt option its
    # strategy (prompt=dataflow: the marked one); both keep their own name.
    if group == "data":
        assert cfg.data.name == option and node_name(cfg.data) in ("jsonl", "hf", "coco", "vg", "refcoco")
    elif group == "prompt":
        assert cfg.prompt.name == option and node_name(cfg.prompt) in ("marked", "crop", "coords", "region")
    elif group == "model":
        # A model option names its family's class (model=qwen2vl_2b: Qwen2VL) and keeps its own name.
        from regioncap.families.base import shipped_families

        assert cfg.model.name == option and node_name(cfg.model) in shipped_families()
    else:
        assert node_name(cfg[group]) == (None if (group, option) == ("propose", "none") else option)
    from regioncap.settings import check_settings

    check_settings(cfg)  # and every shipped value is in range


def test_the_groups_are_the_folders_of_conf():
    assert {"model", "engine", "data", "draw", "prompt", "logger", "executor", "propose"} <= set(GROUPS)


@pytest.mark.parametrize("field,value", [("model.family", "llava"), ("prompt.answer_format", "grid"),
                                         ("prompt.answer_format", "xml"), ("data.bbox_format", "xy"),
                                         ("propose.nms_metric", "giou"),
                                         ("propose.when", "sometimes")])
def test_closed_choices_fail_at_compose_time(field, value):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose([f"{field}={value}"])


def test_enums_list_exactly_what_the_registries_hold():
    from regioncap import boxes, propose

    names = lambda enum: {m.value for m in enum}  # noqa: E731
    assert names(propose.ProposeWhen) == set(propose.PROPOSE_WHEN)
    assert names(boxes.BboxFormat) == set(boxes.BBOX_FORMATS)


def test_defaults_are_the_offline_run():
    cfg = compose([], pin=False)
    from regioncap.engines import engine_name

    assert (cfg.model.name, engine_name(cfg.engine), cfg.data.name, cfg.prompt.name) == \
        ("shapes", "transformers", "shapes", "marked")
    assert cfg.model.path == "pkg://regioncap/weights/shapes" and cfg.model.builder is None
    assert cfg.max_boxes == 10 and cfg.stages == ["visualize", "caption"]


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["max_boxes=ten"])
    assert "max_boxes" in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize("override", ["model.max_pixel=5", "engine.batchsize=3", "draw.colour=red", "max_box=3"])
def test_misspelt_key_fails(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)):
        compose([override])


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_engine_fields_are_typed_per_engine():
    cfg = compose(["engine=vllm", "engine.tensor_parallel_size=2"])
    assert cfg.engine.tensor_parallel_size == 2
    with pytest.raises(ConfigCompositionException):
        compose(["engine=transformers", "engine.tensor_parallel_size=2"])
    with pytest.raises(ConfigCompositionException):
        compose(["engine=openai", "engine.concurrency=lots"])


def test_model_is_chosen_by_config_not_folder_name():
    cfg = compose(["model=qwen25vl_3b", "model.path=/models/any-folder-name"])
    from regioncap.families.base import family_name

    assert family_name(cfg.model) == "qwen2_5_vl" and cfg.model.path == "/models/any-folder-name"
    assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"]])
def test_help_and_cfg_do_not_import_heavy_libraries(args):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "regioncap", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    heavy = {"torch", "transformers", "vllm", "wandb", "datasets", "cv2"}
    assert not imported & heavy, imported & heavy
    if args == ["--cfg", "job"]:
        assert "max_boxes: 10" in proc.stdout


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GLOBAL_GROUPS for o in options(g)])
def test_every_global_option_composes(override, tmp_path):
    if override.startswith("hparams_search="):
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose([override], output_dir=tmp_path)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    from regioncap.settings import check_settings

    check_settings(cfg)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_smoke_runs(experiment, tmp_path):
    """Each experiment runs end to end on the demo data (engine swapped for the fake)."""
    from regioncap.job import execute

    cfg = compose([f"experiment={experiment}", "engine=fake", "progress=false", "data.limit=2"],
                  output_dir=tmp_path / "run")
    metrics = execute(cfg)
    assert metrics["rows"] == 2 and metrics["error_rows"] == 0


def test_dataflow_experiment_sets_dataflow_settings():
    cfg = compose(["experiment=dataflow_baseline"])
    assert (cfg.prompt.name, cfg.draw.name, cfg.sampling.temperature, cfg.sampling.top_p) == ("dataflow", "dataflow", 0.7, 0.9)


# --------------------------------------------------------------------------- value ranges


@pytest.mark.parametrize("overrides,fragment", [
    (["engine.batch_size=0"], "engine.batch_size must be a whole number >= 1, got 0"),
    (["draw.line_width=0"], "draw.line_width must be a finite number > 0 and <= 0.5, got 0.0"),
    (["draw.dim=nan"], "draw.dim must be a finite number >= 0 and <= 1, got nan"),
    (["draw.jpeg_quality=101"], "draw.jpeg_quality must be a whole number in 1..100, got 101"),
    (["model.max_pixels=10"], "model.max_pixels (10) is under model.min_pixels (3136)"),
    (["sampling.top_p=0"], "sampling.top_p must be a finite number > 0 and <= 1, got 0.0"),
    (["sampling.max_tokens=-1"], "sampling.max_tokens must be a whole number >= 1, got -1"),
    (["max_error_rate=1.5"], "max_error_rate must be a finite number >= 0 and <= 1, got 1.5"),
    (["propose=vlm", "propose.add_iou=-0.1"], "propose.add_iou must be a finite number >= 0 and <= 1"),
    (["engine=openai", "engine.concurrency=0"], "engine.concurrency must be a whole number >= 1, got 0"),
    (["engine=vllm", "engine.gpu_memory_utilization=1.5"], "engine.gpu_memory_utilization must be"),
    # A template the stage could not format failed every row (internal_error): refused up front.
    (["prompt.template='describe {nope}'"], "prompt.template must be a text whose placeholders are among {n}"),
    # A negative seed ran the whole job, then failed in the bootstrap intervals with a traceback.
    (["seed=-5"], "seed must be a whole number in 0..9223372036854775807, got -5"),
    # It read the input, ran nothing and said "no input rows were read".
    (["stages=[]"], "stages=[] runs nothing; name one or more of 'visualize', 'caption'"),
])
def test_a_setting_outside_its_range_stops_the_run_before_it_reads_or_writes(tmp_path, overrides, fragment):
    """A value of the right type that cannot mean anything is one clear error up front, not a
    traceback from a stage, an error on every row, or a silent clamp."""
    from regioncap.job import execute
    from regioncap.run import RunError

    cfg = compose(["data=demo", *overrides], output_dir=tmp_path / "run")
    with pytest.raises(RunError, match=None) as err:
        execute(cfg)
    assert fragment in str(err.value)
    assert not (tmp_path / "run" / "visualize.jsonl").exists()


#: Values that used to fail every row (internal_error, draw_error), fail after the job ran (a traceback),
#: stall the drawing or exhaust the memory; each is one line naming its key now (one compose for all).
REFUSED = [
    ("prompt.template", "describe {n", "prompt.template must be a text whose placeholders are among {n}"),
    ("prompt.template", "{labels:d}", "prompt.template must be"),
    ("prompt.reask_template", "again {bad}",  # failed only the rows that needed a re-ask
     "prompt.reask_template must be a text whose placeholders are among {labels}, {format_instruction}"),
    ("draw.label_format", "{m}", "draw.label_format must be a text whose placeholders are among {n}"),
    ("draw.label_format", "{n:>10000000000}", "draw.label_format must be"),
    ("draw.palette", [], "draw.palette must be a list of at least one colour"),  # a traceback
    ("draw.palette", ["red", "notacolour"], "draw.palette must be a list of at least one colour"),
    ("draw.image_format", "gif", "draw.image_format must be 'jpeg' or 'png', got 'gif'"),
    ("draw.label_size", 100.0, "draw.label_size must be a finite number > 0 and <= 1, got 100.0"),
    ("draw.min_line_px", 100000, "draw.min_line_px must be a whole number in 1..1000"),  # stalled
    ("sampling.seed", -1, "sampling.seed must be null or a whole number in 0..9223372036854775807"),
    # A negative count left the intervals out as 0 does, without a word.
    ("metrics.bootstrap_resamples", -1, "metrics.bootstrap_resamples must be a whole number >= 0, got -1"),
    # Every row's normalized_bbox is padded to max_boxes: 10^20 ran out of memory after minutes.
    ("max_boxes", 10**20, "max_boxes must be a whole number in 1..1000"),
]


def test_values_that_failed_every_row_are_refused_naming_the_key():
    from omegaconf import OmegaConf

    from regioncap.run import RunError
    from regioncap.settings import check_settings

    base = compose([])
    check_settings(base)
    for key, value, fragment in REFUSED:
        cfg = base.copy()
        OmegaConf.update(cfg, key, value, force_add=False)
        with pytest.raises(RunError) as err:
            check_settings(cfg)
        assert fragment in str(err.value), (key, value, str(err.value))


def test_every_wrong_setting_is_named_at_once():
    from regioncap.run import RunError
    from regioncap.settings import check_settings

    with pytest.raises(RunError) as err:
        check_settings(compose(["commit_every=0", "prompt.crop_margin=-1", "metrics.meteor_timeout_s=0"]))
    assert [p.split(" must ")[0] for p in str(err.value).split("; ")] == \
        ["prompt.crop_margin", "metrics.meteor_timeout_s", "commit_every"]  # in the schema's order


@pytest.mark.parametrize("engine", ["fake", "transformers", "vllm", "openai", "auto"])
@pytest.mark.parametrize("propose", ["none", "contours", "vlm"])
def test_every_default_passes_the_range_checks(engine, propose):
    from regioncap.settings import check_settings

    check_settings(compose([f"engine={engine}", f"propose={propose}"]))


# ------------------------------------------------ each default written once (issue 21)

#: Keys a shipped option may set to its schema's default, and why (the test below refuses any other).
DEFAULT_KEPT = {
    # None yet: a value equal to its field's default says nothing the schema does not.
}


def option_schema(group: str, data: dict) -> type:
    """The dataclass an option file of ``group`` starts from: its class's ``Config`` (``_target_``),
    else the schema of the group's options that name no class."""
    from regioncap.components import Component, resolve
    from regioncap.config import BeforeFamilies, DrawConfig
    from regioncap.propose.base import Proposer

    if data.get("_target_"):
        return resolve(data["_target_"], Component, f"{group}._target_").Config
    return {"draw": DrawConfig, "propose": Proposer.Config, "model": BeforeFamilies}[group]


def schema_defaults(schema: type) -> dict:
    """``{field: default}`` of ``schema`` as plain data (fields without a default left out)."""
    import dataclasses

    from regioncap.components import MISSING, plain

    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if value != MISSING:
            out[f.name] = plain(value)
    return out


def repeated_defaults(path, schema: type, skip=("defaults", "_target_", "hydra")) -> list:
    """``file: key`` for each top-level key of the YAML file ``path`` whose value is ``schema``'s default."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    defaults = schema_defaults(schema)
    where = path.relative_to(REPO)
    return [f"{where}: {key}: {value!r}" for key, value in data.items()
            if key not in skip and key in defaults and value == defaults[key]
            and f"{where.parent.name}/{where.name}:{key}" not in DEFAULT_KEPT]


@pytest.mark.parametrize("group", GROUPS)
def test_shipped_options_set_only_what_differs_from_their_schema(group):
    import yaml

    found = []
    for option in options(group):
        path = CONF_DIR / group / f"{option}.yaml"
        found += repeated_defaults(path, option_schema(group, yaml.safe_load(path.read_text()) or {}))
    assert found == [], ("these keys repeat their schema's default (the schema is the one place a default is "
                         "written; remove them, or allow one in DEFAULT_KEPT saying why):\n" + "\n".join(found))


def test_config_yaml_repeats_no_default_of_the_schema():
    from regioncap.config import RegionCapConfig

    assert repeated_defaults(CONF_DIR / "config.yaml", RegionCapConfig) == []


def test_the_repeated_default_check_finds_one(tmp_path, monkeypatch):
    from regioncap.config import DrawConfig

    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "draw").mkdir()
    path = tmp_path / "draw" / "x.yaml"
    path.write_text("name: x\nline_width: 0.008\ndim: 0\nlabel_size: 0.03\njpeg_quality: 90\n")
    assert repeated_defaults(path, DrawConfig) == ["draw/x.yaml: line_width: 0.008", "draw/x.yaml: dim: 0"]


# ------------------------------------------------ typed once, at the job's start (issue 21)


def config_nodes(value, where="cfg", seen=None):
    """``where`` of every omegaconf object inside ``value`` (dataclass fields, mappings, sequences, walked)."""
    import dataclasses

    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if type(value).__module__.split(".")[0] == "omegaconf":
        return [f"{where}: {type(value).__name__}"]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [hit for f in dataclasses.fields(value)
                for hit in config_nodes(getattr(value, f.name), f"{where}.{f.name}", seen)]
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in config_nodes(v, f"{where}[{k!r}]", seen)]
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in config_nodes(v, f"{where}[{i}]", seen)]
    return []


def test_the_walk_finds_a_config_node_anywhere():
    from dataclasses import make_dataclass

    box = make_dataclass("Box", [("inner", object)])
    assert config_nodes(box(inner={"a": [1, OmegaConf.create({"x": 1})]})) == ["cfg.inner['a'][1]: DictConfig"]
    assert config_nodes(box(inner={"a": [1, {"x": 1}]})) == []


@pytest.mark.slow  # a whole job (one row, the fake engine): 1.8-4.3 s here
def test_what_the_job_hands_below_it_is_typed_with_no_dictconfig_inside(tmp_path, monkeypatch):
    """A job through ``execute`` with the composed config: the run, both stages and the engine receive the
    typed config (``RegionCapConfig``, each group an instance of its class's ``Config``), no DictConfig in it."""
    from regioncap import job
    from regioncap.config import DrawConfig, RegionCapConfig
    from regioncap.engines import fake as fake_module
    from regioncap.engines.fake import FakeEngine
    from regioncap.stages.caption import Captioner
    from regioncap.stages.visualize import Visualizer

    seen = {}

    def spy(name, original):
        def wrapper(*args, **kwargs):
            seen[name] = args, kwargs
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(job, "build_run", spy("build_run", job.build_run))
    monkeypatch.setattr(Visualizer, "__init__", spy("visualize", Visualizer.__init__))
    monkeypatch.setattr(Captioner, "__init__", spy("caption", Captioner.__init__))
    monkeypatch.setattr(FakeEngine, "__init__", spy("engine", FakeEngine.__init__))
    cfg = compose(["engine=fake", "data.limit=1", "workers=0", "progress=false"], output_dir=str(tmp_path / "run"))
    assert isinstance(cfg, DictConfig)
    metrics = job.execute(cfg)
    assert metrics["rows"] == 1
    run_cfg = seen["build_run"][0][0]
    assert seen["visualize"][0][1] is run_cfg and seen["caption"][0][1] is run_cfg
    assert seen["engine"][1]["engine_cfg"] is run_cfg.engine and seen["engine"][1]["model_cfg"] is run_cfg.model
    assert type(run_cfg) is RegionCapConfig and isinstance(run_cfg.draw, DrawConfig)
    assert isinstance(run_cfg.engine, fake_module.FakeEngine.Config)
    for group in ("model", "data", "prompt", "logger", "executor", "propose"):
        assert dataclasses.is_dataclass(getattr(run_cfg, group)), group
    assert config_nodes(run_cfg) == []
    assert run_cfg.output_dir == str(tmp_path / "run")


def test_typed_config_names_the_key_of_a_value_that_does_not_resolve():
    from regioncap.errors import RunError
    from regioncap.settings import typed_config

    cfg = compose(["engine=fake"])
    with pytest.raises(RunError, match="output_dir"):
        typed_config(cfg)  # ${hydra:runtime.output_dir} outside a Hydra job
    cfg.output_dir = "x"
    typed = typed_config(cfg)
    assert typed_config(typed) is typed and typed.output_dir == "x"


@pytest.mark.parametrize("overrides", [["logger=many", "propose=vlm", "prompt=coords", "data=hf"],
                                       ["experiment=dataflow_baseline"]])
def test_the_typed_config_as_plain_data_is_what_the_composed_one_was(overrides):
    """The manifest's config and the run key read the typed config through ``components.plain``: the
    same data, in the same order, that ``OmegaConf.to_container`` gave for the composed config."""
    import json

    from regioncap.components import plain
    from regioncap.settings import typed_config

    cfg = compose(overrides, output_dir="x")
    typed = typed_config(cfg)
    expected = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert json.dumps(plain(typed)) == json.dumps(expected)
