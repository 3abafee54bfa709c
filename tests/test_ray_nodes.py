"""``executor=ray`` over two Ray nodes on this machine: a head node and a second node
joined to it with ``ray start --address``, one CPU each, and a run that joins them at
``executor.address`` with one replica per node. Every row comes back once, and both
nodes captioned rows (the manifest names each replica's node).

The nodes are stopped by their process ids (each ``ray start --block`` leads its own
process group), never with ``ray stop``: that stops every Ray process of the user on
the machine, other people's clusters included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from conftest import REPO, requires, run_cli
from regioncap.records import read_jsonl
from test_pipeline import make_image, write_rows

pytestmark = [requires("ray"), pytest.mark.slow, pytest.mark.cli]

#: ``ray`` beside the interpreter running the tests (the virtual environment's), else on PATH.
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else \
    (shutil.which("ray") or "ray")
#: How long a node may take to come up on a busy 2-core machine.
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(name: str, args: List[str], temp: Path, env: Dict[str, str],
               procs: List[subprocess.Popen]) -> None:
    """``ray start --block`` with one CPU and its own temp dir, in a process group of its own; returns once it is up."""
    log = temp / f"{name}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [RAY, "start", "--num-cpus=1", "--block", "--disable-usage-stats", f"--temp-dir={temp / name}",
             # The agent's port is fixed by default: two nodes on one machine would both ask for it.
             f"--dashboard-agent-listen-port={free_port()}", *args],
            env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"ray node {name} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_nodes(procs: List[subprocess.Popen], temp: Path) -> None:
    """Kill each node's process group, then any process still naming the nodes' temp dir (a worker
    in a group of its own), and wait for them."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.wait(timeout=60)
    for _ in range(50):
        left = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if str(temp).encode() in (entry / "cmdline").read_bytes():
                    left.append(int(entry.name))
            except OSError:
                continue
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"Ray processes of the test's nodes still run: {left}")


@pytest.fixture
def two_nodes() -> Iterator[Tuple[str, Dict[str, str]]]:
    """A head node and a second node (one CPU each) on this machine: ``(address, env)`` to join them."""
    # Short: Ray's socket paths live under it, and a Unix socket path has at most 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="rcray"))
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(REPO))  # the nodes' workers import this checkout's regioncap
    # The cluster's own token (Ray's token authentication), not one a user keeps in their home.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    port = free_port()
    procs: List[subprocess.Popen] = []
    try:
        start_node("head", ["--head", f"--port={port}", "--include-dashboard=false"], temp, env, procs)
        start_node("node", [f"--address=127.0.0.1:{port}"], temp, env, procs)
        yield f"127.0.0.1:{port}", env
    finally:
        try:
            stop_nodes(procs, temp)
        finally:
            shutil.rmtree(temp, ignore_errors=True)


def test_two_nodes_every_row_once_and_rows_on_both(tmp_path, two_nodes):
    address, env = two_nodes
    img = make_image(tmp_path / "a.png", size=(320, 240))
    n = 24
    rows = write_rows(tmp_path / "rows.jsonl", [{"id": f"r{i}", "image": str(img), "bbox": [[10, 20, 40, 40]]}
                                                 for i in range(n)])
    out = tmp_path / "run"
    t0 = time.perf_counter()
    res = run_cli(["executor=ray", f"executor.address={address}", "executor.num_replicas=2", "executor.num_cpus=1",
                   "executor.batch_size=3", "engine=fake", "data=jsonl", f"data.path={rows}", "progress=false",
                   f"hydra.run.dir={out}"], env=env, timeout=300)
    took = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    got = [r["index"] for r in read_jsonl(out / "captions.jsonl")]
    assert got == list(range(n))
    replicas = json.loads((out / "manifest.json").read_text())["engine"]["describe"]["replicas"]
    # One replica on each node (one CPU each), and each captioned rows: every row once in all.
    assert len({r["node_id"] for r in replicas}) == 2
    assert all(r["rows"] > 0 for r in replicas) and sum(r["rows"] for r in replicas) == n
    startup = json.loads((out / "metrics.json").read_text())["stages"]["caption"]["startup"]
    assert startup["engines"] == 2 and startup["cluster_start_s"] >= 0 and startup["replicas_start_s"] > 0
    print(f"two Ray nodes: {n} rows, {took:.1f}s for the run; joining the cluster {startup['cluster_start_s']:.2f}s, "
          f"replicas up {startup['replicas_start_s']:.2f}s, rows per node {[r['rows'] for r in replicas]}")
