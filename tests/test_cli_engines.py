"""The whole pipeline through the real vLLM engines, run as a user runs it.

The vLLM tests run `python -m regioncap engine=vllm` with the python of the
vLLM environment (.venv-vllm, CPU build), and `engine=openai` against a real
vLLM OpenAI-compatible server on 127.0.0.1.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from regioncap.records import read_jsonl
from vllm_helpers import TEST_KV_CACHE_BYTES, TEST_MAX_MODEL_LEN, vllm_env, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def check_all_captioned(out):
    records = list(read_jsonl(out / "captions.jsonl"))
    assert [r["id"] for r in records] == ["astronaut", "chelsea", "coffee", "rocket", "grace_hopper"]
    for rec in records:
        assert rec["status"] == "ok", rec["error"]
        # Structured outputs: exactly one answer line per mark, so every region parses.
        assert all(r["caption"] for r in rec["regions"])
        assert rec["requests"][0]["format_ok"]
        assert rec["tokens"]["prompt"] > 0
    return records


def test_openai_engine_against_a_vllm_server_through_the_cli(tmp_path, vllm_server):
    out = tmp_path / "run"
    secret = "sk-planted-secret-0123456789"
    proc = run_cli(
        [f"hydra.run.dir={out}", "engine=openai", f"engine.base_url={vllm_server['base_url']}",
         f"engine.served_model={vllm_server['served_model']}", "engine.structured_outputs=true",
         "engine.api_key_env=REGIONCAP_TEST_KEY", "progress=false"],
        env={"REGIONCAP_TEST_KEY": secret}, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    check_all_captioned(out)
    # The key never reaches any output file or the console.
    assert secret not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_vllm_sweep_runs_each_jobs_engine_in_its_own_process(tmp_path, tiny_model_dir):
    """A real multirun with engine=vllm: each job's caption stage (and so its
    vLLM engine) lives in a spawned process of its own, which exits with it, and
    each job captions every region of the photo demo. (One vLLM start per job is
    the cost of this test, so the whole demo runs here rather than in a single
    run of its own; a single run with engine=vllm: tests/test_shapes_quality.py.)"""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["-m", f"hydra.sweep.dir={sweep}", "engine=vllm", f"model.path={tiny_model_dir}", "engine.enforce_eager=true",
         f"model.max_model_len={TEST_MAX_MODEL_LEN}", f"+engine.extra_args.kv_cache_memory_bytes={TEST_KV_CACHE_BYTES}",
         "progress=false", "max_boxes=2,10"],
        python=vllm_python(), env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    pids = []
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        stages = metrics["stages"]
        assert stages["caption"]["pid"] != stages["visualize"]["pid"]
        pids.append(stages["caption"]["pid"])
        check_all_captioned(sweep / job)
        assert metrics["regions_captioned"] == 18
    assert pids[0] != pids[1]
