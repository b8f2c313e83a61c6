"""One kernel launch on torch's current stream: the mechanics every op wrapper shares.

Contract: ``launch(file, name, grid, block, args, smem=0)`` runs ``kernels_cuda/<file>.cu``'s kernel ``name`` (a
plain name or a ``loader.TEMPLATES`` instantiation) with ``smem`` bytes of dynamic shared memory, through
programmatic dependent launch where available (pdl.py; the kernels wait for their predecessor in-kernel), else
through CuPy on a cached view of torch's stream. Arguments are numpy scalars: ``ptr(tensor)`` (np.uint64, null
for None), ``i32``, ``i64``, ``f32``. ``allow_smem(file, name, nbytes)`` raises a kernel's dynamic shared-memory limit
(needed above 48 KB) once per kernel.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from qtool.kernels import loader, pdl

i32, i64, f32 = np.int32, np.int64, np.float32


def ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def launch(file: str, name: str, grid, block, args, smem: int = 0) -> None:
    fn = loader.function(file, name)
    if pdl.available():
        try:
            pdl.launch(fn, grid, block, torch.cuda.current_stream().cuda_stream, args, smem)
            return
        except RuntimeError as exc:
            import warnings
            warnings.warn(f"qtool CUDA: programmatic dependent launch failed ({exc}); plain launches from now on")
            pdl.disable()
    with _stream():
        fn(tuple(grid), tuple(block), tuple(args), shared_mem=smem)


@functools.lru_cache(maxsize=None)
def allow_smem(file: str, name: str, nbytes: int) -> None:
    """Let kernel ``name`` take up to ``nbytes`` of dynamic shared memory (cuFuncSetAttribute, once)."""
    loader.function(file, name).max_dynamic_shared_size_bytes = int(nbytes)


def _stream():
    """CuPy view of torch's current stream (cached per stream handle)."""
    import cupy
    h = torch.cuda.current_stream().cuda_stream
    st = _STREAMS.get(h)
    if st is None:
        st = _STREAMS[h] = cupy.cuda.ExternalStream(h)
    return st


_STREAMS: dict = {}
