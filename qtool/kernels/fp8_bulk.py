"""The bulk-copy FP8 decode GEMV (linear.cu ``gemv_mma_bulk<XH>``, sm_90+): its weight layout, launch plan and
self-check.

Contract: ``mma_tile_fp8(w)`` puts fp8 codes [O, K] in the mma-tiled order the kernel streams (each 16-row tile
contiguous); ``to_tiled(kl)`` is ``kl`` with its weights in that order (``kl.tiled``; the row-major copy is not
kept: prefill reads the same bytes through ``gemm<5>``). ``plan(M, K)`` says how the kernel runs M rows of K
inputs here: (XH, stages, dynamic shared-memory bytes), or None when the staged x̂ does not fit. ``launch_bulk``
runs it on x̂ codes from act_quant (``q["xq"]``, ``q["xs"]``) into y [M, O]: one block per SM (at most one per
16-row tile), each owning a contiguous range of whole tiles. ``self_check`` compares it with the f32 path on
fresh random weights (both XH variants, rings of 2 and 8 stages, per-row / per-tensor / 128x128-block scales,
odd O, K % 128 == 64, M = 1..8, more tiles than SMs) and the tiled prefill GEMM with the row-major one, bit
for bit.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import replace

import torch

from qtool.kernels.launch import allow_smem, i32, launch, ptr
from qtool.kernels.weights import KLinear

STAGE_BYTES = 16 * 1024          # BULK_SB k-blocks of 1 KB (linear.cu)
WARPS = 8                        # BULK_WARPS (linear.cu)
FIXED_BYTES = 128 + WARPS * 32 * 16  # mbarriers + the warps' fragment exchange
DEFAULT_STAGES = 8               # 128 KB of weights in flight per SM
MIN_STAGES = {1: 4, 0: 2}        # below this many stages, x̂ as f16 is not worth it / the kernel is not used


def mma_tile_fp8(w: torch.Tensor) -> torch.Tensor:
    """fp8 codes [O, K] (K % 64 == 0) in the mma-tiled order of linear.cu (gemv_mma4p, gemv_mma_bulk, gemm<5>):
    rows padded to 16 with zeros, then [O/16, K/64, 2 (rows 0-7 | 8-15), 8 rows, 4 chunks of 16 k, 16 bytes]."""
    O, K = w.shape
    if K % 64:
        raise ValueError(f"mma tiling needs K % 64 == 0 (got {K})")
    Op = math.ceil(O / 16) * 16
    if Op != O:
        w = torch.cat([w, w.new_zeros(Op - O, K)])
    return w.view(Op // 16, 2, 8, K // 64, 4, 16).permute(0, 3, 1, 2, 4, 5).contiguous()


def mma_untile_fp8(wt: torch.Tensor, O: int, K: int) -> torch.Tensor:
    """The inverse of mma_tile_fp8: row-major codes [O, K] (padding rows dropped)."""
    Op = math.ceil(O / 16) * 16
    return wt.reshape(Op // 16, K // 64, 2, 8, 4, 16).permute(0, 2, 3, 1, 4, 5).reshape(Op, K)[:O]


def to_tiled(kl: KLinear) -> KLinear:
    """kl with mma-tiled weights. Lay weights out at load time only: gemv_mma_bulk starts reading them before it
    waits for the previous kernel (programmatic dependent launch), so they must not be written right before it."""
    return replace(kl, w=mma_tile_fp8(kl.w), tiled=True)


def supported() -> bool:
    """The kernel can run here: sm_90+ (bulk copies, mbarrier transaction counts)."""
    return _capability() >= 9


def enabled() -> bool:
    """CudaBackend lays fp8 weights out for this kernel: QTOOL_BULK=1 on sm_90+. Off by default: run 10 measured
    it at 270-276 tok/s in the Llama-3.1-8B decode loop against gemv_mma4's 291 (docs/cuda-notes.md, v8)."""
    return os.environ.get("QTOOL_BULK", "0") == "1" and supported()


@functools.lru_cache(maxsize=None)
def _capability() -> int:
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0


@functools.lru_cache(maxsize=None)
def smem_limit() -> int:
    """Dynamic shared memory one block may opt into on the current GPU (227 KB on Hopper)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    n = getattr(props, "shared_memory_per_block_optin", None)
    if not n:   # cudaDevAttrMaxSharedMemoryPerBlockOptin
        import cupy
        n = cupy.cuda.runtime.deviceGetAttribute(97, torch.cuda.current_device())
    return int(n)


@functools.lru_cache(maxsize=None)
def sm_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


PER_SM = int(os.environ.get("QTOOL_BULK_PER_SM", "3"))   # blocks per SM (run 10: 3 and 2 ~1.5x one block)
SM_SMEM = 233472                                          # shared memory per SM on sm_90 (228 KB)
MAX_K = int(os.environ.get("QTOOL_BULK_MAX_K", "16384"))  # layers with more inputs keep gemv_mma4 (experiment)


def plan(M: int, K: int, stages: int | None = None, xh: int | None = None,
         limit: int | None = None, per_sm: int | None = None) -> tuple[int, int, int] | None:
    """(XH, stages, smem bytes): x̂ staged as f16 (XH = 1) when that leaves at least 4 stages, else as e4m3
    codes with at least 2; ``stages`` caps the ring (default 8), ``xh`` forces the variant; with ``per_sm``
    blocks per SM (default PER_SM) each gets its share of the SM's shared memory (1 KB reserved per block)."""
    limit = smem_limit() if limit is None else limit
    per_sm = PER_SM if per_sm is None else per_sm
    if per_sm > 1:
        limit = min(limit, SM_SMEM // per_sm - 1024)
    for x in ((1, 0) if xh is None else (xh,)):
        xbytes = math.ceil(M * ((2 if x else 1) * K + 16) / 128) * 128
        room = (limit - FIXED_BYTES - xbytes) // STAGE_BYTES
        n = min(stages or DEFAULT_STAGES, room, 16)
        if n >= MIN_STAGES[x] or (xh is not None and n >= 2):
            return x, n, FIXED_BYTES + xbytes + n * STAGE_BYTES
    return None


def launch_bulk(q: dict, kl: KLinear, y: torch.Tensor, M: int, stages: int | None = None,
                xh: int | None = None, per_sm: int | None = None) -> None:
    """per_sm: blocks per SM (their rings must fit together; default PER_SM, one where they do not)."""
    if not kl.tiled:
        raise ValueError("gemv_mma_bulk reads mma-tiled weights (fp8_bulk.to_tiled)")
    O, K = kl.out_features, kl.in_features
    per_sm = PER_SM if per_sm is None else per_sm
    p = plan(M, K, stages, xh, per_sm=per_sm)
    if p is None and per_sm > 1:
        per_sm, p = 1, plan(M, K, stages, xh, per_sm=1)
    if p is None:
        raise ValueError(f"gemv_mma_bulk: x̂ of {M} x {K} does not fit in shared memory")
    x, n, smem = p
    name = f"gemv_mma_bulk<{x}>"
    allow_smem("linear", name, smem_limit())
    launch("linear", name, (min(math.ceil(O / 16), per_sm * sm_count()),), (32 * WARPS,),
           (ptr(q["xq"]), ptr(q["xs"]), i32(1 if kl.act == 3 else 0), ptr(kl.w), ptr(kl.sc), ptr(kl.bias), ptr(y),
            i32(O), i32(M), i32(O), i32(K), i32(kl.sld), i32(kl.sbo), i32(kl.sbi_log2), i32(n)), smem)


# (O, K, recipe, M): odd O, K % 128 == 64, M = 1..8, every scale kind, x̂ too large for f16 staging (80 x 14336,
# M = 8), and more tiles than SMs (2200 rows: 138 tiles, so blocks own several and reuse their fragment buffer)
CHECK_CASES = ((96, 512, "fp8-rowwise", 3), (200, 640, "fp8-block", 1), (1000, 4096, "fp8", 1),
               (72, 384, "fp8-block", 8), (80, 14336, "fp8-rowwise", 8), (300, 1088, "fp8-rowwise", 2),
               (2200, 1088, "fp8-block", 1))


def self_check(g, dev) -> bool:
    import warnings

    from qtool.kernels import ops
    from qtool.kernels.random_weights import random_linear
    for O, K, recipe, M in CHECK_CASES:
        kl = random_linear(recipe, O, K, g, dev, bias=O % 3 == 0)
        kt = to_tiled(kl)
        x = torch.randn(M, K, generator=g, device=dev)
        b = ops.linear(x, kl, path="f32")
        q = ops.act_quant(x, kl, codes=True)
        outs = []
        for stages, xh in ((None, None), (None, None), (None, 0), (None, 1), (2, 0), (2, 1)):   # 2: the ring wraps
            if xh is not None and plan(M, K, stages, xh) is None:
                continue
            y = torch.full((M, O), float("nan"), device=dev)
            launch_bulk(q, kt, y, M, stages, xh)
            outs.append(y)
        err = max(float((a - b).norm() / b.norm()) for a in outs)
        xg = torch.randn(9, K, generator=g, device=dev)
        gemm_same = torch.equal(ops.linear(xg, kt, path="gemm"), ops.linear(xg, kl, path="gemm"))
        if not (err < 1e-4 and torch.equal(outs[0], outs[1]) and gemm_same):
            warnings.warn(f"qtool CUDA: fast path 'bulk' differs from the f32 path by {err:.2e} (O={O}, K={K}, "
                          f"{recipe}, M={M}; tiled gemm equal: {gemm_same}); disabled")
            return False
    return True
