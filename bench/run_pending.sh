#!/usr/bin/env bash
# The measurements pending since runs 57-62 (docs/performance.md, "Changed after these runs"):
# the tensor-core attention prototype, the paged kernel's variants, TTFT with the float32 GEMM prefill attention,
# 4-bit batched decode with L2 chunks, the paged batched decode, and decode at ctx 8192 / 32768 (target 4).
# Logs and JSON under $OUT (else ./pending_out); each part under its own time budget so one slow part cannot take
# the others' time (the budgets add up past one 10-minute device call: run them as two calls,
# `bash bench/run_pending.sh tc,variants,ttft,pattn` and `bash bench/run_pending.sh batch4bit,batchpaged,long,smallm,gms`), and the
# serve load tests (`serve`: concurrency 1-64 with the engine's time split per level; `prefix`: a shared 1,000-token
# system prompt with and without prefix caching), `bash bench/run_pending.sh serve,prefix`.
# Usage (repository root on the device): bash bench/run_pending.sh [parts]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-pending_out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PARTS="${1:-tc,variants,ttft,pattn,batch4bit,batchpaged,long,smallm,gms}"
{ date -u; nvidia-smi --query-gpu=name --format=csv,noheader; } | tee "$OUT/env.txt"
run() {   # name, budget seconds, command...
  local name=$1 budget=$2; shift 2
  [[ ",$PARTS," == *",$name,"* ]] || return 0
  local t0=$(date +%s)
  timeout -s INT -k 10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  echo "[$name: rc $?, $(( $(date +%s) - t0 )) s]"
  grep -E "^\||copy bandwidth|registers|FAILED|Error|WRONG|^ttft|^batch|summary|engine:|^ +[0-9]+ +[0-9]+ +[0-9]+ |TTFT p50 with|vs concurrency" "$OUT/$name.log" | head -60
}
run tc 150 python3 bench/attention_tc.py --json "$OUT/tc.json"
run variants 200 python3 bench/attention_variants.py --json "$OUT/variants.json"
run ttft 90 python3 bench/bench_prefill_batch.py --parts ttft --json "$OUT/ttft.json"
run pattn 60 python3 bench/prefill_attention_gemm.py --json "$OUT/pattn.json"
run smallm 90 python3 bench/small_m_gemm.py --json "$OUT/smallm.json"
run gms 90 python3 bench/gemm_mma_small.py --json "$OUT/gms.json"
run batch4bit 150 python3 bench/bench_prefill_batch.py --parts batch4bit --json "$OUT/batch4bit.json"
run batchpaged 80 python3 bench/bench_prefill_batch.py --parts batchpaged --json "$OUT/batchpaged.json"
run long 120 python3 scripts/bench_decode.py --grid long --peer "" --json "$OUT/long.json"
SERVE=(python3 scripts/bench_serve.py --make-random /tmp/llama8b-fp8-random --input-len 512 --output-len 128)
run serve 330 "${SERVE[@]}" --concurrency 1,8,32,64 --requests-per-level 8 --level-time-limit 20 --json "$OUT/serve.json"
run prefix 240 "${SERVE[@]}" --concurrency 1,8 --requests-per-level 8 --level-time-limit 15 --shared-prefix 1000 \
  --compare-prefix-caching --json "$OUT/prefix.json"
