"""A user's own engine, logger, proposer, data source and prompt strategy, in their own package and
--config-dir, run with no change to regioncap (0 files of the package touched).

The plugin's files are the code blocks of docs/plugins.md (each starts with a
``# path`` line), written into a folder outside the package: the example a
user reads is the one that runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict

import pytest

from conftest import REPO, run_cli

#: A fenced block of docs/plugins.md whose first line names the file it is.
_BLOCK = re.compile(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", re.S)


def plugin_files() -> Dict[str, str]:
    """``{relative path: text}`` of every file docs/plugins.md shows."""
    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    return {path: f"# {path}\n{body}" for path, body in _BLOCK.findall(text)}


def write_plugin(root: Path) -> Path:
    """The docs' plugin package and conf dir under ``root`` (outside the package); returns ``root``."""
    for rel, body in plugin_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
    (root / "myplugins" / "__init__.py").write_text("", encoding="utf-8")
    return root


def run_plugin(tmp_path: Path, *overrides: str) -> Any:
    """``python -m regioncap`` with the docs' plugin written under ``tmp_path/myproject``: its folder on
    PYTHONPATH, its conf dir as ``--config-dir``, started from there (outside the package)."""
    root = write_plugin(tmp_path / "myproject")
    return run_cli([f"--config-dir={root / 'myconf'}", *overrides], env={"PYTHONPATH": f"{root}:{REPO}"}, cwd=root)


def shape_images(tmp_path: Path, count: int) -> Path:
    """A folder ``tmp_path/images`` holding the first ``count`` bundled shapes scenes."""
    import shutil

    images = tmp_path / "images"
    images.mkdir()
    for i in range(count):
        name = f"shapes_{i:05d}.jpg"
        shutil.copy(REPO / "regioncap" / "demo" / "shapes" / "images" / name, images / name)
    return images


def test_the_docs_show_an_engine_a_logger_and_their_options():
    assert set(plugin_files()) == {"myplugins/engine.py", "myplugins/logger.py", "myconf/engine/echo.yaml",
                                   "myconf/logger/jsonl.yaml", "myplugins/proposer.py", "myplugins/source.py",
                                   "myconf/propose/grid.yaml", "myconf/data/folder.yaml",
                                   "myplugins/strategy.py", "myconf/prompt/few.yaml", "myconf/model/mymodel.yaml"}


@pytest.mark.cli
def test_the_docs_model_option_composes_as_its_family_from_outside_the_package(tmp_path):
    """A new model of a known family is one YAML file in the user's own conf dir."""
    import yaml

    proc = run_plugin(tmp_path, "model=mymodel", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    model = yaml.safe_load(proc.stdout)["model"]
    assert model["_target_"] == "regioncap.families.qwen.Qwen25VL" and model["name"] == "mymodel"
    assert model["path"] == "/models/my-finetuned-qwen2.5-vl" and model["max_pixels"] == 1280 * 28 * 28


@pytest.mark.cli
@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("engine._target_=myplugins.engine.EchoEngin",
     "engine._target_=myplugins.engine.EchoEngin: module myplugins.engine has no attribute 'EchoEngin'"),
    ("engine.max_words=0", "engine.max_words must be a whole number >= 1, got 0"),
])
def test_a_broken_plugin_option_is_one_line_naming_the_key_before_any_row(tmp_path, override, message):
    out = tmp_path / "run"
    proc = run_plugin(tmp_path, "engine=echo", override, f"hydra.run.dir={out}")
    assert proc.returncode == 1
    said = proc.stdout + proc.stderr
    assert message in said and "Traceback" not in said
    assert not (out / "visualize.jsonl").exists()


@pytest.mark.cli
@pytest.mark.slow
def test_a_plugin_proposer_and_data_source_run_from_outside_the_package(tmp_path):
    images = shape_images(tmp_path, 3)
    (images / "notes.txt").write_text("not an image: the pattern leaves it out")
    out = tmp_path / "run"
    proc = run_plugin(tmp_path, "data=folder", f"data.path={images}", "propose=grid", "propose.cols=3",
                      "engine=fake", "progress=false", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["shapes_00000", "shapes_00001", "shapes_00002"]  # every file, once
    for rec in records:
        assert rec["status"] == "ok" and rec["proposals"]["method"] == "grid"
        assert len(rec["regions"]) == 6 and {reg["source"] for reg in rec["regions"]} == {"grid"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["source"] == "folder"
    key = json.loads((out / "run_key.json").read_text())["values"]
    assert key["propose"]["method"] == "grid" and key["propose"]["cols"] == 3 and key["data"]["source"] == "folder"


@pytest.mark.cli
@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("propose._target_=myplugins.proposer.GridProposr",
     "propose._target_=myplugins.proposer.GridProposr: module myplugins.proposer has no attribute 'GridProposr'"),
    ("propose.cols=0", "propose.cols must be a whole number >= 1, got 0"),
    ("data._target_=myplugins.proposer.GridProposer",
     "data._target_=myplugins.proposer.GridProposer: GridProposer is not a subclass of regioncap.data.DataSource"),
])
def test_a_broken_plugin_proposer_or_source_is_one_line_before_any_row(tmp_path, override, message):
    out = tmp_path / "run"
    proc = run_plugin(tmp_path, "data=folder", f"data.path={tmp_path}", "propose=grid", "engine=fake", override,
                      f"hydra.run.dir={out}")
    assert proc.returncode == 1
    said = proc.stdout + proc.stderr
    assert message in said and "Traceback" not in said
    assert not (out / "visualize.jsonl").exists()


def package_tree() -> Dict[str, str]:
    """``{path under the repo: sha256}`` of every file of the package (regioncap/, its shipped conf
    included) and of pyproject.toml: what a plugin must not need to touch. Caches left out."""
    import hashlib

    files = [p for p in (REPO / "regioncap").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files.append(REPO / "pyproject.toml")
    return {str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


#: Names the docs' plugin defines: no file of the package may mention one (the plugin needs no edit there).
PLUGIN_NAMES = ("myplugins", "EchoEngine", "JsonlLogger", "GridProposer", "FolderSource", "FewMarkedStrategy")


@pytest.mark.cli
@pytest.mark.slow
def test_an_engine_strategy_proposer_source_and_logger_from_outside_touch_0_package_files(tmp_path):
    """The files-per-extension table of docs/design.md ("How to add ..."): all five kinds of plugin
    in one run, from a folder outside the package, with 0 files of the package written or named."""
    before = package_tree()
    images = shape_images(tmp_path, 2)
    out = tmp_path / "run"
    proc = run_plugin(tmp_path, "engine=echo", "engine.batch_size=4", "prompt=few", "propose=grid", "data=folder",
                      f"data.path={images}",
                      "logger=jsonl", "progress=false", "workers=0", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [p for p in (tmp_path / "myproject").rglob("*") if p.is_file()]
    assert written and not any(p.resolve().is_relative_to(REPO.resolve()) for p in written)
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = manifest["config"]
    assert [cfg[g]["_target_"] for g in ("engine", "prompt", "propose", "data", "logger")] == [
        "myplugins.engine.EchoEngine", "myplugins.strategy.FewMarkedStrategy", "myplugins.proposer.GridProposer",
        "myplugins.source.FolderSource", "myplugins.logger.JsonlLogger"]
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["shapes_00000", "shapes_00001"]
    for rec in records:  # grid proposals, two regions a request (the plugin strategy), echo's captions
        assert rec["status"] == "ok" and {reg["source"] for reg in rec["regions"]} == {"grid"}
        assert [len(s["numbers"]) for s in rec["requests"]] == [2, 2]
        assert {reg["caption"] for reg in rec["regions"]} == {"a plugin caption"}
    events = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and "progress" in events and events[-2:] == ["run", "finish"]
    assert manifest["engine"]["name"] == "echo"
    assert manifest["engine"]["describe"] == {"engine": "echo", "caption": "a plugin caption"}
    assert "engine=echo" in (out / "regioncap.log").read_text()
    # 0 files of the package: none written by the run, none naming the plugin.
    assert package_tree() == before
    named = [path for path in before if path.endswith((".py", ".yaml", ".toml"))
             and any(n in (REPO / path).read_text(encoding="utf-8") for n in PLUGIN_NAMES)]
    assert named == []


@pytest.mark.cli
@pytest.mark.slow
def test_a_plugins_typed_settings_reach_the_preparation_workers_and_an_isolated_caption_process(tmp_path):
    """The typed config goes pickled to other processes: the user's own ``Config`` classes (engine, proposer,
    data source, strategy) import there by name, from the same PYTHONPATH, as the classes they configure must."""
    images = shape_images(tmp_path, 2)
    out = tmp_path / "run"
    proc = run_plugin(tmp_path, "engine=echo", "executor=isolated", "prompt=few", "propose=grid", "data=folder",
                      f"data.path={images}", "workers=1", "overlap=false", "progress=false", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["shapes_00000", "shapes_00001"]
    for rec in records:
        assert rec["status"] == "ok" and {reg["source"] for reg in rec["regions"]} == {"grid"}
        assert {reg["caption"] for reg in rec["regions"]} == {"a plugin caption"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pipeline"]["workers"] == 1
    # The caption stage ran in its own process (executor=isolated), not the job's.
    assert metrics["stages"]["caption"]["pid"] != metrics["stages"]["visualize"]["pid"]
