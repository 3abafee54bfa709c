"""`regioncap --help`: the groups users pick, every top-level option, examples; no schema groups, no test engine."""

from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import CONF_DIR, run_cli
from regioncap.config import RegionCapConfig

#: Options that exist for the tests only.
HIDDEN = {("engine", "fake")}


@pytest.fixture(scope="module")
def help_text(tmp_path_factory):
    proc = run_cli(["--help"], cwd=tmp_path_factory.mktemp("help"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.cli
def test_help_lists_the_groups_users_pick(help_text):
    assert "schema/" not in help_text
    assert "fake" not in help_text
    groups = {line.split()[0]: line for line in help_text.splitlines() if re.match(r"^[a-z_/]+ {2,}", line)}
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        assert group_dir.name in groups, group_dir.name
        # the group's line and its continuation lines up to the next group
        block = help_text.split(groups[group_dir.name], 1)[1].split("\n\n", 1)[0]
        block = groups[group_dir.name] + block
        for option in sorted(p.stem for p in group_dir.glob("*.yaml")):
            if (group_dir.name, option) not in HIDDEN:
                assert re.search(rf"\b{option}\b", block), f"{group_dir.name}={option} is not in --help"


@pytest.mark.cli
def test_help_lists_every_top_level_option_and_examples(help_text):
    options = help_text.split("== Top-level options", 1)[1].split("== Examples", 1)[0]
    for f in dataclasses.fields(RegionCapConfig):
        if f.name in ("model", "engine", "data", "draw", "prompt", "logger", "executor", "propose", "output_dir"):
            continue  # groups (listed above) and the run dir (hydra.run.dir)
        assert re.search(rf"^\s*{f.name}[.=]|\s{f.name}[.=]", options, re.M), f"{f.name} is not in --help"
    examples = help_text.split("== Examples ==", 1)[1]
    assert "regioncap -m experiment=marks_vs_crops" in examples and "engine=vllm" in examples
    assert "--hydra-help" in help_text
