"""The K split of the tensor-core decode GEMVs (gemv_mma4p in linear.cu, gemv_q4 in gemv_4bit.cu): one block of S
warps per 16-row tile, each warp summing one K slice, planned to fill the GPU in one resident wave.

Contract: ``mma4_split(O, K, name, file)`` gives (S, kslice) for the kernel ``name`` of kernels_cuda/``file``.cu;
``kslices(K, S, gran)`` splits K into about S slices that are multiples of gran; ``MMA4_MAX_SLICES`` is a block's
most slices. Shared by ops.py (gemv_mma4p) and gemv_4bit.py (gemv_q4), importing neither.
"""
from __future__ import annotations

import functools
import math

import torch

from qtool.kernels import loader

MMA4_MAX_SLICES = 16        # K slices of one gemv_mma4p block: its launch bound (512 threads) / 32


def kslices(K: int, S: int, gran: int) -> tuple[int, int]:
    """(number of slices, slice length): about S slices of K, each a multiple of gran."""
    kslice = math.ceil(math.ceil(K / S) / gran) * gran
    return math.ceil(K / kslice), kslice


def mma4_split(O: int, K: int, name: str = "gemv_mma4p", file: str = "linear") -> tuple[int, int]:
    """(S, kslice) for gemv_mma4p: about 2560 warps of 16 rows (~20 resident per SM at 90 registers on 132 SMs,
    4 KB of weight loads in flight each), then lowered until S fits a block (MMA4_MAX_SLICES) and every block is
    resident at once (one wave: run 4 measured a second, partial wave costing more than the extra warps gain,
    28672x4096: 3124 GB/s with 1.36 waves, 3545 GB/s with 0.68). Slices are multiples of 256 (one k step). Also
    gemv_q4's plan (file "gemv_4bit": same block structure and k step)."""
    tiles = max(1, math.ceil(O / 16))
    S = max(1, min(math.ceil(2560 / tiles), math.ceil(K / 256)))
    S, _ = kslices(K, max(1, min(S, resident_warps(name, file) // tiles)), 256)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    per_sm = resident_warps(name, file) // sms
    while S > 1 and (S > MMA4_MAX_SLICES or tiles > sms * (per_sm // S)):
        S -= 1
    return kslices(K, S, 256)


@functools.lru_cache(maxsize=None)
def resident_warps(name: str, file: str = "linear") -> int:
    """Warps of the kernel ``name`` resident at once on the current GPU: registers per SM / registers per warp
    (the compiled kernel's count, ~96 for gemv_mma4p, rounded to the 256-register allocation unit), at most 32
    per SM, x SMs."""
    try:
        regs = int(loader.function(file, name).num_regs)
    except Exception:  # noqa: BLE001 - an attribute CuPy lacks: the nvcc -Xptxas -v counts
        regs = 100
    per_warp = math.ceil(regs * 32 / 256) * 256
    per_sm = min(65536 // per_warp, 32)
    return per_sm * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count

