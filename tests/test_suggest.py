""""Did you mean" for misspelt groups, options and top-level keys (regioncap.suggest)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CONF_DIR, run_cli
from regioncap.config import RegionCapConfig
from regioncap.suggest import config_dirs, groups_and_options, missing_plugins, suggestions, top_level_keys

GROUPS = groups_and_options([CONF_DIR])
KEYS = top_level_keys(RegionCapConfig)


def suggest(*overrides: str):
    return suggestions(list(overrides), GROUPS, KEYS)


#: The shipped prompt options, as the suggestion lists them.
PROMPTS = ", ".join(sorted(p.stem for p in (CONF_DIR / "prompt").glob("*.yaml")))


@pytest.mark.parametrize("override,line", [
    ("promt=crop", "did you mean prompt=crop? ('promt' is no config group or top-level option)"),
    ("prompt=crops", f"did you mean prompt=crop? (prompt has no option 'crops'; its options: {PROMPTS})"),
    ("max_boxs=3", "did you mean max_boxes=3? ('max_boxs' is no config group or top-level option)"),
    ("modle.path=/models/q", "did you mean model.path=/models/q? ('modle' is no config group or top-level option)"),
    ("promt=crops", "did you mean prompt=crop? ('promt' is no config group or top-level option)"),
    ("prompt=marked,crops", f"did you mean prompt=marked,crop? (prompt has no option 'crops'; its options: {PROMPTS})"),
    ("prompt=choice(marked,crops)", "did you mean prompt=choice(marked,crop)? (prompt has no option 'crops'; "
                                    f"its options: {PROMPTS})"),
    ("+max_boxs=3", "did you mean +max_boxes=3? ('max_boxs' is no config group or top-level option)"),
    ("experimnt=marks_vs_crop", "did you mean experiment=marks_vs_crops? ('experimnt' is no config group or "
                                "top-level option)"),
])
def test_a_misspelling_gets_one_line(override, line):
    assert suggest(override) == [line]


def test_nothing_for_what_is_right_or_far_from_anything():
    right = [f"{g}={o}" for g, opts in GROUPS.items() if "/" not in g for o in opts]
    right += [f"{k}=1" for k in KEYS] + ["experiment=null", "hydra.run.dir=out", "hydra/launcher=joblib",
                                         "model.path=/m", "~logger", "max_boxes=range(1,4)", "data.limit=2"]
    assert suggest(*right) == []
    assert suggest("zzzzzz=1", "prompt=qqqqqqq") == []


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.=,+~()", max_size=30))
def test_any_argument_gives_at_most_one_line_and_never_raises(arg):
    assert len(suggest(arg)) <= 1


def test_own_config_dirs_and_search_paths_count(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name: mine\n")
    dirs = config_dirs(["--config-dir", str(tmp_path), "model=mine"], str(CONF_DIR))
    shipped = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    assert suggestions(["model=mine", "model=mien"], groups_and_options(dirs), KEYS) == [
        f"did you mean model=mine? (model has no option 'mien'; its options: {', '.join(sorted(['mine', *shipped]))})"]
    assert config_dirs([f"hydra.searchpath=[file://{tmp_path}]"], str(CONF_DIR))[-1] == tmp_path
    # A search path whose options cannot be listed: no guesses.
    assert config_dirs(["hydra.searchpath=[pkg://myconf]"], str(CONF_DIR)) is None


def test_an_option_whose_plugin_is_missing_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_optuna") else real(name, *a))
    assert missing_plugins(["-m", "hparams_search=optuna", "hydra/sweeper=optuna", "prompt=crop"]) == [
        'hparams_search=optuna needs hydra-optuna-sweeper, which is not installed: pip install "regioncap[optuna]"',
        'hydra/sweeper=optuna needs hydra-optuna-sweeper, which is not installed: pip install "regioncap[optuna]"']
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if real("hydra_plugins.hydra_optuna_sweeper") is not None:
        assert missing_plugins(["hparams_search=optuna"]) == []


@pytest.mark.cli
def test_the_line_comes_before_hydras_error(tmp_path):
    proc = run_cli(["promt=crop"], cwd=tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0
    assert lines[0] == "did you mean prompt=crop? ('promt' is no config group or top-level option)"
    assert "Could not override 'promt'" in proc.stderr
    proc = run_cli(["prompt=crops"], cwd=tmp_path)
    assert proc.stderr.splitlines()[0].startswith("did you mean prompt=crop?")
    assert "Could not find 'prompt/crops'" in proc.stderr


@pytest.mark.parametrize("override", ["engine=null", "prompt=null", "+experiment=null", "prompt=marked,null",
                                      "logger=choice(none,null)"])
def test_a_group_set_to_null_is_one_line_naming_its_options(override, capsys):
    """engine=null made Hydra stop with a ValueError traceback ("Config group override must be a string")."""
    from regioncap.suggest import null_groups, print_suggestions

    group = override.lstrip("+").split("=")[0]
    assert null_groups([override], GROUPS) == [
        f"{group}=null: {group} is a config group; pick one of its options: {', '.join(sorted(GROUPS[group]))}"]
    assert print_suggestions(["engine=fake", override], str(CONF_DIR), RegionCapConfig) is False
    assert "is a config group; pick one of its options" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["engine=fake", "~experiment", "model.path=null", "objective=null",
                                      "prompt.system=null"])
def test_null_values_of_settings_are_left_to_the_schema(override):
    from regioncap.suggest import null_groups, print_suggestions

    assert null_groups([override], GROUPS) == []
    assert print_suggestions([override], str(CONF_DIR), RegionCapConfig) is True
