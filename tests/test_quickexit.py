"""regioncap.quickexit: the command ends with its exit code once every other exit handler ran."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from regioncap.quickexit import exit_code

SCRIPT = """
import atexit, sys
from regioncap import quickexit
quickexit.arm()
atexit.register(lambda: print("other handler ran", flush=True))
class Last:
    def __del__(self):
        print("teardown ran", flush=True)
keep = Last()
sys.stdout.write("unflushed output")
{body}
"""


def _run(body: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(body=body)], capture_output=True, text=True,
                          cwd=str(REPO), env={"PYTHONPATH": str(REPO), **env}, timeout=60)


@pytest.mark.cli
@pytest.mark.parametrize("code", [0, 3])
def test_done_ends_with_its_code_after_the_other_handlers(code):
    proc = _run(f"quickexit.done({code})")
    assert proc.returncode == code
    assert "unflushed output" in proc.stdout and "other handler ran" in proc.stdout  # flushed, handlers ran
    assert "teardown ran" not in proc.stdout  # the interpreter's teardown was skipped


@pytest.mark.cli
def test_without_done_the_interpreter_ends_as_usual():
    proc = _run("raise RuntimeError('boom')")
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr
    assert "other handler ran" in proc.stdout
    full = _run("quickexit.done(0)", REGIONCAP_FULL_TEARDOWN="1")
    assert full.returncode == 0 and "teardown ran" in full.stdout


@pytest.mark.parametrize("value,code", [(None, 0), (0, 0), (1, 1), (2, 2), (256 + 3, 3), ("failed", 1), (True, 1)])
def test_exit_code_is_what_sys_exit_gives(value, code):
    assert exit_code(value) == code
