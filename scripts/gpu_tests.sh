#!/usr/bin/env bash
# One command on the GPU machine: environment facts, the GPU test suite (pytest -m gpu), the decode benchmark,
# and a short summary last. Logs go to $OUT (device tool) or ./gpu_out. Usage: scripts/gpu_tests.sh [bench-grid]
# (bench-grid "none": tests only); SKIP_TESTS=1: benchmark only. Budgets
# per part: TEST_BUDGET_S, BENCH_BUDGET_S, GEMV_BUDGET_S, PROFILE_BUDGET_S (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
GRID="${1:-quick}"
PY=python3
if [ -d .whl ]; then $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
{ date -u; git log -1 --format='commit %h %s' 2>/dev/null; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  $PY -c "import torch, cupy, transformers; print('torch', torch.__version__, 'cupy', cupy.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/env.txt"
t0=$(date +%s)
if [ "${SKIP_TESTS:-0}" != "1" ]; then
# -v: one line per test as it ends (a run cut by the budget still names its failures); SIGINT at the budget makes
# pytest print its failure summary before it stops
timeout -s INT -k 30 "${TEST_BUDGET_S:-420}" $PY -m pytest -m gpu tests/gpu -v -rfE -p no:cacheprovider --timeout 240 --durations=12 ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log"
# CLI smoke: qtool run on a tiny random checkpoint, CUDA and torch backends (both must answer, exit 0). The texts
# are printed with their common prefix: a random tiny model has near-tied logits, so greedy text may part after a
# few tokens within floating-point noise; the margin-aware greedy check is tests/gpu/test_e2e.py.
$PY - <<'PYEOF' 2>&1 | tee "$OUT/cli.log"
import subprocess, sys
sys.path.insert(0, "tests")
from tiny_models import make_tiny_model
p = make_tiny_model("llama3", "/tmp/qtool_tiny_llama3", seed=1)
outs, rcs = {}, {}
for be in ("cuda", "torch"):
    r = subprocess.run([sys.executable, "-m", "qtool", "run", str(p), "hello world", "--backend", be,
                        "--max-new-tokens", "24"], capture_output=True, text=True)
    outs[be], rcs[be] = r.stdout, r.returncode
    print(f"[{be}] rc={r.returncode} stdout={r.stdout.strip()[:200]!r} stderr_tail={r.stderr.strip()[-300:]!r}")
a, b = outs["cuda"], outs["torch"]
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"CLI smoke: cuda rc={rcs['cuda']} torch rc={rcs['torch']}; texts equal: {a == b} (common prefix {same} of {len(b)} chars)")
PYEOF
fi
t1=$(date +%s)
if [ "$GRID" != "none" ]; then timeout "${BENCH_BUDGET_S:-220}" $PY scripts/bench_decode.py --kernels --pdl-compare ${BENCH_ARGS:-} --grid "$GRID" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"; fi
if [ "$GRID" != "none" ]; then timeout "${GEMV_BUDGET_S:-90}" $PY scripts/bench_decode.py --gemv 2>&1 | tee "$OUT/gemv.log"; fi
if [ "$GRID" != "none" ]; then timeout "${PROFILE_BUDGET_S:-60}" $PY scripts/bench_decode.py --profile 2>&1 | tee "$OUT/profile.log"; fi
t2=$(date +%s)
echo "=== summary: tests $((t1 - t0)) s, bench $((t2 - t1)) s"
if [ -f "$OUT/pytest.log" ]; then
  grep -E "passed|failed" "$OUT/pytest.log" | tail -1
  grep -E "CLI smoke" "$OUT/cli.log"
  grep -E "^FAILED| FAILED | ERROR " "$OUT/pytest.log" | sed -E 's/^\[gw[0-9]+\] \[ *[0-9]+%\] //' | cut -c1-200 | sort -u | head -40
fi
[ -f "$OUT/gemv.log" ] && grep -E "^\| " "$OUT/gemv.log"
[ -f "$OUT/profile.log" ] && grep -E "^profile|FAILED" "$OUT/profile.log"
[ -f "$OUT/bench.log" ] && grep -E "^\| (qtool|torch|attention|prefill)|copy bandwidth|FAILED" "$OUT/bench.log"
