#!/usr/bin/env bash
# Runs the CPU test suite (GPU tests are skipped here; scripts/gpu_tests.sh runs them on a GPU).
# pytest exit code 5 ("no tests ran") is turned into a failure.
set -uo pipefail
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
