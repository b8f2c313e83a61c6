#!/usr/bin/env bash
# SmolLM2 on the device: build each recipe's checkpoint with ModelOpt, then check qtool's CUDA backend against the
# reference backend inside the reference's own noise floor, and measure every recipe against bf16 on CUDA.
#
# Usage (repository root on the device; .whl/ from /work/shared/device/modelopt-wheels.sh carried):
#   scripts/eval_gpu.sh SMOLLM2          # SMOLLM2 = the bf16 Hugging Face folder of SmolLM2-135M-Instruct (as made
#                                        # by `qtool quantize`'s built-in source: ~/.cache/qtool/models/smollm2-135m-*)
# Budget: under 6 minutes on one H100 (EVAL_TOKENS=2048 CUDA-vs-reference tokens per recipe, QUALITY_TOKENS=8192
# for the quality run; calibration 32 x 256 tokens; AWQ with --awq-block-size 64 because 576 % 128 != 0).
# Results: $OUT/eval_gpu.md (table, PASS/FAIL per recipe) and $OUT/*.json (qtool eval --json), else /tmp/qtool-eval-gpu.
# Criterion (CUDA vs reference on the same checkpoint, paired windows, reference perturbed 2x with
# embeddings x (1 + 2^-20 randn)): top-1 agreement >= worst self-pair - 0.02, mean KL <= 1.5 x worst self-pair
# + 0.002, |ppl ratio - 1| <= |worst self-pair ratio - 1| + 0.005. Exit 1 when a recipe fails it or a step fails.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
SMOL=${1:?usage: scripts/eval_gpu.sh SMOLLM2_BF16_FOLDER}
RES=${OUT:-/tmp/qtool-eval-gpu}
WORK=/tmp/qtool-eval-gpu-work
mkdir -p "$RES" "$WORK"
PY=${PYTHON:-python3}
if ! "$PY" -c "import modelopt" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ date -u; git log -1 --format='commit %h %s' 2>/dev/null; nvidia-smi --query-gpu=name --format=csv,noheader; } | tee "$RES/env.txt"
status=0
# name | qtool quantize arguments
RECIPES=(
  "fp8|--quant fp8"
  "fp8-fp8kv|--quant fp8 --kv-cache-quant fp8"
  "fp8-nvfp4kv|--quant fp8 --kv-cache-quant nvfp4"
  "w4a16-awq|--quant w4a16-awq --awq-block-size 64"
  "w4a16-awq-full|--quant w4a16-awq --awq-block-size 64 --algorithm awq_full"
  "nvfp4|--quant nvfp4"
  "nvfp4-awq-lite|--quant nvfp4 --algorithm awq_lite"
)
built=()
for row in "${RECIPES[@]}"; do
  name=${row%%|*}; args=${row#*|}
  t0=$(date +%s)
  if timeout 120 "$PY" -m qtool quantize --model "$SMOL" $args --force --calib-size 32 --calib-seq-len 256 \
       -o "$WORK/$name" --json > "$RES/$name.quantize.json" 2> "$RES/$name.quantize.err"; then
    built+=("$name"); echo "built $name in $(( $(date +%s) - t0 )) s"
  else
    echo "FAILED: quantize $name"; tail -3 "$RES/$name.quantize.err"; status=1
  fi
done
for name in bf16 "${built[@]}"; do
  ck="$WORK/$name"; [ "$name" = bf16 ] && ck="$SMOL"
  timeout 150 "$PY" -m qtool eval "$ck" --backend cuda --baseline "$ck" --baseline-backend torch --noise-floor 2 \
    --max-tokens "${EVAL_TOKENS:-2048}" --window 256 --json > "$RES/$name.cuda_vs_ref.json" 2> "$RES/$name.cuda_vs_ref.err" \
    || { echo "FAILED: eval $name (cuda vs reference)"; tail -3 "$RES/$name.cuda_vs_ref.err"; status=1; }
done
cks=(); for name in "${built[@]}"; do cks+=("$WORK/$name"); done
timeout 150 "$PY" -m qtool eval "${cks[@]}" --backend cuda --baseline "$SMOL" --noise-floor 2 \
  --max-tokens "${QUALITY_TOKENS:-8192}" --window 512 --json > "$RES/quality_cuda.json" 2> "$RES/quality_cuda.err" \
  || { echo "FAILED: quality run on cuda"; tail -3 "$RES/quality_cuda.err"; status=1; }
"$PY" - "$RES" bf16 "${built[@]}" <<'PYEOF' || status=1
import json, math, sys
from pathlib import Path
res, names = Path(sys.argv[1]), sys.argv[2:]
lines = ["| checkpoint | CUDA ppl | reference ppl | ratio CUDA/ref [95 %] | top-1 agreement | mean KL | floor: agreement / KL / ratio | verdict |",
         "|---|---:|---:|---:|---:|---:|---:|---|"]
bad = 0
for n in names:
    p = res / f"{n}.cuda_vs_ref.json"
    if not p.is_file() or not p.read_text().strip():
        lines.append(f"| {n} | – | – | – | – | – | – | FAILED (no result) |"); bad += 1; continue
    r = json.loads(p.read_text()); m = r["results"][0]; g = m["gap"]; w = r["noise_floor"]["worst"]
    ok_a = g["top1_agreement"]["value"] >= w["top1_agreement"] - 0.02
    ok_k = g["mean_kl"]["value"] <= 1.5 * w["mean_kl"] + 0.002
    ok_r = abs(g["ppl_ratio"]["value"] - 1) <= abs(w["ppl_ratio"] - 1) + 0.005
    ok = ok_a and ok_k and ok_r
    bad += not ok
    lo, hi = g["ppl_ratio"]["ci95"]
    lines.append(f"| {n} | {m['perplexity']['value']:.3f} | {r['baseline']['perplexity']['value']:.3f} | "
                 f"{g['ppl_ratio']['value']:.4f} [{lo:.4f}, {hi:.4f}] | {g['top1_agreement']['value']:.4f} | "
                 f"{g['mean_kl']['value']:.5f} | {w['top1_agreement']:.4f} / {w['mean_kl']:.5f} / {w['ppl_ratio']:.4f} | "
                 + ("PASS" if ok else "FAIL (" + ", ".join(k for k, v in (("agreement", ok_a), ("KL", ok_k), ("ratio", ok_r)) if not v) + ")") + " |")
q = res / "quality_cuda.json"
if q.is_file() and q.read_text().strip():
    r = json.loads(q.read_text()); b = r["baseline"]["perplexity"]; w = r["noise_floor"]["worst"]
    lines += ["", f"Quality on CUDA vs bf16 ({r['text']['tokens_scored']} tokens, windows of {r['text']['window']}): "
              f"bf16 {b['value']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]; floor of bf16 on CUDA: agreement "
              f"{w['top1_agreement']:.4f}, KL {w['mean_kl']:.5f}, ratio {w['ppl_ratio']:.4f}", "",
              "| recipe | ppl [95 %] | ratio to bf16 [95 %] | top-1 agreement | mean KL |", "|---|---:|---:|---:|---:|"]
    for m in r["results"]:
        p, g = m["perplexity"], m["gap"]
        lines.append(f"| {Path(m['ref']).name} | {p['value']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] | "
                     f"{g['ppl_ratio']['value']:.4f} [{g['ppl_ratio']['ci95'][0]:.4f}, {g['ppl_ratio']['ci95'][1]:.4f}] | "
                     f"{g['top1_agreement']['value']:.4f} | {g['mean_kl']['value']:.5f} |")
text = "\n".join(lines) + "\n"
(res / "eval_gpu.md").write_text(text)
print(text)
sys.exit(1 if bad else 0)
PYEOF
echo "eval_gpu: exit $status"
exit $status
