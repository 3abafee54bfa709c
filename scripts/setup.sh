#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv: regioncap in
# editable mode with the transformers engine, the OpenAI client, W&B, Ray, the
# submitit (SLURM) launcher and the test tools. Needs only a package registry, no model hub. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.regioncap-setup
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch and torchvision as a matched pair (transformers needs torchvision for
  # the Qwen2-VL processors; mismatched pairs fail at import).
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[transformers,openai,wandb,ray,slurm,dev]"
  echo "$want" > "$stamp"
fi
echo "regioncap environment ready: .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
