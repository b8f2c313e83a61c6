"""The bulk-copy FP8 decode GEMV (linear.cu ``gemv_mma_bulk<XH>``, sm_90+): its weight layout, launch plan and
self-check.

Contract: ``mma_tile_fp8(w)`` puts fp8 codes [O, K] in the mma-tiled order the kernel streams (each 16-row tile
contiguous); ``to_tiled(kl)`` is ``kl`` with its weights in that order (``kl.tiled``; the row-major copy is not
kept: prefill reads the same bytes through ``gemm<5>``). ``plan(M, K)`` says how the kernel runs M rows of K
inputs here: (XH, stages, dynamic shared-memory bytes), or None when the staged x̂ does not fit. ``launch_bulk``
runs it on x̂ codes from act_quant (``q["xq"]``, ``q["xs"]``) into y [M, O]: one block per SM (at most one per
16-row tile), each owning a contiguous range of whole tiles. ``self_check`` compares it with the f32 path on
fresh random weights (both XH variants, per-row / per-tensor / 128x128-block scales, odd O, K % 128 == 64,
M = 1..8) and the tiled prefill GEMM with the row-major one, bit for bit.
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
FIXED_BYTES = 128 + 4 * 32 * 16  # mbarriers + the warps' fragment exchange
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


def to_tiled(kl: KLinear) -> KLinear:
    return replace(kl, w=mma_tile_fp8(kl.w), tiled=True)


def enabled() -> bool:
    """The kernel can run here: sm_90+ (bulk copies, mbarrier transaction counts) and not QTOOL_BULK=0."""
    return os.environ.get("QTOOL_BULK", "1") != "0" and _capability() >= 9


@functools.lru_cache(maxsize=None)
def _capability() -> int:
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0


@functools.lru_cache(maxsize=None)
def smem_limit() -> int:
    """Dynamic shared memory one block may opt into on the current GPU (227 KB on Hopper)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    n = getattr(props, "shared_memory_per_block_optin", None)
    if not n:
        import cupy
        n = cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    return int(n)


@functools.lru_cache(maxsize=None)
def sm_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def plan(M: int, K: int, stages: int | None = None, xh: int | None = None,
         limit: int | None = None) -> tuple[int, int, int] | None:
    """(XH, stages, smem bytes): x̂ staged as f16 (XH = 1) when that leaves at least 4 stages, else as e4m3
    codes with at least 2; ``stages`` caps the ring (default 8), ``xh`` forces the variant."""
    limit = smem_limit() if limit is None else limit
    for x in ((1, 0) if xh is None else (xh,)):
        xbytes = math.ceil(M * ((2 if x else 1) * K + 16) / 128) * 128
        room = (limit - FIXED_BYTES - xbytes) // STAGE_BYTES
        n = min(stages or DEFAULT_STAGES, room, 16)
        if n >= MIN_STAGES[x] or (xh is not None and n >= 2):
            return x, n, FIXED_BYTES + xbytes + n * STAGE_BYTES
    return None


def launch_bulk(q: dict, kl: KLinear, y: torch.Tensor, M: int, stages: int | None = None,
                xh: int | None = None) -> None:
    if not kl.tiled:
        raise ValueError("gemv_mma_bulk reads mma-tiled weights (fp8_bulk.to_tiled)")
    O, K = kl.out_features, kl.in_features
    p = plan(M, K, stages, xh)
    if p is None:
        raise ValueError(f"gemv_mma_bulk: x̂ of {M} x {K} does not fit in shared memory")
    x, n, smem = p
    name = f"gemv_mma_bulk<{x}>"
    allow_smem("linear", name, smem_limit())
    launch("linear", name, (min(math.ceil(O / 16), sm_count()),), (128,),
           (ptr(q["xq"]), ptr(q["xs"]), i32(1 if kl.act == 3 else 0), ptr(kl.w), ptr(kl.sc), ptr(kl.bias), ptr(y),
            i32(O), i32(M), i32(O), i32(K), i32(kl.sld), i32(kl.sbo), i32(kl.sbi_log2), i32(n)), smem)


def random_fp8_linear(g, dev, O: int, K: int, act: int, bias: bool = False) -> KLinear:
    """Row-major random fp8 KLinear (codes without NaN) with per-row (act 2), per-tensor (act 1, static input
    scale) or 128x128-block (act 3) scales."""
    w = torch.randint(0, 0x7e, (O, K), generator=g, device=dev, dtype=torch.uint8)
    w |= torch.randint(0, 2, (O, K), generator=g, device=dev, dtype=torch.uint8) << 7
    b = torch.randn(O, generator=g, device=dev) if bias else None
    if act == 3:
        sc = torch.rand(math.ceil(O / 128), math.ceil(K / 128), generator=g, device=dev) * 1e-2 + 1e-3
        return KLinear(1, O, K, w, sc=sc, sld=sc.shape[1], sbo=128, sbi=128, act=3, bias=b)
    if act == 1:
        return KLinear(1, O, K, w, sc=torch.full((1,), 3e-3, device=dev), sbo=O, sbi=K, act=1, bias=b,
                       in_scale=torch.full((1,), 0.02, device=dev))
    return KLinear(1, O, K, w, sc=torch.rand(O, generator=g, device=dev) * 1e-2 + 1e-3, sbo=1, sbi=K, act=2, bias=b)


CHECK_CASES = ((96, 512, 2, 3), (200, 640, 3, 1), (1000, 4096, 1, 1), (72, 384, 3, 8), (80, 14336, 2, 8),
               (300, 1088, 2, 2))


def self_check(g, dev) -> bool:
    import warnings

    from qtool.kernels import ops
    for O, K, act, M in CHECK_CASES:
        kl = random_fp8_linear(g, dev, O, K, act, bias=O % 3 == 0)
        kt = to_tiled(kl)
        x = torch.randn(M, K, generator=g, device=dev)
        b = ops.linear(x, kl, path="f32")
        q = ops.act_quant(x, kl, codes=True)
        outs = []
        for xh in (None, None, 0, 1):
            if xh is not None and plan(M, K, xh=xh) is None:
                continue
            y = torch.full((M, O), float("nan"), device=dev)
            launch_bulk(q, kt, y, M, xh=xh)
            outs.append(y)
        err = max(float((a - b).norm() / b.norm()) for a in outs)
        xg = torch.randn(9, K, generator=g, device=dev)
        gemm_same = torch.equal(ops.linear(xg, kt, path="gemm"), ops.linear(xg, kl, path="gemm"))
        if not (err < 1e-4 and torch.equal(outs[0], outs[1]) and gemm_same):
            warnings.warn(f"qtool CUDA: fast path 'bulk' differs from the f32 path by {err:.2e} (O={O}, K={K}, "
                          f"act={act}, M={M}; tiled gemm equal: {gemm_same}); disabled")
            return False
    return True
