"""Run `python -m qtool ...` as its own process, exactly as a user types it (shared by end-to-end tests).

Contract: `run_qtool(*args, env=..., timeout=...)` runs from the repository root with the current
environment plus `env`, captures stdout/stderr as text and returns the CompletedProcess (never raises
on a non-zero exit; the caller asserts on it).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_qtool(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtool", *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
