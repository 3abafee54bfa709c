"""``model=qwen25vl_3b`` runs on ``engine=auto``; the run's first engine line says what it picked and why.

The pick itself (vLLM with CUDA, else transformers) is tested with stand-ins in
tests/test_components.py; here the real command, in the project's venv (no vLLM) and in the
vLLM CPU venv (vLLM but no CUDA). The visualize stage only: the pick is logged before any
engine is built, so no model is needed.
"""

from __future__ import annotations

import re

import pytest

from conftest import run_cli

ARGS = ["model=qwen25vl_3b", "data=demo", "data.limit=1", "stages=[visualize]", "progress=false"]


def first_engine_line(log: str) -> str:
    return next(line for line in log.splitlines() if "engine" in line)


@pytest.mark.cli
@pytest.mark.slow
def test_the_first_engine_line_says_auto_picked_transformers_and_why(tmp_path):
    pytest.importorskip("torch")
    # This venv's own reason: no vLLM here (CI's venv), or vLLM but no CUDA device (a venv that has it).
    has_vllm = __import__("importlib").util.find_spec("vllm") is not None
    why = r"\(vllm installed, but no CUDA device" if has_vllm else r"\(vllm not installed\)"
    proc = run_cli([*ARGS, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, pin=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = first_engine_line(proc.stderr + proc.stdout)
    assert re.search(r"run: model=qwen25vl_3b .* engine=auto -> transformers " + why, line), line


@pytest.mark.vllm
@pytest.mark.slow
def test_with_vllm_but_no_cuda_auto_picks_transformers_and_says_so(tmp_path):
    from vllm_helpers import vllm_env, vllm_python

    proc = run_cli([*ARGS, f"hydra.run.dir={tmp_path / 'run'}"], python=vllm_python(), env=vllm_env(),
                   cwd=tmp_path, pin=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = first_engine_line(proc.stderr + proc.stdout)
    assert "engine=auto -> transformers (vllm installed, but no CUDA device" in line, line
