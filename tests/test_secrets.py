"""No secret in any file a run writes: Hydra's own files, the sweep's, the log, W&B's.

One redaction (regioncap.manifest.redact / redact_string) applied everywhere:
``.hydra/*.yaml`` and ``multirun.yaml`` are masked as parsed YAML and dumped
again (so folding cannot hide a value), log records go through a filter on
the handlers, W&B gets the masked config.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from regioncap.manifest import REDACTED, mask_yaml_file, redact, redact_string, secret_values
from regioncap.redaction import SecretFilter, install_log_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))

PASSWORD = "p4ssw0rdXYZ"
QUERY_KEY = "QUERYKEY123456"
LONG = ("a long secret with spaces that YAML folds over two lines once it is past the width limit of "
        "eighty columns FOLDEDSECRET")
#: Every piece a file must not hold.
NEEDLES = [PASSWORD, QUERY_KEY, "KEYPARAM98765", "TOKENPARAM4321", "FOLDEDSECRET"]
OVERRIDES = [
    f"+notes.base_url='http://user:{PASSWORD}@127.0.0.1:9/v1?api_key={QUERY_KEY}&key=KEYPARAM98765"
    "&token=TOKENPARAM4321'",
    f"+notes.extra_token='{LONG}'",
]


def _leaks(root: Path) -> list:
    """Every (file, needle) under ``root`` where the file's bytes hold the needle."""
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [(str(path.relative_to(root)), n) for n in NEEDLES if n.encode() in data]
    return hits


def test_redact_string_masks_urls_queries_and_assignments():
    text = (f"GET http://user:{PASSWORD}@h/v1?api_key={QUERY_KEY}&model=m&token=TOKENPARAM4321 "
            f"+engine.extra_token='{LONG}' max_tokens=5")
    out = redact_string(text)
    assert not any(n in out for n in NEEDLES), out
    assert "model=m" in out and "max_tokens=5" in out and f"http://{REDACTED}@h/v1" in out
    # Known values are found anywhere, whatever surrounds them.
    assert redact_string(f"error: bad key {QUERY_KEY}.", [QUERY_KEY]) == f"error: bad key {REDACTED}."
    # The URL parts of a config are known secrets too (for text where the URL is gone).
    found = secret_values({"engine": {"base_url": f"http://user:{PASSWORD}@h/?key=KEYPARAM98765"}})
    assert PASSWORD in found and "KEYPARAM98765" in found


def test_yaml_masking_survives_folding(tmp_path):
    """A text search misses a long value YAML folded over two lines; masking the parsed file does not."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"engine": {"note": LONG, "api_token": LONG}, "list": [f"x={LONG}"]}, width=80))
    assert "FOLDEDSECRET" in path.read_text() and LONG not in path.read_text()  # folded
    assert mask_yaml_file(path, [LONG])
    text = path.read_text()
    assert "FOLDEDSECRET" not in text
    data = yaml.safe_load(text)
    assert data == {"engine": {"note": REDACTED, "api_token": REDACTED}, "list": [f"x={REDACTED}"]}
    assert not mask_yaml_file(path, [LONG])  # nothing left to mask: the file is left alone


def test_log_filter_masks_messages_arguments_and_tracebacks():
    logger = logging.getLogger("regioncap")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    try:
        install_log_filter([LONG])
        logger.warning("connecting to %s", f"http://user:{PASSWORD}@h/v1?api_key={QUERY_KEY}")
        logger.warning("the note was %r", {"note": LONG})
        try:
            raise ValueError(f"server said token=TOKENPARAM4321 for {LONG}")
        except ValueError:
            logger.exception("request failed")
        install_log_filter([LONG])  # a second job's filter replaces the first
        assert sum(isinstance(f, SecretFilter) for f in handler.filters) == 1
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "connecting to http://" in out and "ValueError" in out
    assert not any(n in out for n in NEEDLES), out


def test_redact_keeps_non_secrets():
    cfg = {"engine": {"api_key_env": "OPENAI_API_KEY", "max_tokens": 5, "base_url": "http://h:8000/v1"}}
    assert redact(cfg) == cfg
    assert redact({"engine": {"hf_token": "abc", "nested": [{"password": 1}]}}) == {
        "engine": {"hf_token": REDACTED, "nested": [{"password": REDACTED}]}}


@pytest.mark.cli
def test_single_run_writes_no_secret_anywhere(tmp_path):
    """engine=fake, logger=wandb offline: every file under the run dir (Hydra's, the log,
    the manifest, the report, W&B's offline run) is free of every piece of the secrets."""
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_DATA_DIR": str(tmp_path / "wb"),
           "WANDB_CACHE_DIR": str(tmp_path / "wb"), "WANDB_CONFIG_DIR": str(tmp_path / "wb"), "WANDB_API_KEY": ""}
    proc = run_cli([f"hydra.run.dir={out}", "engine=fake", "logger=wandb", "workers=0", "data.limit=2",
                    *OVERRIDES], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "regioncap.log").is_file() and list(out.glob("wandb/*/files"))
    assert _leaks(out) == [] and _leaks(tmp_path / "wb") == []
    assert not any(n in proc.stdout + proc.stderr for n in NEEDLES)
    # Hydra's files are still YAML and say where a value was masked.
    overrides = yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text())
    assert f"+notes.extra_token={REDACTED}" in overrides
    assert yaml.safe_load((out / ".hydra" / "config.yaml").read_text())["notes"]["extra_token"] == REDACTED


@pytest.mark.cli
def test_sweep_writes_no_secret_anywhere(tmp_path):
    """A two-job multirun: the jobs' dirs (with the CSV tracker's files, which hold the config and the
    run names, as every tracker is handed them), the sweep's multirun.yaml, table and report hold no secret."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", f"hydra.sweep.dir={sweep}", "engine=fake", "seed=0,1", "workers=0", "data.limit=2",
                    "logger=csv", *OVERRIDES], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "multirun.yaml").is_file() and (sweep / "report.html").is_file()
    assert (sweep / "metrics.csv").is_file() and (sweep / "1" / "csv" / "config.csv").is_file()
    assert (sweep / "1" / ".hydra" / "config.yaml").is_file()
    assert _leaks(sweep) == []
    multirun = yaml.safe_load((sweep / "multirun.yaml").read_text())
    assert f"+notes.extra_token={REDACTED}" in multirun["hydra"]["overrides"]["task"]


@pytest.mark.cli
def test_openai_run_logs_one_engine_line_and_no_secret(tmp_path):
    """engine=openai against a local server with credentials in base_url: the engine is
    logged as one readable line, no per-request HTTP line, no secret in any file."""
    from test_engine_openai import ServerState, make_handler

    state = ServerState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = server.server_address[1]
    out = tmp_path / "run"
    try:
        proc = run_cli([f"hydra.run.dir={out}", "engine=openai", f"engine.base_url=http://user:{PASSWORD}@127.0.0.1:{port}/v1",
                        "engine.served_model=tiny", "max_error_rate=1.0", "workers=0", "data.limit=2"],
                       env={"OPENAI_API_KEY": QUERY_KEY}, cwd=tmp_path, timeout=240)
    finally:
        state.stop.set()
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(state.hits.values()) >= 2  # the run did talk to the server
    log = proc.stdout + proc.stderr
    engine_lines = [line for line in log.splitlines() if "engine: openai" in line or "openai engine:" in line]
    assert len(engine_lines) == 1, engine_lines
    line = engine_lines[0]
    assert "engine: openai base_url=http://" in line and "model=tiny" in line and "concurrency=" in line
    assert "api_key_set=True" in line and "{" not in line, line
    assert "HTTP Request:" not in log and "HTTP Request:" not in (out / "regioncap.log").read_text()
    assert _leaks(out) == [] and not any(n in log for n in NEEDLES)
