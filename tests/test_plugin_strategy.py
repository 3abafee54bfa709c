"""A user's own prompt strategy (docs/plugins.md), from a folder outside the package, with no change to regioncap."""

from __future__ import annotations

import json

import pytest

from test_plugins import run_plugin


@pytest.mark.cli
@pytest.mark.slow
def test_a_plugin_strategy_plans_the_regions_from_outside_the_package(tmp_path):
    out = tmp_path / "run"
    proc = run_plugin(tmp_path, "prompt=few", "prompt.per_request=3", "engine=fake", "progress=false",
                      f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert records and any(len(r["regions"]) > 3 for r in records)
    for rec in records:
        # The plugin's slots: three regions a request, numbered from 1 on each; every region captioned.
        assert [(g["chunk"], g["number"]) for g in rec["regions"]] == [
            (i // 3, i % 3 + 1) for i in range(len(rec["regions"]))]
        assert [s["numbers"] for s in rec["requests"]] == [
            [g["number"] for g in rec["regions"] if g["chunk"] == c] for c in range(len(rec["requests"]))]
        assert all(g["caption"] for g in rec["regions"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["prompt"]["_target_"] == "myplugins.strategy.FewMarkedStrategy"


@pytest.mark.cli
def test_a_misspelt_strategy_class_is_one_line_naming_the_key(tmp_path):
    proc = run_plugin(tmp_path, "prompt=few", "prompt._target_=myplugins.strategy.Fewer", "engine=fake",
                      "progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "prompt._target_=myplugins.strategy.Fewer: module myplugins.strategy has no attribute 'Fewer'" in (
        proc.stdout + proc.stderr)
