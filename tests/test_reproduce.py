"""``python -m regioncap.reproduce`` on real runs, as a user runs it (subprocesses, real Hydra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from regioncap import manifest as mf
from regioncap.data import fingerprint_file
from regioncap.records import read_jsonl


def run_reproduce(args, *, cwd, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "regioncap.reproduce", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(cwd))


def assert_manifest(run_dir: Path) -> None:
    """Every job writes its manifest (job.py); reproduce relies on it."""
    assert (run_dir / mf.MANIFEST_FILE).is_file(), f"no manifest.json in {run_dir}"


def demo_copy(tmp_path: Path) -> Path:
    """demo.jsonl copied out of the package, its image paths made absolute."""
    images = REPO / "regioncap" / "demo"
    rows = [json.loads(line) for line in (images / "demo.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        row["image"] = str(images / row["image"])
    path = tmp_path / "data" / "rows.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_reproduce_tiny_model_run_then_refuse_changed_data(tmp_path, tiny_model_dir):
    data = demo_copy(tmp_path)
    run = tmp_path / "run"
    proc = run_cli([f"hydra.run.dir={run}", f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={data}",
                    "data.limit=2", "progress=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_manifest(run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["sha256"] == fingerprint_file(data)

    other = tmp_path / "other"
    proc = run_reproduce([run, "--out", other], cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "input data unchanged" in log and "IDENTICAL" in log
    a = [[r["caption"] for r in rec["regions"]] for rec in read_jsonl(run / "captions.jsonl")]
    b = [[r["caption"] for r in rec["regions"]] for rec in read_jsonl(other / "captions.jsonl")]
    assert a == b and len(a) == 2 and all(all(c for c in row) for row in a)
    assert (other / ".hydra" / "overrides.yaml").is_file()
    report = json.loads((other / "reproduction.json").read_text())
    assert report["comparison"]["identical"] and report["exit_status"] == 0

    # The data file changes after the run: refused, naming the file and both hashes; --force runs anyway.
    old = fingerprint_file(data)
    data.write_text(data.read_text().replace("[150, 15, 150, 150]", "[151, 15, 150, 150]"))
    new = fingerprint_file(data)
    proc = run_reproduce([run, "--out", tmp_path / "third"], cwd=tmp_path)
    assert proc.returncode == 2
    assert str(data) in proc.stderr and old in proc.stderr and new in proc.stderr
    assert not (tmp_path / "third").exists()


def test_reproduce_a_multirun_job_and_report_differences(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "engine=fake", "max_boxes=2,10", "data.limit=2", f"hydra.sweep.dir={sweep}",
                    "progress=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = sweep / "1"
    assert "max_boxes=10" in (job / ".hydra" / "overrides.yaml").read_text()
    assert_manifest(job)

    # The sweep dir itself is refused with a pointer to its jobs.
    proc = run_reproduce([sweep], cwd=tmp_path)
    assert proc.returncode == 2 and str(sweep / "0") in proc.stderr

    proc = run_reproduce([job], cwd=tmp_path)  # default --out: next to the job dir
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (out,) = [p for p in sweep.iterdir() if p.name.startswith("1-reproduced-")]
    assert len(list(read_jsonl(out / "captions.jsonl"))) == 2

    # An extra override that changes the chunks changes the captions: exit 3, differences listed.
    proc = run_reproduce([job, "max_boxes=2", "--out", tmp_path / "changed", "--show", "2"], cwd=tmp_path)
    assert proc.returncode == 3, (proc.stdout + proc.stderr)[-3000:]
    assert "DIFFERENT" in proc.stdout and "region 1" in proc.stdout
    report = json.loads((tmp_path / "changed" / "reproduction.json").read_text())
    assert report["comparison"]["n_differences"] > 0 and len(report["comparison"]["differences"]) == 2


@pytest.mark.cli
def test_the_reproduction_runs_this_source_even_from_another_checkout(tmp_path):
    # A launch folder that holds another regioncap (main's checkout, for a run made there)
    # must not shadow the source of the tool that reproduces; the folder's own modules still import.
    from regioncap.reproduce import regioncap_env

    (tmp_path / "regioncap").mkdir()
    (tmp_path / "regioncap" / "__init__.py").write_text("")
    (tmp_path / "mine.py").write_text("X = 1\n")
    out = subprocess.run([sys.executable, "-c", "import mine, regioncap; print(regioncap.__file__)"], cwd=tmp_path,
                         env=regioncap_env(str(tmp_path)), capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).parent == REPO / "regioncap"
