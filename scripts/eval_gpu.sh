#!/usr/bin/env bash
# SmolLM2 on the device: build every recipe's checkpoint with ModelOpt, then check qtool's CUDA backend against the
# reference backend inside the reference's own noise floor (and, with QUALITY=1, measure every recipe against bf16
# on CUDA for docs/quality.md).
#
# Usage (repository root on the device; .whl/ from /work/shared/device/modelopt-wheels.sh carried):
#   scripts/eval_gpu.sh SMOLLM2          # SMOLLM2 = the bf16 Hugging Face folder of SmolLM2-135M-Instruct (as made
#                                        # by `qtool quantize`'s built-in source: ~/.cache/qtool/models/smollm2-135m-*)
# Every weight recipe of recipes/recipes.toml plus the KV-cache variants (ONLY="name ...": a subset), JOBS
# (default 4) at a time, each job =
# quantize (calibration CALIB_SIZE x CALIB_LEN, default 16 x 128: the comparison needs a checkpoint, not the best
# one; INT4 with block 64 because 576 % 128 != 0) then `qtool eval` CUDA vs reference on EVAL_TOKENS (2048) tokens.
# About 10 minutes for all on one H100 (16 CPU cores: the reference runs on them): split over two device calls
# with ONLY. Results: $OUT/eval_gpu.md (table, PASS/FAIL per recipe) and $OUT/eval_gpu.tar.gz
# (every JSON and log), else /tmp/qtool-eval-gpu.
# Criterion (CUDA vs reference on the same checkpoint, paired windows): the floor is the worst self-pair of the
# reference with embeddings x (1 + 2^-20 randn) (2 draws) and with its linears summed in float64 (floor_sum64:
# summation-order noise, as a GPU backend has in every layer; docs/eval.md); top-1 agreement >= floor - 0.02,
# mean KL <= 1.5 x floor + 0.002, |ppl ratio - 1| <= |floor ratio - 1| + 0.005. Exit 1 when a recipe fails it or
# a step fails.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
SMOL=${1:?usage: scripts/eval_gpu.sh SMOLLM2_BF16_FOLDER}
RES=${OUT:-/tmp/qtool-eval-gpu}
WORK=/tmp/qtool-eval-gpu-work
LOGS=$WORK/logs
mkdir -p "$RES" "$WORK" "$LOGS"
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
JOBS=${JOBS:-4}
export OMP_NUM_THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))
# name | qtool quantize arguments
RECIPES=(
  "fp8|--quant fp8"
  "fp8-rowwise|--quant fp8-rowwise"
  "fp8-block|--quant fp8-block"
  "fp8-fp8kv|--quant fp8 --kv-cache-quant fp8"
  "fp8-nvfp4kv|--quant fp8 --kv-cache-quant nvfp4"
  "nvfp4|--quant nvfp4"
  "nvfp4-awq-lite|--quant nvfp4 --algorithm awq_lite"
  "mxfp4|--quant mxfp4"
  "w4a16-awq|--quant w4a16-awq --awq-block-size 64"
  "w4a8-awq|--quant w4a8-awq --awq-block-size 64"
  "w4a16-gptq|--quant w4a16-gptq --awq-block-size 64"
  "w4a8-gptq|--quant w4a8-gptq --awq-block-size 64"
)
one() {   # name, quantize arguments, checkpoint folder ("" = build it)
  local name=$1 args=$2 ck=$3 t0=$(date +%s)
  if [ -z "$ck" ]; then
    ck="$WORK/$name"
    timeout 200 "$PY" -m qtool quantize --model "$SMOL" $args --force --calib-size "${CALIB_SIZE:-16}" \
      --calib-seq-len "${CALIB_LEN:-128}" -o "$ck" --json > "$LOGS/$name.quantize.json" 2> "$LOGS/$name.quantize.err" \
      || { echo "FAILED: quantize $name"; tail -3 "$LOGS/$name.quantize.err"; return 1; }
  fi
  timeout 240 "$PY" -m qtool eval "$ck" --backend cuda --baseline "$ck" --baseline-backend torch --noise-floor 2 \
    --max-tokens "${EVAL_TOKENS:-2048}" --window 256 --json > "$LOGS/$name.cuda_vs_ref.json" 2> "$LOGS/$name.cuda_vs_ref.err" \
    || { echo "FAILED: eval $name (cuda vs reference)"; tail -3 "$LOGS/$name.cuda_vs_ref.err"; return 1; }
  echo "$name done in $(( $(date +%s) - t0 )) s"
}
if [ -n "${ONLY:-}" ]; then      # ONLY="bf16 fp8 ...": a subset of the names (a device call has 10 minutes)
  keep=(); for row in "${RECIPES[@]}"; do [[ " $ONLY " == *" ${row%%|*} "* ]] && keep+=("$row"); done
  RECIPES=("${keep[@]}")
fi
pids=()
names=()
if [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" bf16 "* ]]; then one bf16 "" "$SMOL" & pids+=($!); names+=(bf16); fi
for row in "${RECIPES[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
  one "${row%%|*}" "${row#*|}" "" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
for row in "${RECIPES[@]}"; do names+=("${row%%|*}"); done
if [ "${QUALITY:-0}" = 1 ]; then
  cks=(); for row in "${RECIPES[@]}"; do n=${row%%|*}; [ -d "$WORK/$n" ] && cks+=("$WORK/$n"); done
  timeout 200 "$PY" -m qtool eval "${cks[@]}" --backend cuda --baseline "$SMOL" --noise-floor 2 \
    --max-tokens "${QUALITY_TOKENS:-8192}" --window 512 --json > "$LOGS/quality_cuda.json" 2> "$LOGS/quality_cuda.err" \
    || { echo "FAILED: quality run on cuda"; tail -3 "$LOGS/quality_cuda.err"; status=1; }
fi
"$PY" - "$RES" "$LOGS" "${names[@]}" <<'PYEOF' || status=1
import json, math, sys
from pathlib import Path
res, logs, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
lines = ["| checkpoint | CUDA ppl | reference ppl | ratio CUDA/ref [95 %] | top-1 agreement | mean KL | floor: agreement / KL / ratio | verdict |",
         "|---|---:|---:|---:|---:|---:|---:|---|"]
bad = 0
for n in names:
    p = logs / f"{n}.cuda_vs_ref.json"
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
q = logs / "quality_cuda.json"
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
tar -czf "$RES/eval_gpu.tar.gz" -C "$WORK" logs
echo "eval_gpu: exit $status"
exit $status
