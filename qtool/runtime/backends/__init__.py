"""Compute backends behind `qtool.runtime.backend.Backend`.

Contract: `make_backend(name)` returns a ready backend: 'torch' → the float32 CPU reference
(`torch_ref.TorchRefBackend`), 'cuda' → `cuda.CudaBackend` (imported only when asked for),
'auto' → cuda when a GPU and CuPy are usable, else torch. `resolve_backend_name('auto')` makes
that choice without importing CuPy kernels. A missing CUDA backend raises Failure (one line).
"""
from __future__ import annotations

from qtool.errors import Failure


def cuda_usable() -> tuple[bool, str]:
    """(usable, reason) for the CUDA backend: a CUDA device and an importable cupy."""
    try:
        import torch
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
    except ImportError:
        return False, "torch is not installed"
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"cupy is not importable ({type(exc).__name__})"
    return True, ""


def resolve_backend_name(name: str) -> str:
    if name == "auto":
        return "cuda" if cuda_usable()[0] else "torch"
    return name


def make_backend(name: str):
    name = resolve_backend_name(name)
    if name == "torch":
        from qtool.runtime.backends.torch_ref import TorchRefBackend
        return TorchRefBackend()
    if name == "cuda":
        ok, why = cuda_usable()
        if not ok:
            raise Failure(f"--backend cuda is not available: {why}", hint="use --backend torch (CPU reference)")
        try:
            from qtool.runtime.backends.cuda import CudaBackend
        except ImportError as exc:
            raise Failure(f"--backend cuda is not available: {exc}", hint="use --backend torch (CPU reference)")
        return CudaBackend()
    raise Failure(f"unknown backend {name!r}")
