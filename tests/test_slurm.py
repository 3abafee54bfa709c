"""SLURM through hydra-submitit-launcher: ``hydra/launcher=slurm`` composes to one GPU per
job with the outputs in the sweep dir, and a sharded sweep run by submitit's local launcher
(each shard a process of its own, as a SLURM job would be) merges into every input row once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli
from regioncap.records import read_jsonl

DEMO = REPO / "regioncap" / "demo" / "demo.jsonl"


def test_slurm_launcher_config_one_gpu_per_job_outputs_in_the_sweep_dir(tmp_path):
    res = run_cli(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}/sweep",
                   "--cfg", "hydra", "--resolve"], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    import yaml

    launcher = yaml.safe_load(res.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (1, 1, 1)
    assert launcher["timeout_min"] == 720 and launcher["partition"] == "gpu" and launcher["account"] is None
    assert launcher["submitit_folder"] == f"{tmp_path}/sweep/.submitit/%j"


@pytest.mark.slow
def test_sharded_sweep_on_submitit_local_merges_to_every_row_once(tmp_path, tiny_model_dir):
    sweep, merged = tmp_path / "sweep", tmp_path / "merged"
    t0 = time.perf_counter()
    # resume=true from the start: a SLURM job that is requeued (preemption, max_num_timeout)
    # runs again into its own shard dir and goes on from its last commit.
    res = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "data.num_shards=2",
                   "data.shard_index=range(2)", "model=tiny", f"model.path={tiny_model_dir}", "engine=transformers",
                   "data=demo", "sampling.max_tokens=8", "progress=false", "resume=true",
                   f"hydra.sweep.dir={sweep}"], timeout=600)
    took = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    shards = [sweep / "0", sweep / "1"]
    # Each shard ran as its own submitit job, in a process of its own, its logs in the sweep dir.
    pids = {json.loads((s / "metrics.json").read_text())["stages"]["caption"]["pid"] for s in shards}
    assert len(pids) == 2
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2
    merge = subprocess.run([sys.executable, "-m", "regioncap.merge", "--out", str(merged), *map(str, shards)],
                           capture_output=True, text=True, timeout=120, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert merge.returncode == 0, merge.stderr
    want = [json.loads(line)["id"] for line in DEMO.read_text().splitlines() if line.strip()]
    got = list(read_jsonl(merged / "captions.jsonl"))
    assert [r["index"] for r in got] == list(range(len(want)))
    assert [r["id"] for r in got] == want
    assert all(r["status"] != "pending" for r in got)
    summary = json.loads((merged / "merge.json").read_text())
    assert summary["status"] == "ok" and summary["expected"] == len(want)
    print(f"submitit_local: 2 shards of {len(want)} rows, sweep {took:.1f}s")
