"""Sweeps with the real Hydra plugins: objectives by metric path, the joblib launcher,
the Optuna sweeper on a quality metric, experiments that carry their own sweep, and
the sweep report when jobs fail."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

FAST = ["engine=fake", "model=tiny", "data=demo", "progress=false"]


def _jobs(sweep):
    return sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())


@pytest.mark.cli
def test_sweep_report_is_written_when_a_job_fails(tmp_path):
    sweep = tmp_path / "sweep"
    # fail_keys makes the fake engine fail one photo of five: over max_error_rate=0.1 that job fails.
    proc = run_cli(["-m", *FAST, "engine.fail_keys=[coffee]", "max_error_rate=0.5,0.1", f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path)
    assert proc.returncode != 0  # Hydra reports the failed job
    jobs = _jobs(sweep)
    assert len(jobs) == 2
    statuses = {json.loads((j / "manifest.json").read_text())["status"] for j in jobs}
    assert statuses == {"ok", "failed"}
    html = (sweep / "report.html").read_text()
    assert "over max_error_rate" in html  # the failed job is marked
    assert "max_error_rate=0.1" in html and "max_error_rate=0.5" in html


@pytest.mark.cli
def test_objective_is_checked_before_any_work(tmp_path):
    proc = run_cli([*FAST, "objective=references.exact_matc", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "did you mean references.exact_match" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "visualize.jsonl").exists()


@pytest.mark.cli
def test_experiment_carries_its_own_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "experiment=marks_vs_crops", *FAST, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(sweep)
    prompts = sorted(json.loads((j / "manifest.json").read_text())["config"]["prompt"]["name"] for j in jobs)
    assert prompts == ["coords", "crop", "marked"]
    assert (sweep / "report.html").is_file()


@pytest.mark.cli
def test_joblib_launcher_runs_jobs_in_parallel_workers(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST, "workers=1", "max_boxes=2,3",
                    "objective=regions_captioned", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "cannot find context" not in log and "BrokenProcessPool" not in log
    # Each job ran in a loky worker and still prepared its images in a worker process.
    assert "a joblib/loky worker" in log
    assert "image preparation in 1 worker process(es)" in log
    for job in _jobs(sweep):
        assert json.loads((job / "metrics.json").read_text())["regions_captioned"] == 18
    assert (sweep / "report.html").is_file()


@pytest.mark.cli
@pytest.mark.slow
def test_optuna_sweeper_maximises_a_quality_metric_on_the_shapes_model(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=maximize",
                    "hydra.sweeper.sampler.seed=0", "max_boxes=choice(1,10)",
                    "objective=references.exact_match", "data.limit=2", "progress=false",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path, pin=False, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in best
    values = [json.loads((j / "metrics.json").read_text())["references"]["exact_match"] for j in _jobs(sweep)]
    assert len(values) == 2 and all(v is not None for v in values)
    assert f"best_value: {max(values)}" in best


@pytest.mark.cli
@pytest.mark.slow
def test_hparams_search_optuna_runs_the_shipped_study(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", "engine=fake", "data.limit=1",
                    "progress=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, pin=False, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in best and all(k in best for k in ("prompt:", "draw:", "max_boxes:"))
    jobs = _jobs(sweep)
    assert len(jobs) == 1
    for job in jobs:
        # the shipped search space and objective (conf/hparams_search/optuna.yaml)
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        assert all(f"- {k}=" in overrides for k in ("prompt", "draw", "max_boxes")), overrides
        assert "objective: references.exact_match" in (job / ".hydra" / "config.yaml").read_text()
