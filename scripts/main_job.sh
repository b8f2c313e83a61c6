#!/usr/bin/env bash
# The README's main job on the embedded default model: quantize SmolLM2-135M-Instruct to FP8
# weights with an NVFP4 KV cache, inspect the result, and generate an answer on qtool's runtime.
# (Until quantize/inspect/run land, it shows the support answer for that request.)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
qtool matrix --model LLaMA-v2 --quant fp8 --kv-cache-quant nvfp4
