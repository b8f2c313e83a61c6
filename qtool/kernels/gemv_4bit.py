"""The 4-bit decode GEMV on the tensor cores (kernels_cuda/gemv_4bit.cu, gemv_q4): its weight layout, plan and
launch.

Contract: ``tile_codes(w, O, K, fp4)`` repacks row-major 4-bit codes (u8 [O, K/2], element 2k in the low nibble:
nvfp4, mxfp4 and weights.py's int4) into the q4-tile order gemv_q4 reads (u8 [ceil(O/16) * 8 * K], gemv_4bit.cu's
header; fp4: e2m1 codes bit-permuted inside each word for a cheaper decode); ``untile_codes(t, O, K, fp4)`` inverts
it (both plain torch, any device). ``supported(kl)``: the layer's format, scale
groups and activation scheme fit gemv_q4; ``adopt(kl)``: kl with ``q4`` (the tiled codes, beside the row-major ones
the prefill paths read) set; ``applies(kl, M)``: its decode GEMV for M rows is gemv_q4; ``launch(q, kl, y, M)`` runs
it on ``ops.q4_input``'s outputs ``q`` (xh, hs; xsc for mxfp4 activations) into y [M, O];
tests/gpu/test_gemv_4bit.py checks it against float64.
"""
from __future__ import annotations

import functools
import math

import torch

from qtool.kernels.split import MMA4_MAX_SLICES, kslices, mma4_split
from qtool.kernels.weights import A_MXFP4, A_NONE, A_NVFP4, F_INT4, F_MXFP4, F_NVFP4, KLinear

P8 = (0, 4, 1, 5, 2, 6, 3, 7)      # act_quant's f16 pair order for 4-bit weights (hperm 2)
STEP_K = 256                       # k per iteration of a warp (4 rounds of 64): K slices are multiples of it


@functools.lru_cache(maxsize=None)
def _nibble_source() -> torch.Tensor:
    """For each of the 1024 nibbles of one (tile, round) block in memory order (lane, word, nibble), the code it
    holds as row * 64 + k within the 16 x 64 block (gemv_4bit.cu's layout)."""
    idx = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for j in range(4):
            for n in range(8):
                step = 2 * (j >> 1) + ((n & 3) >> 1)
                slot = 2 * (n & 1) + (n >> 2)
                k = 16 * step + 8 * (t >> 1) + P8[4 * (t & 1) + slot]
                idx.append((g + 8 * (j & 1)) * 64 + k)
    return torch.tensor(idx, dtype=torch.int64)


# e2m1 codes (nvfp4, mxfp4) are stored bit-permuted inside each 32-bit word so that gemv_4bit.cu's e2m1x8_to_h2
# needs 12 operations per 8 codes: nibble n (pair j = n & 3, half n >> 2) keeps its 3 magnitude bits at
# FP4_EM[j].. and its sign at FP4_SIGN[j] of that 16-bit half; int4 words keep the nibble order (bits 4n..4n+3)
FP4_EM = (0, 3, 10, 13)
FP4_SIGN = (6, 9, 7, 8)


def _words(nib: torch.Tensor, fp4: bool) -> torch.Tensor:
    """Codes [..., 8] (nibble order) -> their 32-bit words as int64 [...]."""
    word = torch.zeros(nib.shape[:-1], dtype=torch.int64, device=nib.device)
    for n in range(8):
        c = nib[..., n].long()                       # one code position at a time (load-time memory)
        if fp4:
            base = 16 * (n >> 2)
            word |= ((c & 7) << (base + FP4_EM[n & 3])) | ((c >> 3) << (base + FP4_SIGN[n & 3]))
        else:
            word |= c << (4 * n)
    return word


def _codes(word: torch.Tensor, fp4: bool) -> torch.Tensor:
    """The inverse of _words: int64 words [...] -> codes u8 [..., 8]."""
    out = []
    for n in range(8):
        if fp4:
            base = 16 * (n >> 2)
            out.append(((word >> (base + FP4_EM[n & 3])) & 7) | (((word >> (base + FP4_SIGN[n & 3])) & 1) << 3))
        else:
            out.append((word >> (4 * n)) & 15)
    return torch.stack(out, dim=-1).to(torch.uint8)


def tile_codes(w: torch.Tensor, O: int, K: int, fp4: bool = False) -> torch.Tensor:
    """Row-major codes u8 [O, K/2] -> the q4-tile bytes, u8 [ceil(O/16) * 16 * K/2] (rows past O: zero codes);
    fp4: e2m1 codes, bit-permuted in each word (FP4_EM, FP4_SIGN)."""
    if K % 64:
        raise ValueError(f"q4 tiles need K % 64 == 0 (K = {K})")
    T, R = math.ceil(O / 16), K // 64
    u = torch.zeros(T * 16, K, dtype=torch.uint8, device=w.device)
    w = w.reshape(O, K // 2)
    u[:O, 0::2] = w & 15
    u[:O, 1::2] = w >> 4
    blocks = u.view(T, 16, R, 64).permute(0, 2, 1, 3).reshape(T, R, 1024)
    word = _words(blocks[:, :, _nibble_source().to(w.device)].view(T, R, 128, 8), fp4)
    return torch.stack([(word >> (8 * b)) & 255 for b in range(4)], dim=-1).to(torch.uint8).reshape(-1).contiguous()


def untile_codes(t: torch.Tensor, O: int, K: int, fp4: bool = False) -> torch.Tensor:
    """The inverse of tile_codes: q4-tile bytes -> row-major codes u8 [O, K/2]."""
    T, R = math.ceil(O / 16), K // 64
    b = t.view(T, R, 128, 4).long()
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    nib = _codes(word, fp4).view(T, R, 1024)
    blocks = torch.empty_like(nib)
    blocks[:, :, _nibble_source().to(t.device)] = nib
    u = blocks.view(T, R, 16, 64).permute(0, 2, 1, 3).reshape(T * 16, K)[:O]
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def _group(kl: KLinear) -> tuple[int, int] | None:
    """(PA, glog2) of gemv_q4 for the layer: PA the mma steps of 16 k summed before a scale is applied (16: once per
    iteration), glog2 the log2 of the int4 scale group along K (30: one group per row); None if the scale grid does
    not fit."""
    if kl.fmt == F_NVFP4:                            # block scales folded into the weights (and x: act_quant fold)
        return 16, 4
    if kl.fmt == F_MXFP4:
        return 2, 5
    if kl.sld == 1:                                  # one scale per row (GPTQ without groups)
        return 8, 30
    g = kl.sbi
    if g < 32 or g & (g - 1) or kl.sld * g != kl.in_features:
        return None
    return min(g // 16, 8), g.bit_length() - 1


def supported(kl: KLinear) -> bool:
    """gemv_q4 can run this layer: nvfp4 (weight-only or nvfp4 activations with a static global scale), mxfp4
    (weight-only or mxfp4 activations), int4 weight-only (no W4A8 FP8 stage) with power-of-two groups of >= 32 or
    one scale per row; K % 64 == 0 and K <= 16384 (act_quant's register kernel); 4-byte aligned scales."""
    K = kl.in_features
    if kl.fmt not in (F_NVFP4, F_MXFP4, F_INT4) or K % 64 or K > 16 * 1024 or kl.tiled or _group(kl) is None:
        return False
    if kl.sc is None or kl.sc.data_ptr() % 4:          # the kernel reads fp4 block scales 2 or 4 at a time
        return False
    if kl.fmt == F_INT4:
        return kl.act == A_NONE and kl.s2 == 0.0 and kl.zp is not None
    if kl.fmt == F_NVFP4:
        return kl.act == A_NONE or (kl.act == A_NVFP4 and kl.in_scale is not None)
    return kl.act in (A_NONE, A_MXFP4)


def adopt(kl: KLinear) -> KLinear:
    """kl with its codes also in the q4-tile order (``q4``), if gemv_q4 supports it; else kl unchanged."""
    if kl.q4 is not None or not supported(kl):
        return kl
    from dataclasses import replace
    return replace(kl, q4=tile_codes(kl.w, kl.out_features, kl.in_features, fp4=kl.fmt != F_INT4))


def applies(kl: KLinear, M: int) -> bool:
    return M <= 8 and kl.q4 is not None and supported(kl)


def kernel_name(kl: KLinear) -> str:
    pa, _ = _group(kl)
    return f"gemv_q4<{kl.fmt}, {pa}, {int(kl.act == A_MXFP4)}>"


def plan(O: int, K: int, name: str) -> tuple[int, int]:
    """(S, kslice): K slices of a 16-row tile, the warps of its block, planned as gemv_mma4p's (split.mma4_split:
    enough warps, at most MMA4_MAX_SLICES, every block resident at once) with gemv_q4's register count."""
    return mma4_split(O, K, name, file="gemv_4bit")


def launch(q: dict, kl: KLinear, y: torch.Tensor, M: int, S: int | None = None) -> None:
    """gemv_q4 on ops.q4_input's outputs q into y [M, O] (S: K slices, default from plan)."""
    from qtool.kernels.launch import f32, i32, ptr
    from qtool.kernels.launch import launch as run
    O, K = kl.out_features, kl.in_features
    name = kernel_name(kl)
    if S is None:
        S, kslice = plan(O, K, name)
    else:
        S, kslice = kslices(K, min(S, MMA4_MAX_SLICES), STEP_K)
    _, glog2 = _group(kl)
    run("gemv_4bit", name, (math.ceil(O / 16),), (32 * S,),
        (ptr(q["xh"]), ptr(q["hs"]), ptr(q.get("xsc")), ptr(kl.q4), ptr(kl.sc), ptr(kl.zp), f32(kl.gs), i32(kl.sld),
         i32(glog2), ptr(kl.bias), ptr(y), i32(y.stride(0)), i32(M), i32(O), i32(K), i32(kslice)),
        smem=512 * S if S > 1 else 0)
