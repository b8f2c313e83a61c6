#!/usr/bin/env bash
# The README's main job on the embedded default model: quantize SmolLM2-135M-Instruct to FP8
# weights with an NVFP4 KV cache (ModelOpt, on CPU), inspect the result, and ask it a question on
# qtool's runtime (the CUDA backend with a GPU and CuPy, else the PyTorch reference backend).
# OUT (default out/smollm2-fp8-kvnvfp4) is replaced on each run (--force).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
out="${OUT:-out/smollm2-fp8-kvnvfp4}"

qtool quantize --model smollm2-135m --quant fp8 --kv-cache-quant nvfp4 \
    --calib-size 64 --calib-seq-len 256 --output "$out" --force
qtool inspect "$out"
qtool run "$out" "What is the capital of France?" --max-new-tokens 32
