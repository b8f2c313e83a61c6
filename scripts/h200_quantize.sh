#!/usr/bin/env bash
# Every qtool quantize recipe on the H200 device, one fresh process per recipe, with a markdown table.
#
# Usage (repository root on the device; .whl/ from /work/shared/device/modelopt-wheels.sh carried):
#   scripts/h200_quantize.sh tiny                   # every recipe on a tiny random Llama
#   scripts/h200_quantize.sh smollm2 SMOLLM2_DIR    # every recipe on SmolLM2-135M (bf16 HF folder, carried
#                                                   # in .cache/; --awq-block-size 64 because 576 % 128 != 0)
#   scripts/h200_quantize.sh llama8b                # Llama-3.1-8B-shaped random weights: fp8 and nvfp4
#   scripts/h200_quantize.sh all SMOLLM2_DIR        # the three in turn (longer than one 10-minute call)
# Each stage stays under ~10 minutes; run them as separate device calls. Results: the tables on
# stdout and in $OUT/h200_quantize.md (+ rows as JSON lines in $OUT/h200_quantize.jsonl) when $OUT is
# set, else /tmp/qtool-h200/. A failing recipe is reported loudly (FAILED + its stderr tail) and the
# script goes on with the next one; the exit code is 1 when anything failed.
# Contract: installs the ModelOpt wheels into /tmp/site (no network, --no-deps: the device's
# transformers 5.17 is outside modelopt[hf]'s pin, so nothing is pip-installed from this repo) and
# runs `python3 -m qtool quantize` from the source tree via PYTHONPATH. Calibration: 32 samples x 256
# tokens (8B: 16 x 256) from qtool's embedded corpus. Recipes the matrices refuse on sm90 run with
# --force (the table marks them).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
STAGE=${1:-all}
SMOL=${2:-}
RES=${OUT:-/tmp/qtool-h200}
WORK=/tmp/qtool-h200-work
mkdir -p "$RES" "$WORK"
PY=${PYTHON:-python3}

if ! PYTHONPATH=/tmp/site "$PY" -c "import modelopt" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    echo "== installing ModelOpt wheels from .whl/ into /tmp/site" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "FAILED: pip install of .whl/*.whl" >&2; exit 1; }
  else
    echo "FAILED: modelopt is not importable and there is no .whl/ (run /work/shared/device/modelopt-wheels.sh and carry .whl)" >&2
    exit 1
  fi
fi
export PYTHONPATH="/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" - <<'EOF' >&2 || { echo "FAILED: environment check" >&2; exit 1; }
import torch, transformers, modelopt, qtool
print(f"torch {torch.__version__} cuda={torch.cuda.is_available()} "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}; transformers {transformers.__version__}; "
      f"modelopt {modelopt.__version__}; qtool {qtool.__version__}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true

status=0
bench() { "$PY" scripts/quantize_bench.py --out "$WORK/out" --json "$RES/h200_quantize.jsonl" "$@" | tee -a "$RES/h200_quantize.md" || status=1; }

if [ "$STAGE" = tiny ] || [ "$STAGE" = all ]; then
  echo "== tiny random Llama" >&2
  "$PY" -c "import sys; sys.path.insert(0, 'tests'); from tiny_models import make_tiny_model; make_tiny_model('llama', '$WORK/tiny-llama')" \
    || { echo "FAILED: tiny model" >&2; status=1; }
  bench --model "$WORK/tiny-llama" --label "tiny-llama (H200)" --calib-size 32 --calib-seq-len 256
fi
if [ "$STAGE" = smollm2 ] || [ "$STAGE" = all ]; then
  if [ -z "$SMOL" ] || [ ! -f "$SMOL/config.json" ]; then
    echo "FAILED: smollm2 stage needs the SmolLM2 bf16 Hugging Face folder as the 2nd argument (got '$SMOL')" >&2; status=1
  else
    echo "== SmolLM2-135M" >&2
    bench --model "$SMOL" --label "SmolLM2-135M (H200)" --calib-size 32 --calib-seq-len 256 --awq-block-size 64
  fi
fi
if [ "$STAGE" = llama8b ] || [ "$STAGE" = all ]; then
  echo "== Llama-3.1-8B-shaped random weights" >&2
  bench --make-llama8b "$WORK/llama31-8b-random" --label "Llama-3.1-8B-shaped, random (H200)" \
        --recipes fp8,nvfp4 --calib-size 16 --calib-seq-len 256
fi
echo "results: $RES/h200_quantize.md" >&2
exit $status
