"""print_config=true (the composed config as a tree), debug=default, and a config's sweep run without -m."""

from __future__ import annotations

import io
import re

import pytest

from conftest import compose, run_cli
from regioncap.config_tree import print_config_tree
from regioncap.job import config_dict, job_start, unswept_hint


def test_the_tree_shows_every_section_with_its_option_and_the_top_level_options():
    cfg = compose(["prompt=crop", "max_boxes=3"], output_dir="out")
    buf = io.StringIO()
    print_config_tree(config_dict(cfg), {"model": "tiny", "prompt": "crop"}, file=buf)
    text = buf.getvalue()
    assert text.splitlines()[0] == "config"
    assert "model=tiny" in text and "prompt=crop" in text and "max_boxes: 3" in text
    # groups first, in the order a user picks them, then the other sections, then the options
    order = [text.index(s) for s in ("model=tiny", "── engine", "── data", "prompt=crop", "── sampling",
                                     "── options")]
    assert order == sorted(order)


def test_print_config_prints_at_job_start_with_secrets_masked(capsys):
    cfg = compose(["engine=vllm", "+engine.extra_args.hf_token=hf_abc123", "print_config=true"], output_dir="out")
    job_start(cfg)
    out = capsys.readouterr().out
    assert "engine" in out and "hf_token" in out and "hf_abc123" not in out
    job_start(compose(["engine=fake"], output_dir="out"))  # print_config=false (the default): nothing
    assert capsys.readouterr().out == ""


def test_outside_a_hydra_run_there_is_no_sweep_to_warn_of():
    assert unswept_hint(compose(["experiment=marks_vs_crops"], output_dir="out")) is None


@pytest.mark.cli
def test_debug_preset_prints_the_tree_and_a_sweep_without_m_says_how_to_run_it(tmp_path):
    proc = run_cli(["debug=default", "experiment=marks_vs_crops", f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path, pin=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # debug=default: the tree first, the fake engine, two rows
    assert out.splitlines()[0] == "config" and "├── engine=fake" in out and "limit: 2" in out
    log = proc.stderr + out
    assert re.search(r"experiment=marks_vs_crops carries a sweep \(prompt=marked,crop,coords\) that runs only "
                     r"with -m: this is one job.*For the sweep: .*regioncap -m debug=default experiment=marks_vs_crops", log)
    assert "rows 2: ok 2" in log
