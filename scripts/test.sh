#!/usr/bin/env bash
# The test command of the README: sets up .venv if needed, then runs the CPU test suite.
# GPU tests (@pytest.mark.gpu) are skipped here; scripts/gpu_tests.sh runs them on a GPU machine.
# pytest's exit code 5 ("no tests ran") is turned into a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh || exit 1
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
