"""Components named by ``_target_``: resolving, typing, value ranges, registration, and the errors a user sees."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import sys
from typing import Optional

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf, open_dict

from conftest import CONF_DIR, compose
from regioncap import components
from regioncap.components import (
    Component, check, class_of, node_name, optional, range_problems, real, resolve, shipped_targets, typed, whole,
)
from regioncap.engines.base import Engine
from regioncap.errors import RunError

FAKE = "regioncap.engines.fake.FakeEngine"


# ------------------------------------------------------------------ resolve


@pytest.mark.parametrize("target,message", [
    ("regioncap.engines.fakee.FakeEngine",
     "engine._target_=regioncap.engines.fakee.FakeEngine: no module named 'regioncap.engines.fakee'"),
    ("regioncap.engines.fake.FakeEngin",
     "engine._target_=regioncap.engines.fake.FakeEngin: module regioncap.engines.fake has no attribute 'FakeEngin'"),
    ("regioncap.loggers.NoneLogger",
     "engine._target_=regioncap.loggers.NoneLogger: NoneLogger is not a subclass of regioncap.engines.base.Engine"),
    ("regioncap.engines.fake.json",
     "engine._target_=regioncap.engines.fake.json: json is not a subclass of regioncap.engines.base.Engine"),
    ("FakeEngine", "engine._target_ must name a class as package.module.Class, got 'FakeEngine'"),
])
def test_resolve_names_the_key_and_what_failed(target, message):
    with pytest.raises(RunError) as err:
        resolve(target, Engine, "engine._target_")
    assert str(err.value).startswith(message)


def test_a_module_that_fails_to_import_is_said_as_such(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RunError, match=r"importing broken_plugin failed: No module named 'not_a_module_anywhere'"):
        resolve("broken_plugin.Engine", Engine, "engine._target_")


def test_a_node_without_target_is_refused():
    with pytest.raises(RunError, match=r"engine\._target_ is not set"):
        class_of({"batch_size": 2}, Engine, "engine")


def test_names_come_from_the_class():
    assert node_name({"_target_": FAKE}) == "fake"
    assert node_name({"_target_": "regioncap.engines.auto.AutoEngine"}) == "auto"
    assert node_name({"_target_": "elsewhere.not_installed.MyEngine"}) == "myengine"  # a run read back elsewhere
    assert node_name({"name": "transformers"}) == "transformers"  # a run recorded before _target_

    class Mine(Engine):
        pass

    assert components.short_name(Mine) == "mine"


# ------------------------------------------------------------------ typing


def test_typed_converts_and_keeps_the_target():
    from regioncap.engines.fake import FakeEngine

    node = typed({"_target_": FAKE, "batch_size": "3"}, FakeEngine, "engine")
    assert node.batch_size == 3 and node._target_ == FAKE and node.skip_regions == []
    assert OmegaConf.get_type(node) is FakeEngine.Config
    assert pickle.loads(pickle.dumps(node)) == node  # a typed node crosses to a process


@pytest.mark.parametrize("values,message", [
    ({"batch_sise": 3}, "engine.batch_sise: not a setting of regioncap.engines.fake.FakeEngine"),
    ({"batch_size": "many"}, "engine.batch_size: Value 'many' of type 'str' could not be converted to Integer"),
])
def test_typed_names_the_key_it_refuses(values, message):
    from regioncap.engines.fake import FakeEngine

    with pytest.raises(RunError) as err:
        typed({"_target_": FAKE, **values}, FakeEngine, "engine")
    assert str(err.value) == message


# ------------------------------------------------------------------ ranges


@dataclasses.dataclass
class _Inner:
    share: float = dataclasses.field(default=0.5, metadata=check(real(0, 1)))


@dataclasses.dataclass
class _Outer:
    count: int = dataclasses.field(default=1, metadata=check(whole(1)))
    limit: Optional[int] = dataclasses.field(default=None, metadata=check(optional(whole(0, 9))))
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_every_value_out_of_range_is_named_nested_too():
    node = OmegaConf.merge(OmegaConf.structured(_Outer), {"count": 0, "limit": 10, "inner": {"share": 2.0}})
    assert range_problems(node, _Outer, "x") == [
        "x.count must be a whole number >= 1, got 0",
        "x.limit must be null or a whole number in 0..9, got 10",
        "x.inner.share must be a finite number >= 0 and <= 1, got 2.0",
    ]
    assert range_problems(OmegaConf.structured(_Outer), _Outer, "x") == []


@given(st.one_of(st.integers(-5, 15), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=2)))
def test_whole_and_real_accept_exactly_their_numbers(value):
    ok_whole, _ = whole(1, 9)
    ok_real, _ = real(0, 1, above=True)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    assert ok_whole(value) == (number and isinstance(value, int) and 1 <= value <= 9)
    assert ok_real(value) == (number and math.isfinite(value) and 0 < value <= 1)


# ------------------------------------------------------------------ the errors of a run, before any row


@pytest.fixture(scope="module")
def fake_cfg():
    return compose(["engine=fake", "progress=false"])


def _broken(cfg, tmp_path, node):
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.engine = node
        cfg.output_dir = str(tmp_path / "run")
    return cfg


@pytest.mark.parametrize("node,message", [
    ({"_target_": "regioncap.engines.fakee.FakeEngine"}, "engine._target_=regioncap.engines.fakee.FakeEngine: no module"),
    ({"_target_": "regioncap.loggers.NoneLogger"}, "NoneLogger is not a subclass of regioncap.engines.base.Engine"),
    ({"_target_": FAKE, "batchsize": 3}, "engine.batchsize: not a setting of regioncap.engines.fake.FakeEngine"),
    ({"_target_": FAKE, "batch_size": 0}, "engine.batch_size must be a whole number >= 1, got 0"),
])
def test_a_broken_engine_option_stops_the_run_before_any_row(fake_cfg, tmp_path, node, message):
    from regioncap.job import execute

    with pytest.raises(RunError) as err:
        execute(_broken(fake_cfg, tmp_path, node))
    assert message in str(err.value)
    assert not (tmp_path / "run" / "visualize.jsonl").exists()


def test_a_misspelt_target_of_a_shipped_option_fails_too(fake_cfg, tmp_path):
    from regioncap.job import execute

    cfg = copy.deepcopy(fake_cfg)
    cfg.engine._target_ = "regioncap.engines.fake.Fake"  # a str field of the shipped schema: composes
    cfg.output_dir = str(tmp_path / "run")
    with pytest.raises(RunError, match=r"module regioncap.engines.fake has no attribute 'Fake'"):
        execute(cfg)


# ------------------------------------------------------------------ the shipped options


def test_every_option_of_a_component_group_names_its_class():
    shipped = {(g, o) for g, o, _ in shipped_targets(CONF_DIR)}
    for group in components.GROUPS:
        options = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
        if group in components.OPTIONAL_GROUPS:
            options.discard("none")  # propose=none names no class
        assert {(group, o) for o in options} <= shipped, group


@pytest.mark.parametrize("group,option,target", list(shipped_targets(CONF_DIR)))
def test_a_shipped_option_keeps_only_what_differs_from_its_config(group, option, target):
    """Each default lives in the class's Config; the YAML says only what this option changes."""
    cls = resolve(target, Component, "_target_")
    set_here = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text())
    defaults = OmegaConf.to_container(OmegaConf.structured(cls.Config))
    same = [k for k, v in set_here.items() if k not in ("defaults", "_target_") and defaults.get(k) == v]
    assert same == []
    assert set_here["defaults"][0] == f"/schema/{group}/{option}@_here_"


def test_the_composed_option_is_typed_by_its_class():
    from regioncap.engines.vllm_engine import VllmEngine

    cfg = compose(["engine=vllm", "engine.batch_size=4"])  # no "+": the composed node has every field
    assert issubclass(OmegaConf.get_type(cfg.engine), VllmEngine.Config) and cfg.engine.batch_size == 4


@pytest.mark.parametrize("installed,cuda,picked,why", [
    ({"torch"}, False, "transformers", "vllm not installed"),
    (set(), False, "transformers", "vllm and torch not installed"),
    ({"torch", "vllm"}, False, "transformers", "vllm installed, but no CUDA device"),
    ({"torch", "vllm"}, True, "vllm", "CUDA (2 device(s)) and vllm installed"),
])
def test_auto_says_what_it_picked_and_why(monkeypatch, installed, cuda, picked, why):
    import importlib.util
    import types

    from regioncap.engines import engine_choice
    from regioncap.engines.auto import AutoEngine

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if name in installed else None) if name in ("torch", "vllm") else real_find_spec(name, *a)))
    # A stand-in torch: the pick asks it for CUDA only.
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_available=lambda: cuda, device_count=lambda: 2)))
    engine = compose(["engine=auto"]).engine
    assert AutoEngine.chosen(engine).name == picked
    line = engine_choice(engine)
    assert line.startswith(f"auto -> {picked} (") and why in line
    assert engine_choice(compose(["engine=fake"]).engine) == "fake"


#: The hub models run on engine=auto; the offline ones (built or shipped here) keep transformers,
#: and so do the hub models vLLM does not run (Florence-2: only with vLLM's out-of-tree BART plugin).
FULL_SIZE_MODELS = ["qwen25vl_3b", "qwen25vl_7b", "qwen2vl_2b", "qwen3vl_2b", "qwen3vl_4b",
                    "gemma3_4b", "gemma3_12b", "gemma3_27b",
                    "internvl35_1b", "internvl35_2b", "internvl35_4b", "internvl35_8b"]
OFFLINE_MODELS = ["shapes", "tiny", "qwen3vl_tiny", "gemma3_tiny", "florence2_tiny", "internvl35_tiny"]
TRANSFORMERS_ONLY_MODELS = ["florence2_base", "florence2_large"]


def test_every_model_option_is_full_size_or_offline():
    assert sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")) == sorted(
        FULL_SIZE_MODELS + OFFLINE_MODELS + TRANSFORMERS_ONLY_MODELS)


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@pytest.mark.parametrize("model", FULL_SIZE_MODELS)
def test_full_size_models_default_to_auto_and_the_command_line_wins(model):
    assert node_name(compose([f"model={model}"]).engine) == "auto"
    assert node_name(compose([f"model={model}", "engine=vllm"]).engine) == "vllm"
    assert node_name(compose([f"model={model}", "engine=fake"]).engine) == "fake"


@pytest.mark.parametrize("model", OFFLINE_MODELS + TRANSFORMERS_ONLY_MODELS)
def test_the_offline_models_keep_transformers(model):
    assert node_name(compose([f"model={model}"], pin=False).engine) == "transformers"


def test_the_default_and_an_experiment_choose_their_engine():
    assert node_name(compose([], pin=False).engine) == "transformers"  # model=shapes, the default
    assert node_name(compose(["experiment=qwen25vl_3b_vllm"]).engine) == "vllm"


def test_auto_becomes_transformers_without_vllm(monkeypatch):
    from regioncap.engines.auto import AutoEngine
    from regioncap.engines.transformers_engine import TransformersEngine

    monkeypatch.setitem(sys.modules, "vllm", None)
    assert AutoEngine.chosen(compose(["engine=auto"]).engine) is TransformersEngine
