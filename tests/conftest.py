"""Shared pytest fixtures: tiny random checkpoints (session-scoped) and the GPU skip rule.

GPU tests carry @pytest.mark.gpu and are skipped unless CUDA and CuPy are usable
(scripts/gpu_tests.sh runs them on the device).
"""
from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent
SEED_DIR = REPO.parent / "shared" / "seed"


def _gpu_available() -> bool:
    try:
        import torch
        if not torch.cuda.is_available():
            return False
        import cupy  # noqa: F401
        return True
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CuPy (run scripts/gpu_tests.sh on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: path} of tiny random bf16 checkpoints, built once per session."""
    from tiny_models import make_tiny_model
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(family: str):
        if family not in cache:   # a stable seed per family (str hash() changes with every interpreter)
            cache[family] = make_tiny_model(family, root / family, seed=zlib.crc32(family.encode()) % 1000)
        return cache[family]
    return get
