"""The Python API (regioncap.api): run with overrides, read a run's records as dicts or a Dataset."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, TEST_GROUPS
from regioncap import api
from regioncap.errors import RunError

FAST = [f"{g}={v}" for g, v in TEST_GROUPS.items()] + ["engine=fake", "progress=false", "data.limit=2"]


@pytest.mark.slow  # a whole job, then datasets' import: seconds
def test_run_returns_the_run_dir_and_metrics_and_reads_its_records(tmp_path):
    result = api.run([*FAST, f"hydra.run.dir={tmp_path / 'run'}"], configure_logging=False)
    assert result.run_dir == (tmp_path / "run").resolve() and result.overrides[-1].startswith("hydra.run.dir=")
    assert result.metrics == json.loads((result.run_dir / "metrics.json").read_text())
    assert result.metrics["rows"] == 2
    # the run is a run dir like the command line's: Hydra's files, the manifest with the overrides
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok" and "engine=fake" in manifest["hydra"]["overrides"]
    assert (result.run_dir / ".hydra" / "overrides.yaml").is_file()
    rows = api.records(result.run_dir)
    assert [r["id"] for r in rows] == ["astronaut", "chelsea"] and rows == result.records()
    assert [r["id"] for r in api.records(result.run_dir, "visualize")] == ["astronaut", "chelsea"]
    typed = result.records(typed=True)
    assert [r.to_dict() for r in typed] == rows
    assert [reg.caption for reg in typed[0].regions] == [reg["caption"] for reg in rows[0]["regions"]]
    ds = result.as_dataset()
    assert ds.num_rows == 2 and ds["id"] == ["astronaut", "chelsea"]
    assert [len(r) for r in ds["regions"]] == [len(r["regions"]) for r in rows]


def test_a_failed_run_raises_with_the_command_lines_message(tmp_path):
    with pytest.raises(RunError, match=r"engine.batch_size must be a whole number >= 1, got 0"):
        api.run([*FAST, "engine.batch_size=0", f"hydra.run.dir={tmp_path / 'run'}"], configure_logging=False)


@pytest.mark.slow  # a whole job
def test_own_config_dir_composes_beside_the_shipped_one(tmp_path):
    conf = tmp_path / "myconf" / "draw"
    conf.mkdir(parents=True)
    (conf / "wide.yaml").write_text("defaults:\n  - /schema/draw/base@_here_\nname: wide\nline_width: 0.05\n")
    result = api.run([*FAST, "draw=wide", f"hydra.run.dir={tmp_path / 'run'}"], config_dir=tmp_path / "myconf",
                     configure_logging=False)
    assert "line_width: 0.05" in (result.run_dir / ".hydra" / "config.yaml").read_text()
    with pytest.raises(FileNotFoundError, match="config_dir=nowhere"):
        api.run(FAST, config_dir="nowhere")


def test_records_name_the_folder_when_it_is_no_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="regioncap run dir"):
        api.records(tmp_path)
    with pytest.raises(ValueError, match="stage='captions'"):
        api.records(tmp_path, "captions")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=5) | st.just([])
                    | st.just({}),
                    lambda inner: st.lists(inner, min_size=1, max_size=3)
                    | st.dictionaries(st.text(max_size=3), inner, min_size=1, max_size=3),
                    max_leaves=6)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.fixed_dictionaries({"id": st.text(max_size=4)}, optional={
    k: JSON for k in ("input", "regions", "error", "score")}), min_size=1, max_size=4))
@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_any_records_become_a_dataset_with_every_field(tmp_path_factory, rows):
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = api.as_dataset(run_dir)
    assert ds.num_rows == len(rows)
    for key in {k for r in rows for k in r}:
        for rec, got in zip(rows, ds[key]):
            # each value as written, or as JSON text where its column holds mixed types
            want = rec.get(key)
            assert got == want or (isinstance(got, str) and json.loads(got) == want) or (
                want == {} and got is None) or _arrow_filled(got, want), (key, got, want)


def _arrow_filled(got, want) -> bool:
    """Arrow gives struct columns every field of the column (missing ones null) and lists of structs the same."""
    if isinstance(want, dict) and isinstance(got, dict):
        return all(_arrow_filled(got.get(k), v) or got.get(k) == v for k, v in want.items()) and all(
            got[k] is None for k in got if k not in want)
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return all(g == w or _arrow_filled(g, w) for g, w in zip(got, want))
    return got == want


def readme_example() -> str:
    """The Python block under the README's "Python API" heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


@pytest.mark.cli
def test_the_api_module_imports_nothing_heavy():
    code = ("import sys, regioncap.api; heavy = {'torch', 'transformers', 'hydra', 'datasets', 'vllm', 'wandb'}; "
            "print(sorted(heavy & set(sys.modules)))")
    # a fresh interpreter: this one has imported everything already
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.cli
@pytest.mark.slow
def test_the_readme_example_runs(tmp_path):
    import os

    proc = subprocess.run([sys.executable, "-c", readme_example()], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (run_dir,) = Path(tmp_path, "outputs").glob("*/*/captions.jsonl")
    assert re.fullmatch(r"\d{2}-\d{2}-\d{2}-\d+-1", run_dir.parent.name), run_dir


@pytest.mark.parametrize("inputs", [
    [{"\x00": []}, {"": None}],            # Arrow cuts a field name at a NUL: the value was lost
    [{"a\x00b": 1, "a\x00c": 2}],          # two names cut to one: Arrow refused to read the column back
])
def test_keys_arrow_cannot_name_stay_json_text(tmp_path, inputs):
    """Found by the property test above: such a column is JSON text, and every value comes back."""
    rows = [{"id": f"r{i}", "input": v} for i, v in enumerate(inputs)]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [json.loads(v) for v in api.as_dataset(tmp_path)["input"]] == inputs
