"""The offline tiny Qwen2.5-VL (regioncap.tiny) and model resolution (regioncap.models)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from regioncap import tiny
from regioncap.engines.base import EngineError
from regioncap.models import resolve_model_path
from regioncap.families.qwen import Qwen3VL, Qwen25VL
from regioncap.qwen import fixed_rope_scaling, patched_config_dict


def visual_tokens(width: int, height: int, patch_size: int = 14, merge_size: int = 2) -> int:
    """Visual tokens of an image at input size for a Qwen family of this token size."""
    cls = Qwen3VL if patch_size == 16 else Qwen25VL
    cfg = cls.Config(min_pixels=1, max_pixels=10**8, patch_size=patch_size, merge_size=merge_size)
    return cls(cfg).visual_tokens(width, height)

#: A hub id that does not exist and is never cached.
MISSING_HUB_ID = "regioncap-tests/no-such-model-0000"

#: What the official Qwen2.5-VL template renders for a system turn and an image+text user turn.
EXPECTED_PROMPT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe region 1.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _model_cfg(**kw):
    base = dict(name="m", path="", builder=None, revision=None)
    base.update(kw)
    return Qwen25VL.config(**base)


# -- the build ----------------------------------------------------------------


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_build_is_deterministic(tiny_model_dir, tmp_path):
    other = tiny.build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (other / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    marker = json.loads((tiny_model_dir / tiny.MARKER).read_text())
    assert marker["weights_sha256"] == tiny._sha256(other / "model.safetensors")
    assert marker["builder_version"] == tiny.BUILDER_VERSION and marker["seed"] == 0


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_build_seed_changes_weights(tiny_model_dir, tmp_path):
    other = tiny.build_tiny_model(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_build_does_not_move_callers_rngs(tmp_path):
    import random

    import torch

    random.seed(123)
    torch.manual_seed(123)
    tiny.build_tiny_model(tmp_path / "m")
    after = (random.random(), torch.rand(1).item())
    random.seed(123)
    torch.manual_seed(123)
    assert after == (random.random(), torch.rand(1).item())


def test_build_is_idempotent(tiny_model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    t0 = time.perf_counter()
    assert tiny.build_tiny_model(tiny_model_dir) == tiny_model_dir
    assert time.perf_counter() - t0 < 0.5
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before
    # nothing left behind next to it
    assert not [p for p in tiny_model_dir.parent.iterdir() if p.name.startswith(".")]


def test_folder_is_complete_and_small(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
            "preprocessor_config.json", "generation_config.json", tiny.MARKER} <= names
    assert not any(n.endswith(".bin") for n in names)  # safetensors only
    assert sum(p.stat().st_size for p in tiny_model_dir.iterdir()) < 4_000_000
    pre = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (14, 2, 2)
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 50176)
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"


def test_move_into_place_loser_uses_winner(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / tiny.MARKER).write_text(json.dumps({"builder_version": tiny.BUILDER_VERSION, "seed": 0}))
    (out / "winner").write_text("")
    mine = tmp_path / ".model.tmp-x"
    mine.mkdir()
    (mine / "loser").write_text("")
    assert tiny._move_into_place(mine, out, tiny.qwen_folder(), 0) is False
    assert (out / "winner").exists() and not (out / "loser").exists()


def test_move_into_place_replaces_an_older_build(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / tiny.MARKER).write_text(json.dumps({"builder_version": tiny.BUILDER_VERSION - 1, "seed": 0}))
    (out / "old-file").write_text("")
    mine = tmp_path / ".model.tmp-x"
    mine.mkdir()
    (mine / "new-file").write_text("")
    assert tiny._move_into_place(mine, out, tiny.qwen_folder(), 0) is True
    assert (out / "new-file").exists() and not (out / "old-file").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_move_into_place_never_deletes_a_foreign_folder(tmp_path):
    out = tmp_path / "my-real-model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    mine = tmp_path / ".tmp-x"
    mine.mkdir()
    (mine / "new-file").write_text("")
    with pytest.raises(FileExistsError, match="my-real-model"):
        tiny._move_into_place(mine, out, tiny.qwen_folder(), 0)
    assert (out / "config.json").exists()


def _tiny_kinds():
    """Every family's tiny build: what marks its finished folder."""
    from regioncap.families import florence, gemma, internvl_files

    return {"qwen2_5_vl": tiny.qwen_folder(), "qwen3_vl": tiny.qwen_folder("qwen3_vl"),
            "internvl": internvl_files.tiny_folder(), "gemma3": gemma.tiny_folder(),
            "florence2": florence.tiny_folder()}


def _fake_build(calls):
    def build(folder):
        calls.append(folder)
        (folder / "config.json").write_text("{}")
        return {"what": "fake"}
    return build


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@pytest.mark.parametrize("name", sorted(_tiny_kinds()))
def test_build_folder_replaces_an_older_build_and_then_reuses_it(tmp_path, name):
    """The one build path of every family: an older version's folder is replaced (InternVL's and
    Florence-2's own copies deleted it first or failed), the marker carries the kind's fields and the
    seed, and a complete folder is reused without building."""
    kind = _tiny_kinds()[name]
    out = tmp_path / "m"
    out.mkdir()
    version_key = next(k for k in kind.fields if "version" in k)
    (out / kind.marker).write_text(json.dumps(dict(kind.fields, **{version_key: -1}, seed=3)))
    (out / "old-file").write_text("")
    calls = []
    assert tiny.build_folder(out, kind, _fake_build(calls), seed=3, name=name) == out
    assert len(calls) == 1 and not (out / "old-file").exists() and (out / "config.json").exists()
    marker = json.loads((out / kind.marker).read_text())
    assert marker == dict(kind.fields, seed=3, what="fake") and kind.is_complete(out, 3)
    assert tiny.build_folder(out, kind, _fake_build(calls), seed=3, name=name) == out and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing left beside it


def test_build_folder_refuses_a_foreign_folder_before_building(tmp_path):
    out = tmp_path / "my-real-model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    calls = []
    with pytest.raises(FileExistsError, match="my-real-model"):
        tiny.build_folder(out, tiny.qwen_folder(), _fake_build(calls), name="qwen2_5_vl")
    assert calls == [] and (out / "config.json").read_text() == "{}"


def test_no_familys_tiny_folder_passes_for_anothers(tmp_path):
    """Florence-2 and the Qwen builds share a marker file name: the family in it tells them apart (a
    marker from before Qwen3-VL, without one, is a Qwen2.5-VL)."""
    kinds = _tiny_kinds()
    for name, kind in kinds.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / kind.marker).write_text(json.dumps(dict(kind.fields, seed=0)))
        assert [other for other, k in kinds.items() if k.is_complete(folder, 0)] == [name]
    old = tmp_path / "old"
    old.mkdir()
    (old / tiny.MARKER).write_text(json.dumps({"builder_version": tiny.BUILDER_VERSION, "seed": 0}))
    assert [other for other, k in kinds.items() if k.is_complete(old, 0)] == ["qwen2_5_vl"]


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_script_builds(tmp_path, capsys):
    import runpy

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_tiny_model.py"
    main = runpy.run_path(str(script))["main"]  # in-process: a subprocess would spend 5 s importing torch
    assert main([str(tmp_path / "m"), "--seed", "0"]) == 0
    assert tiny.is_complete(tmp_path / "m", 0)
    assert str(tmp_path / "m") in capsys.readouterr().out


# -- tokenizer, template, config ------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_special_tokens_in_qwen_order_and_in_config(tiny_model_dir, tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t, _ in tiny.QWEN_ADDED_TOKENS]
    first = ids[0]
    assert ids == list(range(first, first + len(ids)))  # consecutive, in Qwen's order, after the BPE vocabulary
    assert first >= 256
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["video_token_id"] == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert cfg["vision_start_token_id"] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert cfg["vision_end_token_id"] == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert cfg["text_config"]["vocab_size"] >= len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


def test_tokenizer_is_byte_level(tokenizer):
    text = "A red car, 3 dogs; naïve 你好 🙂\n\t<|image_pad|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 1
    assert "<|vision_start|>" not in tokenizer.decode(ids + [tokenizer.convert_tokens_to_ids("<|vision_start|>")],
                                                       skip_special_tokens=True)


def test_chat_template_renders_qwen_prompt(tiny_model_dir):
    from regioncap.engines.transformers_engine import load_processor

    proc = load_processor(str(tiny_model_dir))
    saved = json.loads((tiny_model_dir / "chat_template.json").read_text())["chat_template"]
    assert saved == tiny.QWEN25VL_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe region 1."}]},
    ]
    assert proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == EXPECTED_PROMPT
    # no system turn -> Qwen's default system prompt
    no_system = proc.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True)
    assert no_system.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_processor_uses_real_patch_sizes(tiny_model_dir):
    from PIL import Image

    from regioncap.engines.transformers_engine import load_processor

    proc = load_processor(str(tiny_model_dir))
    out = proc(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[Image.new("RGB", (224, 168))],
               return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 12, 16]]  # 14-px patches
    n_pad = int((out["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert n_pad == visual_tokens(224, 168) == 48


def test_processor_without_torchvision_matches_the_full_one(tiny_model_dir, monkeypatch):
    """A CPU-only torch has no torchvision: the processor is built without its video processor
    (the part that needs torchvision) and gives what the full processor gives for an image."""
    import importlib.util

    import numpy as np
    from PIL import Image

    from regioncap.engines.transformers_engine import load_processor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (168, 224, 3), dtype=np.uint8))
    text = ["<|vision_start|><|image_pad|><|vision_end|>hi"]
    have_torchvision = importlib.util.find_spec("torchvision") is not None
    if have_torchvision:
        full = load_processor(str(tiny_model_dir))(text=text, images=[image], return_tensors="pt")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name == "torchvision" else find_spec(name, *a, **kw))
    proc = load_processor(str(tiny_model_dir))
    assert type(proc).__mro__[1].__name__ == "Qwen2_5_VLProcessor"
    assert not hasattr(proc, "video_processor") and proc.chat_template
    out = proc(text=text, images=[image], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 12, 16]]
    if have_torchvision:
        assert out["input_ids"].tolist() == full["input_ids"].tolist()
        assert np.allclose(out["pixel_values"].numpy(), full["pixel_values"].numpy(), atol=1e-5)


# -- models.py --------------------------------------------------------------------


def test_visual_tokens():
    assert visual_tokens(224, 168) == 48
    assert visual_tokens(56, 56) == 4
    assert visual_tokens(28 * 10, 28 * 3, patch_size=14, merge_size=2) == 30
    assert visual_tokens(32, 32, patch_size=16, merge_size=2) == 1


def test_resolve_local_dir(tiny_model_dir, tmp_path):
    assert resolve_model_path(_model_cfg(path=str(tiny_model_dir))) == str(tiny_model_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EngineError, match="empty.*config.json"):
        resolve_model_path(_model_cfg(path=str(empty)))
    with pytest.raises(EngineError, match="does not exist"):
        resolve_model_path(_model_cfg(path=str(tmp_path / "no" / "such" / "dir")))


def test_resolve_builds_tiny_once(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="regioncap")
    target = tmp_path / "cache" / "tiny"
    cfg = _model_cfg(path=str(target), builder="tiny")
    assert resolve_model_path(cfg) == str(target)
    assert tiny.is_complete(target)
    assert "built the tiny model" in caplog.text
    caplog.clear()
    assert resolve_model_path(cfg) == str(target)
    assert "built" not in caplog.text
    with pytest.raises(EngineError, match="builder"):
        resolve_model_path(_model_cfg(path=str(target), builder="huge"))


def _assert_fix_it(message: str) -> None:
    assert MISSING_HUB_ID in message
    assert f"huggingface-cli download {MISSING_HUB_ID}" in message
    assert "model.path=/local/dir" in message
    assert "model=tiny" in message


def test_resolve_missing_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(EngineError) as err:
        resolve_model_path(_model_cfg(path=MISSING_HUB_ID))
    assert time.perf_counter() - t0 < 5
    _assert_fix_it(str(err.value))
    assert "HF_HUB_OFFLINE" in str(err.value)


def test_resolve_missing_hub_id_online_fails_fast(monkeypatch):
    """Without HF_HUB_OFFLINE the hub is asked, with a short timeout: no hub here, or no such repo there."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # huggingface_hub read HF_HUB_OFFLINE once at import (conftest sets it): undo that too.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False, raising=False)
    t0 = time.perf_counter()
    with pytest.raises(EngineError) as err:
        resolve_model_path(_model_cfg(path=MISSING_HUB_ID))
    assert time.perf_counter() - t0 < 30
    _assert_fix_it(str(err.value))


def test_fixed_rope_scaling_old_flat_config():
    old = {"model_type": "qwen2_5_vl", "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    fixed = fixed_rope_scaling(old)
    assert fixed == {"type": "default", "rope_type": "default", "mrope_section": [16, 24, 24]}
    assert old["rope_scaling"] == {"type": "mrope", "mrope_section": [16, 24, 24]}  # input untouched


def test_fixed_rope_scaling_nested_and_other_forms():
    nested = {"text_config": {"rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}}
    assert fixed_rope_scaling(nested)["rope_type"] == "default"
    assert fixed_rope_scaling({"rope_scaling": {"mrope_section": [4, 6, 6]}})["rope_type"] == "default"
    assert fixed_rope_scaling({"rope_scaling": {"type": "linear", "factor": 2.0}}) == {
        "type": "linear", "rope_type": "linear", "factor": 2.0}
    # nothing to fix
    assert fixed_rope_scaling({"rope_scaling": {"rope_type": "default", "mrope_section": [4, 6, 6]}}) is None
    assert fixed_rope_scaling({"rope_scaling": None}) is None
    assert fixed_rope_scaling({"text_config": {"rope_parameters": {"rope_type": "default"}}}) is None
    assert fixed_rope_scaling({}) is None


def test_patched_config_dict_fixes_every_place():
    cfg = {"rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
           "text_config": {"rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}}
    patched = patched_config_dict(cfg)
    assert patched["rope_scaling"]["rope_type"] == "default"
    assert patched["text_config"]["rope_scaling"]["rope_type"] == "default"
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [4, 6, 6]}
    assert patched_config_dict({"rope_scaling": {"rope_type": "default"}}) is None


def make_old_style_copy(src: Path, dst: Path) -> Path:
    """A copy of the tiny model whose config.json has the flat layout and legacy rope_scaling of 2025 hub configs."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = {**(text.pop("rope_parameters", None) or {}), **(text.pop("rope_scaling", None) or {})}
    for key in ("model_type", "layer_types", "dtype"):
        text.pop(key, None)
    cfg.update(text)
    cfg["rope_theta"] = text.get("rope_theta", rope.get("rope_theta", 1000000.0))
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    cfg["vision_config"].pop("rope_parameters", None)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def test_old_style_config_is_detected(tiny_model_dir, tmp_path):
    old = make_old_style_copy(tiny_model_dir, tmp_path / "old")
    cfg = json.loads((old / "config.json").read_text())
    assert fixed_rope_scaling(cfg) == {"type": "default", "rope_type": "default", "mrope_section": [4, 6, 6]}
    assert fixed_rope_scaling(json.loads((tiny_model_dir / "config.json").read_text())) is None


def test_no_heavy_imports_at_import_time():
    import subprocess
    import sys

    code = ("import sys, regioncap.models, regioncap.tiny, regioncap.engines.transformers_engine; "
            "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub', 'tokenizers') if m in sys.modules))")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(repo)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
