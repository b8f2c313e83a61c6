"""Random linear layers directly in the kernels' layouts (KLinear), for the GPU tests and the decode benchmark.

Contract: ``random_linear(fmt, O, K, g=None, device="cuda", bias=False)`` for fmt in RECIPES: codes drawn
uniformly (fp8 without NaN codes, all 16 fp4 / int4 nibbles), scales of a plausible size, the activation
scheme of the recipe (per-tensor static, per-token or per-128-group fp8, nvfp4 with a static global scale, or
none); w4a16-gptq: int4 with a zero point per group. ``g`` is a torch.Generator on ``device`` (None: the global
one). Shapes as linear.cu's header.
"""
from __future__ import annotations

import math

import torch

from qtool.kernels.weights import (A_FP8, A_FP8_BLOCK, A_FP8_TOKEN, A_MXFP4, A_NONE, A_NVFP4, F_BF16, F_FP8, F_INT4,
                                   F_MXFP4, F_NVFP4, KLinear)

RECIPES = ("bf16", "fp8", "fp8-rowwise", "fp8-block", "fp8-weight-only", "nvfp4", "mxfp4", "w4a16-awq", "w4a8-awq",
           "w4a16-gptq")


def _u8(shape, hi, g, dev):
    return torch.randint(0, hi, shape, generator=g, device=dev, dtype=torch.uint8)


def random_fp8_codes(O: int, K: int, g=None, device="cuda") -> torch.Tensor:
    """e4m3 codes [O, K] without NaN (0x7f / 0xff)."""
    return _u8((O, K), 0x7e, g, device) | (_u8((O, K), 2, g, device) << 7)


def random_linear(fmt: str, O: int, K: int, g=None, device="cuda", bias: bool = False) -> KLinear:
    dev = device
    rand = lambda *shape: torch.rand(*shape, generator=g, device=dev)  # noqa: E731
    b = torch.randn(O, generator=g, device=dev) if bias else None
    if fmt == "bf16":
        return KLinear(F_BF16, O, K, (torch.randn(O, K, generator=g, device=dev) * 0.02).to(torch.bfloat16), bias=b)
    if fmt.startswith("fp8"):
        w = random_fp8_codes(O, K, g, dev)
        if fmt == "fp8":
            return KLinear(F_FP8, O, K, w, sc=torch.full((1,), 1e-3, device=dev), sbo=O, sbi=K, act=A_FP8, bias=b,
                           in_scale=torch.full((1,), 0.02, device=dev))
        if fmt == "fp8-rowwise":
            return KLinear(F_FP8, O, K, w, sc=rand(O) * 1e-3 + 1e-4, sbo=1, sbi=K, act=A_FP8_TOKEN, bias=b)
        if fmt == "fp8-weight-only":
            return KLinear(F_FP8, O, K, w, sc=rand(O) * 1e-3 + 1e-4, sbo=1, sbi=K, act=A_NONE, bias=b)
        if fmt == "fp8-block":
            sc = rand(math.ceil(O / 128), math.ceil(K / 128)) * 1e-3 + 1e-4
            return KLinear(F_FP8, O, K, w, sc=sc, sld=sc.shape[1], sbo=128, sbi=128, act=A_FP8_BLOCK, bias=b)
    if fmt == "nvfp4":
        return KLinear(F_NVFP4, O, K, _u8((O, K // 2), 256, g, dev), sc=_u8((O, K // 16), 0x20, g, dev) + 0x30,
                       gs=1e-3, act=A_NVFP4, in_scale=torch.full((1,), 4 / 2688, device=dev), bias=b)
    if fmt == "mxfp4":
        return KLinear(F_MXFP4, O, K, _u8((O, K // 2), 256, g, dev), sc=_u8((O, K // 32), 8, g, dev) + 118, act=A_MXFP4,
                       bias=b)
    if fmt in ("w4a16-awq", "w4a8-awq"):
        s = rand(O, K // 128) * 1e-3 + 1e-4
        kl = KLinear(F_INT4, O, K, _u8((O, K // 2), 256, g, dev), sc=s, zp=torch.full_like(s, 8.0), sld=K // 128,
                     sbi=128, pqs=rand(K) + 0.5, bias=b)
        if fmt == "w4a8-awq":
            kl.s2, kl.act, kl.in_scale = 1e-3 / 448 * 8, A_FP8, torch.full((1,), 0.02, device=dev)
        return kl
    if fmt == "w4a16-gptq":      # GPTQ as prepared: zero points 1..16 per group, f16-exact scales, no pre-quant scale
        s = (rand(O, K // 128) * 1e-3 + 1e-4).half().float()
        zp = torch.randint(1, 17, (O, K // 128), generator=g, device=dev).float()
        return KLinear(F_INT4, O, K, _u8((O, K // 2), 256, g, dev), sc=s, zp=zp, sld=K // 128, sbi=128, bias=b)
    raise ValueError(f"unknown recipe {fmt!r} (known: {', '.join(RECIPES)})")
