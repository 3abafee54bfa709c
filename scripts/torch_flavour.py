"""Which torch ``scripts/setup.sh`` installs: ``cuda`` where an NVIDIA GPU is, else ``cpu``.

Prints ``FLAVOUR REASON`` (one line) for the venv folder given as the argument;
exits 2 with a message on a bad ``REGIONCAP_TORCH``. Standard library only: it
runs with the interpreter the venv is made from, before the venv exists.

    python scripts/torch_flavour.py .venv     # cpu no NVIDIA GPU found (...)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Tuple

FLAVOURS = ("cpu", "cuda")
#: Present while the NVIDIA kernel driver is loaded (REGIONCAP_NVIDIA_DRIVER_DIR overrides it, for tests).
DRIVER_DIR = "/proc/driver/nvidia"


def installed_flavour(venv: Path) -> Optional[str]:
    """The flavour of the torch already installed in ``venv`` (None: no venv or no torch), from its metadata.

    A CPU build's version carries the ``+cpu`` local label; the package index's
    torch (no label) is the CUDA build.
    """
    for info in sorted(venv.glob("lib/python*/site-packages/torch-*.dist-info")):
        version = info.name[len("torch-"):-len(".dist-info")]
        return "cpu" if version.endswith("+cpu") else "cuda"
    return None


def has_nvidia_gpu(env: Mapping[str, str]) -> Optional[str]:
    """Why this machine has an NVIDIA GPU (a sentence), or None when it has none.

    ``nvidia-smi`` must list a GPU, not just exist: containers often ship the
    tool without a device, where it fails.
    """
    smi = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if smi is not None:
        try:
            if subprocess.run([smi, "-L"], capture_output=True, timeout=30).returncode == 0:
                return "nvidia-smi lists a GPU"
        except (OSError, subprocess.TimeoutExpired):
            pass
    driver = env.get("REGIONCAP_NVIDIA_DRIVER_DIR") or DRIVER_DIR
    if Path(driver).exists():
        return f"the NVIDIA driver is loaded ({driver})"
    return None


def pick(env: Mapping[str, str], venv: Path) -> Tuple[str, str]:
    """``(flavour, reason)``: REGIONCAP_TORCH if set, else what ``venv`` holds, else by the machine's GPU.

    An existing venv keeps its flavour (switching leaves the other flavour's
    packages behind); forcing the other flavour on it raises ``ValueError``
    that says to remove it.
    """
    want = (env.get("REGIONCAP_TORCH") or "auto").strip().lower()
    have = installed_flavour(venv)
    if want in FLAVOURS:
        if have is not None and have != want:
            raise ValueError(f"REGIONCAP_TORCH={want} but {venv} holds a {have} torch; remove it "
                             f"(rm -rf {venv}) and re-run, or leave REGIONCAP_TORCH unset to keep it")
        return want, f"REGIONCAP_TORCH={want}"
    if want != "auto":
        raise ValueError(f"REGIONCAP_TORCH={want} is not one of auto, cpu, cuda")
    if have is not None:
        return have, f"{venv} already holds a {have} torch (REGIONCAP_TORCH=cpu|cuda with a fresh venv to change it)"
    gpu = has_nvidia_gpu(env)
    if gpu is not None:
        return "cuda", gpu
    return "cpu", f"no NVIDIA GPU found (no working nvidia-smi, no {DRIVER_DIR})"


def main(argv: list) -> int:
    """Print the choice for the venv folder ``argv[1]``."""
    try:
        flavour, why = pick(os.environ, Path(argv[1] if len(argv) > 1 else ".venv"))
    except ValueError as exc:
        print(f"setup: {exc}", file=sys.stderr)
        return 2
    print(flavour, why)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
