"""Repack a ``LinearWeights`` (on-disk quantized tensors) into the layout linear.cu reads, on the GPU.

Contract: ``prepare_linear(lw, device) -> KLinear``. Every format maps to one of five kernel formats
(linear.cu's header): bf16 (bf16/fp16/fp32 weights, cast to bf16), fp8 (per-tensor, rowwise and 128x128 block
all as a scale grid), nvfp4, mxfp4, int4 (ModelOpt AWQ, GPTQ and AutoAWQ all as unsigned nibbles along ``in``
with per-group f32 scale and zero; GPTQ act-order ``g_idx`` becomes an input permutation). Codes are moved
bit-exactly, so the decoded weight equals ``lw.dequantize()`` (up to the bf16 cast of non-bf16 dense weights).
``gemv_ok`` says whether the 16-byte-vector decode path applies (else the general tiled kernel runs); fp8
weights on the fp8 x fp8 decode path are put in the mma-tiled order (``to_tiled``; ``ops.adopt_layout`` decides),
4-bit codes given a second, q4-tiled copy (``q4``, qtool/kernels/gemv_4bit.py; ``nbytes`` counts one copy of the
codes: a decode step reads one).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qtool.formats import registry

_FMT = registry.weight_formats()           # kernel codes: recipes/formats.toml
F_BF16, F_FP8, F_NVFP4, F_MXFP4, F_INT4 = (_FMT[f].kernel for f in ("bf16", "fp8", "nvfp4", "mxfp4", "int4-awq"))
ACT_CODES = registry.activation_codes()
EPV = {f.kernel: f.kernel_epv for f in _FMT.values()}
F_FP8T = 5      # linear.cu's FMT_FP8T: fp8 codes in mma_tile_fp8's order (a kernel layout, not a checkpoint format)
# act_quant.cu's scheme codes (KLinear.act), by recipes/formats.toml's activation names
A_NONE, A_FP8, A_FP8_TOKEN, A_FP8_BLOCK, A_NVFP4, A_MXFP4 = (
    ACT_CODES[a] for a in ("none", "fp8", "fp8-token", "fp8-block", "nvfp4", "mxfp4"))


@dataclass
class KLinear:
    fmt: int
    out_features: int
    in_features: int
    w: torch.Tensor
    sc: torch.Tensor | None = None
    zp: torch.Tensor | None = None
    gs: float = 1.0
    s2: float = 0.0
    sld: int = 1
    sbo: int = 1
    sbi: int = 1
    bias: torch.Tensor | None = None
    act: int = 0
    in_scale: torch.Tensor | None = None
    pqs: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    note: str = ""
    tiled: bool = False          # fp8 codes in mma_tile_fp8's order instead of row-major [O, K]
    il: int = 0                  # > 0: gate|up rows interleaved in groups of 8, il = I (ops.interleave_gate_up)
    rm: torch.Tensor | None = None   # tiled fp8: a row-major copy of the codes for the cuBLAS GEMMs (gemm.py)
    q4: torch.Tensor | None = None   # 4-bit codes also in gemv_4bit.tile_codes' order (the decode GEMV gemv_q4)

    @property
    def gemv_ok(self) -> bool:
        k = self.in_features
        if self.tiled or k % EPV[self.fmt] or self.w.data_ptr() % 16:
            return False
        if self.fmt == F_FP8:
            return self.sbi >= k or self.sbi % 16 == 0
        if self.fmt == F_INT4:
            return self.sbi % 32 == 0
        return True

    @property
    def half_ok(self) -> bool:
        """Whether gemv_h (f16 pair math) applies: quantized formats with power-of-two scale blocks."""
        if not self.gemv_ok or self.fmt == F_BF16 or self.in_features % 8:
            return False
        if self.fmt == F_INT4:
            return self.s2 == 0.0 and _pow2(self.sbi)
        if self.fmt == F_FP8:
            return self.sbi >= self.in_features or _pow2(self.sbi)
        return True

    @property
    def sbi_log2(self) -> int:
        if self.fmt == F_FP8 and self.sbi >= self.in_features:
            return -1
        return self.sbi.bit_length() - 1

    def nbytes(self) -> int:
        ts = (self.w, self.sc, self.zp, self.bias, self.pqs)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _pack_rows_along_in(u: torch.Tensor) -> torch.Tensor:
    """unsigned codes [O, K] (0..15) -> bytes [O, K/2], element 2k in the low nibble."""
    u = u.to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def _f32(t, device):
    return None if t is None else t.detach().to(device=device, dtype=torch.float32).contiguous()


def prepare_linear(lw, device) -> KLinear:
    from qtool.formats import fp8 as f8
    from qtool.formats import int4 as i4
    t = {k: v.to(device) for k, v in lw.tensors.items() if v is not None}
    O, K = lw.out_features, lw.in_features
    fmt = lw.format
    kl: KLinear
    if fmt == "bf16":
        w = t["weight"]
        note = "" if w.dtype == torch.bfloat16 else f"{w.dtype} weight cast to bf16"
        kl = KLinear(F_BF16, O, K, w.to(torch.bfloat16).contiguous(), note=note)
    elif fmt in ("fp8", "fp8-rowwise"):
        s = t["weight_scale"].float().reshape(-1)
        w = t["weight"].contiguous().view(torch.uint8)
        if s.numel() == 1:
            kl = KLinear(F_FP8, O, K, w, sc=s.contiguous(), sld=1, sbo=max(O, 1), sbi=max(K, 1))
        else:
            kl = KLinear(F_FP8, O, K, w, sc=s.contiguous(), sld=1, sbo=1, sbi=max(K, 1))
    elif fmt == "fp8-block":
        s = t.get("weight_scale_inv", t.get("weight_scale"))
        s2d = f8.block_scale_2d(s).contiguous()
        bo, bi = s2d.shape
        sbo = lw.group_size or f8._block_len(O, bo)
        sbi = lw.group_size or f8._block_len(K, bi)
        kl = KLinear(F_FP8, O, K, t["weight"].contiguous().view(torch.uint8), sc=s2d, sld=bi, sbo=sbo, sbi=sbi)
    elif fmt == "nvfp4":
        if K % 16 or t["weight_scale"].shape[-1] * 16 != K:
            raise ValueError(f"nvfp4 weight {O}x{K}: only 16-element blocks are supported")
        kl = KLinear(F_NVFP4, O, K, t["weight"].contiguous().view(torch.uint8),
                     sc=t["weight_scale"].contiguous().view(torch.uint8),
                     gs=float(t["weight_scale_2"].float().reshape(-1)[0]))
    elif fmt == "mxfp4":
        if K % 32 or t["weight_scale"].shape[-1] * 32 != K:
            raise ValueError(f"mxfp4 weight {O}x{K}: only 32-element blocks are supported")
        kl = KLinear(F_MXFP4, O, K, t["weight"].contiguous().view(torch.uint8),
                     sc=t["weight_scale"].contiguous().view(torch.uint8))
    elif fmt == "int4-awq":
        p = t["weight"].view(torch.uint8)
        u = torch.empty(O, K, dtype=torch.uint8, device=device)
        u[0::2] = (p & 0x0F) ^ 0x08          # signed nibble -> unsigned u = q + 8
        u[1::2] = (p >> 4) ^ 0x08
        s = t["weight_scale"].float().contiguous()
        g = K // s.shape[1]
        s2 = 0.0
        if lw.fp8_weight_stage:
            s2 = float(t["weight_scale_2"].float().reshape(-1)[0])
        kl = KLinear(F_INT4, O, K, _pack_rows_along_in(u), sc=s, zp=torch.full_like(s, 8.0), s2=s2,
                     sld=s.shape[1], sbi=g)
    elif fmt in ("gptq", "autoawq"):
        if fmt == "gptq":
            q = i4._unpack_i32(t["qweight"], 0)                 # [K, O]
            z = i4._unpack_i32(t["qzeros"], 1) + 1              # [G, O]
        else:
            q = i4._awq_columns(t["qweight"])
            z = i4._awq_columns(t["qzeros"])
        s = t["scales"].float()
        G = s.shape[0]
        g = K // G
        perm = None
        gi = t.get("g_idx")
        if fmt == "gptq" and gi is not None and gi.numel():
            gi = gi.long()
            if not torch.equal(gi, torch.arange(K, device=device) // g):
                perm = torch.argsort(gi, stable=True)
                if not torch.equal(torch.bincount(gi, minlength=G), torch.full((G,), g, device=device)):
                    raise ValueError("gptq g_idx with unequal group sizes is not supported by the CUDA kernels")
                q = q[perm]
        kl = KLinear(F_INT4, O, K, _pack_rows_along_in(q.t().contiguous()), sc=s.t().contiguous(),
                     zp=z.t().float().contiguous(), sld=G, sbi=g, perm=perm)
    else:
        raise ValueError(f"weight format {fmt!r} has no CUDA kernel")
    kl.bias = _f32(lw.bias, device)
    kl.act = ACT_CODES[lw.activation]
    ins = t.get("input_scale")
    if ins is not None and kl.act in (A_FP8, A_NVFP4):
        kl.in_scale = ins.float().reshape(-1).amax().reshape(1).contiguous()
    pqs = _f32(t.get("pre_quant_scale"), device)
    if pqs is not None:
        pqs = pqs.reshape(-1)
        if kl.perm is not None:
            pqs = pqs[kl.perm].contiguous()
    kl.pqs = pqs
    if lw.note:
        kl.note = (kl.note + "; " if kl.note else "") + lw.note
    return kl


def mma_tile_fp8(w: torch.Tensor) -> torch.Tensor:
    """fp8 codes [O, K] (K % 64 == 0) in the mma-tiled order of linear.cu (gemv_mma4p, gemm<5>, gemm_tc<5, .>):
    rows padded to 16 with zeros, then [O/16, K/64, 2 (rows 0-7 | 8-15), 8 rows, 4 chunks of 16 k, 16 bytes]."""
    O, K = w.shape
    if K % 64:
        raise ValueError(f"mma tiling needs K % 64 == 0 (got {K})")
    Op = -(-O // 16) * 16
    if Op != O:
        w = torch.cat([w, w.new_zeros(Op - O, K)])
    return w.view(Op // 16, 2, 8, K // 64, 4, 16).permute(0, 3, 1, 2, 4, 5).contiguous()


def mma_untile_fp8(wt: torch.Tensor, O: int, K: int) -> torch.Tensor:
    """The inverse of mma_tile_fp8: row-major codes [O, K] (padding rows dropped)."""
    Op = -(-O // 16) * 16
    return wt.reshape(Op // 16, K // 64, 2, 8, 4, 16).permute(0, 2, 3, 1, 4, 5).reshape(Op, K)[:O]


def to_tiled(kl: KLinear) -> KLinear:
    """kl with mma-tiled weights (no row-major copy is kept: prefill reads the same bytes through gemm<5>). Lay
    weights out at load time only: gemv_mma4p prefetches them before it waits for the previous kernel
    (programmatic dependent launch), so they must not be written right before it."""
    return replace(kl, w=mma_tile_fp8(kl.w), tiled=True)
