"""The activation quantization the linears read (kernels_cuda/act_quant.cu): its launch wrapper and the fp8-codes
predicate, shared by ops.py (the decode and f32 paths) and gemm.py (cuBLAS through torch).

Contract: ``act_quant(x, kl, ...)`` returns a dict of x̂ f32 [M, K] and, on request, its f16 copy, e4m3 codes or
fp4 block scales (see its docstring); ``fp8_codes_ok(kl)`` says whether act_quant_fast can give kl's input as e4m3
codes + scales; ``threads(n)`` is the block size of the kernels holding 16 elements per thread. Imports no other
module of qtool/kernels/ but launch.py and weights.py (so gemm.py and ops.py can both use it without a cycle).
"""
from __future__ import annotations

import torch

from qtool.kernels.launch import i32, launch, ptr
from qtool.kernels.weights import A_FP8, A_FP8_BLOCK, A_FP8_TOKEN, A_NVFP4, F_FP8, KLinear


def threads(n: int) -> int:
    """Block size for kernels holding 16 elements per thread: ceil(n/16) rounded up to a warp, at least 64."""
    return max(64, min(1024, ((n + 15) // 16 + 31) // 32 * 32))


def act_quant(x: torch.Tensor, kl: KLinear, half: bool = False, codes: bool = False, fp4codes: bool = False,
              fold: bool = False):
    """x̂ f32 [M, K] (act_quant.cu). half=True: also (xh f16 [M, K] in the weight format's pair order, hs f32 [M]);
    fp4codes=True (with half, schemes nvfp4/mxfp4): xh holds exact E2M1 values and xsc the block scales;
    fold=True (with half, scheme nvfp4; gemv_q4): xh holds E2M1 times the e4m3 block scale (exact), hs = g;
    codes=True (fp8 schemes): e4m3 codes xq u8 [M, K] and their scales. Returns a dict."""
    M, K = x.shape
    dev = x.device
    res = {"x": torch.empty_like(x)}
    dyn = kl.act in (A_FP8, A_NVFP4) and kl.in_scale is None
    hperm = 0 if not half else (1 if kl.fmt == F_FP8 else 3 if fold else 2)
    if half:
        res["xh"] = torch.empty(M, K, dtype=torch.float16, device=dev)
        res["hs"] = torch.empty(M, dtype=torch.float32, device=dev)
    fast = K % 16 == 0 and K <= 16 * 1024 and not dyn
    if not fast:
        if codes or fp4codes or fold:
            raise ValueError("quantized activation codes need the fast act_quant kernel")
        launch("act_quant", "act_quant", (1 if dyn else M,), (1024,),
               (ptr(x), i32(x.stride(0)), ptr(res["x"]), i32(K), i32(M), i32(K), i32(kl.act), ptr(kl.in_scale),
                ptr(kl.pqs), ptr(res.get("xh")), ptr(res.get("hs")), i32(hperm)))
        return res
    qs = None
    if codes:
        res["xq"] = torch.empty(M, K, dtype=torch.uint8, device=dev)
        ng = (K + 127) // 128 if kl.act == A_FP8_BLOCK else 1
        qs = res["xs"] = torch.empty(M, ng, dtype=torch.float32, device=dev)
    elif fp4codes:
        qs = res["xsc"] = torch.empty(M, K // (16 if kl.act == A_NVFP4 else 32), dtype=torch.float32, device=dev)
    launch("act_quant", "act_quant_fast", (M,), (threads(K),),
           (ptr(x), i32(x.stride(0)), ptr(res["x"]), i32(M), i32(K), i32(kl.act), ptr(kl.in_scale), ptr(kl.pqs),
            ptr(res.get("xh")), ptr(res.get("hs")), i32(hperm), ptr(res.get("xq")), ptr(qs)))
    return res


def fp8_codes_ok(kl: KLinear) -> bool:
    """fp8 weights whose input act_quant_fast can give as e4m3 codes + scales (fp8 activations, no pre-quant
    scale, a static input scale where the scheme needs one)."""
    return (kl.fmt == F_FP8 and kl.act in (A_FP8, A_FP8_TOKEN, A_FP8_BLOCK) and kl.in_features <= 16 * 1024
            and kl.in_features % 16 == 0 and kl.pqs is None and not (kl.act == A_FP8 and kl.in_scale is None))
