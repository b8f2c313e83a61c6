"""KV-cache storage formats: what is written to the cache and how it is read back.

Contract (docs/numerics.md, "KV cache"); ``x`` is ``[..., head_dim]`` (after RoPE), ``scale`` the layer's
``k_scale`` / ``v_scale`` (ModelOpt ≥0.42: amax/448; 1.0 when absent):
- ``bf16``: stored ``(x.to(bfloat16),)``; read ``.float()``.
- ``fp8``: stored ``(e4m3(x / scale),)``; read ``x8.float() * scale``.
- ``nvfp4``: global ``g = scale / 6``; per 16 contiguous head_dim elements ``sb = e4m3(min(amax16 / (6 g), 448))``;
  codes ``e2m1(x / (float(sb) g))`` packed two per byte (low nibble first); a block with ``float(sb) g < 1e-5`` is
  stored as zeros (ModelOpt's fake quant rounds every element of such a block to 0). Stored
  ``(packed u8 [..., head_dim/2], sb e4m3 [..., head_dim/16])``; read ``E2M1[c] * float(sb) * g``.
"""
from __future__ import annotations

import torch

from qtool.formats import registry
from qtool.formats.activations import NVFP4_MIN_SCALE
from qtool.formats.fp4 import (E2M1_MAX, NVFP4_BLOCK, _blocks, e2m1_decode, e2m1_encode, pack_nibbles,
                               unpack_nibbles)
from qtool.formats.fp8 import E4M3_MAX, e4m3, fp8_to_float

KV_FORMATS = tuple(registry.kv_format_codes())


def kv_encode(fmt: str, x: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    if fmt == "bf16":
        return (x.to(torch.bfloat16),)
    scale = float(scale)
    if fmt == "fp8":
        return (e4m3(x.float() / scale),)
    if fmt == "nvfp4":
        g = torch.tensor(scale, dtype=torch.float32, device=x.device) / E2M1_MAX
        xb = _blocks(x.float(), NVFP4_BLOCK)
        amax = xb.abs().amax(-1, keepdim=True)
        sb = e4m3(torch.clamp(amax / (6.0 * g), max=E4M3_MAX))
        s = fp8_to_float(sb) * g
        ok = s >= NVFP4_MIN_SCALE
        codes = e2m1_encode(torch.where(ok, xb / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(xb)))
        return pack_nibbles(codes.reshape(x.shape)), sb.squeeze(-1)
    raise ValueError(f"unknown KV cache format {fmt!r}; expected one of {', '.join(KV_FORMATS)}")


def kv_decode(fmt: str, *stored: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    if fmt == "bf16":
        return stored[0].float()
    scale = float(scale)
    if fmt == "fp8":
        return fp8_to_float(stored[0]) * scale
    if fmt == "nvfp4":
        packed, sb = stored
        g = torch.tensor(scale, dtype=torch.float32, device=packed.device) / E2M1_MAX
        vals = _blocks(e2m1_decode(unpack_nibbles(packed)), NVFP4_BLOCK)
        return (vals * (fp8_to_float(sb) * g).unsqueeze(-1)).reshape(vals.shape[:-2] + (-1,))
    raise ValueError(f"unknown KV cache format {fmt!r}; expected one of {', '.join(KV_FORMATS)}")
