"""INT4 weight formats: ModelOpt INT4-AWQ (W4A16 / W4A8), GPTQ (AutoGPTQ v1, sym), AutoAWQ (gemm).

Contract (docs/numerics.md), all decoders return float32 ``[out, in]``:
- ``int4-awq``: ``weight`` u8 ``[out/2, in]``, row 2j in the LOW nibble, signed two's complement;
  ``W = q * weight_scale[o, i//g]``; W4A8 adds the FP8 stage ``W = e4m3(W / weight_scale_2) * weight_scale_2``.
  ``pre_quant_scale`` is an activation-side factor (``x * pqs``), never folded into W here.
- ``gptq``: ``qweight`` i32 ``[in/8, out]`` (input 8r+j at bits 4j), ``qzeros`` i32 ``[groups, out/8]``
  (v1: stored zero = true zero - 1), ``scales`` ``[groups, out]``, ``g_idx`` ``[in]``;
  ``W[o, i] = scales[g, o] * (q - (z + 1))`` with ``g = g_idx[i]`` (``i // group_size`` when g_idx is absent).
- ``autoawq``: ``qweight`` i32 ``[in, out/8]`` with nibble k of int32 c holding column ``8c + [0,2,4,6,1,3,5,7][k]``;
  same for ``qzeros`` ``[groups, out/8]``; ``W[o, i] = (q - z) * scales[i//g, o]``.
The encoder ``encode_int4_awq`` reproduces ModelOpt's ``pack_int4_in_uint8`` byte for byte.
"""
from __future__ import annotations

import torch

from qtool.formats.fp8 import E4M3_MAX, e4m3

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _sext4(n: torch.Tensor) -> torch.Tensor:
    n = n.to(torch.int16)
    return torch.where(n >= 8, n - 16, n)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt ``[out/2, in]`` u8 → signed int4 values ``[out, in]`` (int16)."""
    p = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    half, in_f = p.shape
    out = torch.empty(half * 2, in_f, dtype=torch.int16, device=p.device)
    out[0::2] = _sext4(p & 0x0F)
    out[1::2] = _sext4(p >> 4)
    return out


def decode_int4_awq(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2=None,
                    fp8_weight_stage: bool = False) -> torch.Tensor:
    q = unpack_int4_rows(weight).float()
    s = weight_scale.float().to(q.device)
    g = q.shape[1] // s.shape[1]
    w = q * s.repeat_interleave(g, dim=1)
    if fp8_weight_stage:
        if weight_scale_2 is None:
            raise ValueError("W4A8 AWQ needs weight_scale_2 for its FP8 stage")
        s2 = torch.as_tensor(weight_scale_2, dtype=torch.float32, device=w.device).reshape(())
        w = e4m3(w / s2).float() * s2
    return w


def encode_int4_awq(weight: torch.Tensor, group_size: int = 128, weight_scale: torch.Tensor | None = None):
    """ModelOpt INT4 export: (packed u8 ``[out/2, in]``, weight_scale f32 ``[out, in/g]`` = block_amax/7)."""
    out_f, in_f = weight.shape
    if out_f % 2 or in_f % group_size:
        raise ValueError(f"int4-awq needs an even out dim and in % {group_size} == 0, got {out_f}x{in_f}")
    if weight_scale is None:
        amax = weight.reshape(out_f, in_f // group_size, group_size).abs().amax(-1).float()
        weight_scale = amax / 7.0
    q = (weight / weight_scale[:, torch.arange(in_f, device=weight.device) // group_size]).round().clamp(-8, 7)
    q = q.to(torch.int8)
    packed = (q[0::2] & 0x0F) | ((q[1::2] & 0x0F) << 4)
    return packed.view(torch.uint8), weight_scale.float()


def w4a8_weight_scale_2(weight_int4: torch.Tensor) -> torch.Tensor:
    """Second (FP8) stage scale of W4A8 AWQ: ``amax(int4-dequantized weight) / 448``."""
    return weight_int4.abs().amax().float() / E4M3_MAX


def _unpack_i32(x: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 tensor → 8 nibbles per element, new axis inserted after ``dim`` then merged (sequential order)."""
    x = x.to(torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=x.device)
    nib = (x.unsqueeze(dim + 1) >> shifts.view(*([1] * (dim + 1)), 8, *([1] * (x.dim() - dim - 1)))) & 15
    shape = list(x.shape)
    shape[dim] *= 8
    return nib.reshape(shape)


def decode_gptq(qweight, qzeros, scales, g_idx=None, group_size: int | None = None) -> torch.Tensor:
    q = _unpack_i32(qweight, 0)                       # [in, out]
    z = _unpack_i32(qzeros, 1) + 1                    # [groups, out], v1 stores zero - 1
    in_f, out_f = q.shape
    if g_idx is None or g_idx.numel() == 0:
        if not group_size or group_size < 0:
            group_size = in_f
        g = torch.arange(in_f, device=q.device) // group_size
    else:
        g = g_idx.long().to(q.device)
    s = scales.float()
    w = s[g] * (q - z[g]).float()                     # [in, out]
    return w.t().contiguous()


def _awq_columns(x: torch.Tensor) -> torch.Tensor:
    nib = _unpack_i32(x, 1)                           # [rows, out] in nibble order
    rows, cols = nib.shape
    nib = nib.reshape(rows, cols // 8, 8)
    order = torch.tensor(AWQ_ORDER, device=x.device)
    out = torch.empty_like(nib)
    out[..., order] = nib                             # nibble k holds column 8c + ORDER[k]
    return out.reshape(rows, cols)


def decode_autoawq(qweight, qzeros, scales, group_size: int | None = None) -> torch.Tensor:
    q = _awq_columns(qweight)                         # [in, out]
    z = _awq_columns(qzeros)                          # [groups, out]
    in_f = q.shape[0]
    group = group_size if group_size and group_size > 0 else in_f // scales.shape[0]
    g = torch.arange(in_f, device=q.device) // group
    w = (q - z[g]).float() * scales.float()[g]
    return w.t().contiguous()
