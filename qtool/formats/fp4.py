"""FP4 (E2M1) numerics: code tables, rounding, and the NVFP4 / MXFP4 weight formats.

Contract (docs/numerics.md):
- ``E2M1[c] = [0,.5,1,1.5,2,3,4,6,-0,-.5,-1,-1.5,-2,-3,-4,-6][c]``; bit 3 is the sign.
- ``e2m1_encode`` rounds |x| to the nearest magnitude with ties to the even mantissa
  (0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4), saturates at 6, and sets the sign bit for x < 0
  (so small negatives give code 8, "-0"), exactly like ModelOpt's ``NVFP4QTensor._cast_fp4``.
- Packing: two codes per byte along the last dim, element ``2k`` in the LOW nibble of byte ``k``.
- NVFP4 weight: ``W = E2M1[c] * float(weight_scale[o, i//16]) * weight_scale_2``.
- MXFP4 weight: ``W = E2M1[c] * 2^(weight_scale[o, i//32] - 127)``.
Encoders reproduce ModelOpt 0.47's export (``NVFP4QTensor.quantize`` / ``MXFP4QTensor.quantize``) byte for byte,
including MXFP4's export quirks (ties round DOWN, and +0 is written as code 8).
"""
from __future__ import annotations

import numpy as np
import torch

from qtool.formats.fp8 import E4M3_MAX, fp8_to_float, gather_table

E2M1_MAX = 6.0
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_ODD_BOUNDS = (0.75, 1.75, 3.5)   # ties that round UP to the even mantissa


def _table(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


_NP_VALUES = np.array(E2M1_VALUES, dtype=np.float32)
_T_VALUES = torch.from_numpy(_NP_VALUES)
_NP_BOUNDS = np.array(E2M1_BOUNDS, dtype=np.float32)


def _np_encode(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    code = np.searchsorted(_NP_BOUNDS, a, side="left").astype(np.uint8)
    code += np.isin(a, np.array(_ODD_BOUNDS, dtype=np.float32)).astype(np.uint8)
    code |= (x < 0).astype(np.uint8) << 3
    return code


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (uint8) of x (float32 math), round to nearest even, saturating at ±6."""
    x = x.float()
    if x.device.type == "cpu":   # numpy: same comparisons, ~20x faster than torch's CPU searchsorted here
        return torch.from_numpy(_np_encode(x.detach().contiguous().numpy()))
    a = x.abs()
    bounds = _table(E2M1_BOUNDS, x.device)
    ordinal = torch.searchsorted(bounds, a.contiguous(), out_int32=True).to(torch.uint8)
    tie_up = torch.zeros_like(ordinal)
    for b in _ODD_BOUNDS:
        tie_up |= (a == b).to(torch.uint8)
    return ((x < 0).to(torch.uint8) << 3) + ordinal + tie_up


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of codes 0..15."""
    if codes.device.type == "cpu" and codes.dtype == torch.uint8:
        return gather_table(_T_VALUES, codes)
    if codes.device.type == "cpu":
        return torch.from_numpy(np.take(_NP_VALUES, codes.contiguous().numpy().astype(np.intp)))
    return _table(E2M1_VALUES, codes.device)[codes.long()]


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the E2M1 grid (float32), same rounding as e2m1_encode."""
    return e2m1_decode(e2m1_encode(x))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2n]`` codes → ``[..., n]`` bytes, element 2k in the low nibble."""
    c = codes.to(torch.uint8)
    return (c[..., 1::2] << 4) | c[..., 0::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` bytes → ``[..., 2n]`` codes (uint8)."""
    p = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    if p.device.type == "cpu":
        n = p.contiguous().numpy()
        o = np.empty(n.shape[:-1] + (n.shape[-1] * 2,), dtype=np.uint8)
        o[..., 0::2] = n & 0x0F
        o[..., 1::2] = n >> 4
        return torch.from_numpy(o)
    out = torch.empty(*p.shape[:-1], p.shape[-1] * 2, dtype=torch.uint8, device=p.device)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the block size {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


# ---------------------------------------------------------------- NVFP4
def decode_nvfp4(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2,
                 block: int | None = None) -> torch.Tensor:
    vals = e2m1_decode(unpack_nibbles(weight))
    n_blocks = weight_scale.shape[-1]
    block = block or vals.shape[-1] // n_blocks
    s = fp8_to_float(weight_scale.to(vals.device)) * torch.as_tensor(weight_scale_2, dtype=torch.float32,
                                                                device=vals.device)
    return (_blocks(vals, block) * s.unsqueeze(-1)).reshape(vals.shape)


def nvfp4_block_scale(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """ModelOpt's exported per-block scale: ``e4m3(clamp(amax/(6*g), 2^-9, 448))``, all-zero block → 1.0."""
    s = block_amax.float() / (E2M1_MAX * global_scale)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s.clamp(min=2.0 ** -9, max=E4M3_MAX).to(torch.float8_e4m3fn)


def encode_nvfp4_weight(weight: torch.Tensor, block: int = NVFP4_BLOCK, weight_scale_2=None):
    """NVFP4 export of ``weight [out, in]``: (packed u8 ``[out, in/2]``, weight_scale e4m3 ``[out, in/block]``,
    weight_scale_2 f32 ``()`` = amax/(6*448) unless given)."""
    if weight_scale_2 is None:
        weight_scale_2 = weight.abs().amax().float() / (E2M1_MAX * E4M3_MAX)
    g = torch.as_tensor(weight_scale_2, dtype=torch.float32, device=weight.device).reshape(())
    wb = _blocks(weight, block)
    sb = nvfp4_block_scale(wb.abs().amax(dim=-1), g)
    scaled = (wb / (sb.float() * g).unsqueeze(-1)).reshape(weight.shape)
    return pack_nibbles(e2m1_encode(scaled)), sb, g


# ---------------------------------------------------------------- MXFP4
def decode_mxfp4(weight: torch.Tensor, weight_scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    vals = e2m1_decode(unpack_nibbles(weight))
    block = block or vals.shape[-1] // weight_scale.shape[-1]
    s = torch.exp2(weight_scale.to(vals.device).view(torch.uint8).float() - 127.0)
    return (_blocks(vals, block) * s.unsqueeze(-1)).reshape(vals.shape)


def _mx_export_codes(x: torch.Tensor) -> torch.Tensor:
    """MXFP4QTensor's cast: ties round down (strict >), sign bit from torch.sign (so +0 → code 8)."""
    sign_bit = ((2 - torch.sign(x)) // 2).to(torch.uint8)
    bounds = _table(E2M1_BOUNDS, x.device)
    ordinal = ((x.abs().unsqueeze(-1) - bounds) > 0).sum(dim=-1).to(torch.uint8)
    return sign_bit * 8 + ordinal


def encode_mxfp4_weight(weight: torch.Tensor, block: int = MXFP4_BLOCK):
    """MXFP4 export of ``weight [out, in]``: (packed u8 ``[out, in/2]``, E8M0 u8 ``[out, in/block]``), with
    exponent ``ceil(log2(block_amax/6))`` clamped at -127 (ModelOpt's rule)."""
    wb = _blocks(weight, block)
    amax = wb.float().abs().amax(dim=-1, keepdim=True)
    e = torch.ceil(torch.maximum(torch.log2(amax / E2M1_MAX), torch.tensor(-127.0, device=weight.device)))
    codes = _mx_export_codes((wb / torch.exp2(e)).reshape(weight.shape))
    return pack_nibbles(codes), (e.squeeze(-1) + 127).to(torch.uint8)


def e8m0_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Exact ``clamp(ceil(log2(amax/6)), -127, 127)`` (float32 ratio, exact ceil via frexp); amax 0 → -127.

    This is the rule of ModelOpt's MX fake-quant kernel (``compute_scale_e8m0_NV``), used for activations.
    """
    ratio = amax.float() / E2M1_MAX
    mant, exp = torch.frexp(ratio)            # ratio = mant * 2^exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp).float()
    e = torch.where(ratio > 0, e, torch.full_like(e, -127.0))
    return e.clamp(-127.0, 127.0)
