"""Shared helpers and fixtures for the tests that run the real vLLM (CPU build).

vLLM lives in its own virtual environment (``.venv-vllm``, made by
``scripts/setup_vllm.sh``): the test process itself never imports vllm. Tests
run vLLM code in that environment's python, either as a script (the offline
engine) or as ``python -m vllm.entrypoints.openai.api_server`` (the server).

A missing vLLM environment FAILS these tests with instructions; it does not
skip them, so a CI job that is meant to test vLLM cannot pass silently.
Deselect them with ``-m "not vllm"`` where vLLM is not wanted.

Import this module from a test module (``from vllm_helpers import ...``) to
get its fixtures; ``tiny_model_dir`` comes from ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Context length and KV cache given to vLLM in tests. vLLM's CPU backend
#: otherwise sizes the KV cache from ``gpu_memory_utilization`` x RAM (20 GiB
#: here) and spends half a minute allocating it.
TEST_MAX_MODEL_LEN = 1024
TEST_KV_CACHE_BYTES = 64 * 1024 * 1024

#: The tiny model's pixel budget (regioncap.tiny: 56x56 .. 224x224).
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 224 * 224

SERVER_START_TIMEOUT_S = 240.0

#: Prefix of the one stdout line a script run by ``run_vllm_script`` answers with.
RESULT_MARKER = "REGIONCAP_RESULT "


def vllm_python() -> str:
    """Path of the vLLM environment's python (``$REGIONCAP_VLLM_PYTHON`` or ``.venv-vllm/bin/python``).

    Fails the calling test, with what to do, when it does not exist.
    """
    configured = os.environ.get("REGIONCAP_VLLM_PYTHON")
    path = Path(configured) if configured else REPO / ".venv-vllm" / "bin" / "python"
    if not path.exists():
        where = f"$REGIONCAP_VLLM_PYTHON={configured}" if configured else str(path)
        pytest.fail(
            f"no vLLM environment: {where} does not exist. Run `scripts/setup_vllm.sh` to make "
            "`.venv-vllm` (or point REGIONCAP_VLLM_PYTHON at a python that has vllm), or "
            "deselect these tests with `-m \"not vllm\"`.",
            pytrace=False,
        )
    return str(path)


def vllm_env(**extra: str) -> Dict[str, str]:
    """Environment for a vLLM subprocess: repo on PYTHONPATH, offline, quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 60) -> str:
    """The last ``n`` lines of a log file (for failure messages)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(lines[-n:])


def run_vllm_script(script: str, payload: Dict[str, Any], *, timeout: float = 300.0,
                    env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run ``script`` (python source) in the vLLM environment with ``payload`` as JSON on stdin.

    The script prints one line ``RESULT_MARKER<json>``; that object is returned
    (vLLM logs to stdout too, so the marker finds it). The test fails with the
    script's output tail when it exits non-zero or prints no result.
    """
    proc = subprocess.run(
        [vllm_python(), "-c", script],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or vllm_env(),
        cwd=str(REPO),
    )
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not found:
        pytest.fail(
            f"vLLM script exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-8000:]}",
            pytrace=False,
        )
    return json.loads(found[-1][len(RESULT_MARKER):])


def server_command(model_dir: Path, port: int, served_model: str) -> List[str]:
    """``python -m vllm.entrypoints.openai.api_server`` for the tiny model on 127.0.0.1."""
    return [
        vllm_python(), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",
        "--max-model-len", str(TEST_MAX_MODEL_LEN),
        "--kv-cache-memory-bytes", str(TEST_KV_CACHE_BYTES),
        "--enforce-eager",
        "--seed", "0",
        "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
        "--mm-processor-kwargs", json.dumps({"min_pixels": TINY_MIN_PIXELS, "max_pixels": TINY_MAX_PIXELS}),
        "--disable-log-stats",
        "--uvicorn-log-level", "warning",
    ]


def wait_for_health(base: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> float:
    """Poll ``base/health`` until it answers 200; fail with the log tail if the server dies or is late."""
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vLLM server exited with {proc.returncode} while starting; log tail:\n"
                        f"{tail(log_path)}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"vLLM server not healthy after {timeout_s:.0f} s; log tail:\n{tail(log_path)}",
                        pytrace=False)
        time.sleep(0.5)


def stop_process(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM, wait, then SIGKILL; the server shuts its engine process down on SIGTERM.

    Only for a process started with ``start_new_session=True``.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    # The server was started in its own session (process group id = its pid): end
    # whatever of that group outlived it (an orphaned engine-core process).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    """``vllm serve`` (the OpenAI API server) on the tiny model, for the whole session."""
    vllm_python()  # fail fast, before anything is built, when there is no vLLM environment
    port = free_port()
    served = "tiny-qwen2.5-vl"
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            server_command(tiny_model_dir, port, served),
            stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), cwd=str(REPO),
            start_new_session=True,  # a Ctrl-C in pytest does not hit the server first
        )
    base = f"http://127.0.0.1:{port}"
    try:
        start_s = wait_for_health(base, proc, log_path, SERVER_START_TIMEOUT_S)
        yield {
            "base_url": f"{base}/v1",
            "served_model": served,
            "max_model_len": TEST_MAX_MODEL_LEN,
            "start_s": start_s,
            "log": log_path,
            "proc": proc,
        }
    finally:
        stop_process(proc)


def make_tiny_images(folder: Path) -> List[str]:
    """Three small RGB images at sizes the tiny model takes as they are (multiples of 28)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (size, colour) in enumerate([((112, 84), "red"), ((56, 56), "blue"), ((140, 112), "green")]):
        im = Image.new("RGB", size, (235, 235, 225))
        d = ImageDraw.Draw(im)
        d.rectangle([size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4], fill=colour)
        path = folder / f"img{i}.{'png' if i == 1 else 'jpg'}"
        im.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> List[str]:
    """Three small images (JPEG, PNG, JPEG) for the vLLM tests."""
    return make_tiny_images(tmp_path_factory.mktemp("vllm_images"))
