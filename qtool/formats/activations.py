"""Activation quantization applied to the input of every quantized linear (``x → x̂``, float32 out).

Contract (docs/numerics.md, "Activation quantization"); ``scheme`` is one of ACTIVATIONS:
- ``none``: ``x̂ = x``.
- ``fp8``: static per-tensor ``x̂ = e4m3(x / input_scale) * input_scale``; without an input_scale, dynamic
  per-tensor with ``input_scale = max(amax(x), 1e-12) / 448`` (the caller warns).
- ``fp8-token``: dynamic per token (last dim): ``s = max(amax_row, 1e-12) / 448``.
- ``fp8-block``: dynamic per token and 128-channel group: ``s = max(amax_group, 1e-4) / 448``.
- ``nvfp4``: ModelOpt's NVFP4 fake quant (triton ``fp4_fake_quant_block``): ``g = input_scale``;
  per 16 channels ``S = float(e4m3(min(amax16 / (6 g), 448))) * g``, ``S = 1`` where ``S < 1e-5``;
  ``x̂ = sign(x) * e2m1(|x| / S) * S``. Without an input_scale, ``g = amax(x) / (6*448)``.
- ``mxfp4``: per 32 channels ``e = clamp(ceil(log2(amax32 / 6)), -127, 127)``; ``x̂ = e2m1(x / 2^e) * 2^e``.
``pre_quant_scale`` (AWQ) is applied by the caller before this function.
"""
from __future__ import annotations

import torch

from qtool.formats import registry
from qtool.formats.fp4 import E2M1_MAX, MXFP4_BLOCK, NVFP4_BLOCK, _blocks, e2m1_round, e8m0_exponent
from qtool.formats.fp8 import E4M3_MAX, FP8_BLOCK, e4m3

ACTIVATIONS = tuple(registry.activation_codes())
NVFP4_MIN_SCALE = 1e-5


def _scalar(v, device) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32, device=device).reshape(())


def fp8_per_tensor(x: torch.Tensor, input_scale=None) -> torch.Tensor:
    x = x.float()
    if input_scale is None:
        s = x.abs().amax().clamp(min=1e-12) / E4M3_MAX
    else:
        s = _scalar(input_scale, x.device)
    return e4m3(x / s).float() * s


def fp8_per_group(x: torch.Tensor, group: int | None, floor: float) -> torch.Tensor:
    """Dynamic FP8 with one scale per ``group`` channels of the last dim (None = whole row)."""
    x = x.float()
    n = x.shape[-1]
    g = n if group is None else group
    pad = (-n) % g
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    xb = xp.reshape(*xp.shape[:-1], xp.shape[-1] // g, g)
    s = xb.abs().amax(-1, keepdim=True).clamp(min=floor) / E4M3_MAX
    out = (e4m3(xb / s).float() * s).reshape(xp.shape)
    return out[..., :n] if pad else out


def nvfp4_fake_quant(x: torch.Tensor, global_scale=None, block: int = NVFP4_BLOCK) -> torch.Tensor:
    x = x.float()
    g = (x.abs().amax() / (E2M1_MAX * E4M3_MAX) if global_scale is None
         else _scalar(global_scale, x.device))
    g = torch.where(g > 0, g, torch.full_like(g, 1e-12))
    xb = _blocks(x, block)
    amax = xb.abs().amax(-1, keepdim=True)
    s = e4m3(torch.clamp(amax / (6.0 * g), max=E4M3_MAX)).float() * g
    s = torch.where(s >= NVFP4_MIN_SCALE, s, torch.ones_like(s))
    q = e2m1_round(xb.abs() / s) * s
    return torch.where(xb >= 0, q, -q).reshape(x.shape)


def mxfp4_fake_quant(x: torch.Tensor, block: int = MXFP4_BLOCK) -> torch.Tensor:
    x = x.float()
    xb = _blocks(x, block)
    p = torch.exp2(e8m0_exponent(xb.abs().amax(-1, keepdim=True)))
    return (e2m1_round(xb / p) * p).reshape(x.shape)


def quantize_activation(scheme: str, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """Return x̂ (float32) for ``scheme``; see the module docstring for each rule."""
    if scheme == "none":
        return x.float()
    if scheme == "fp8":
        return fp8_per_tensor(x, input_scale)
    if scheme == "fp8-token":
        return fp8_per_group(x, None, 1e-12)
    if scheme == "fp8-block":
        return fp8_per_group(x, FP8_BLOCK, 1e-4)
    if scheme == "nvfp4":
        return nvfp4_fake_quant(x, input_scale)
    if scheme == "mxfp4":
        return mxfp4_fake_quant(x)
    raise ValueError(f"unknown activation scheme {scheme!r}; expected one of {', '.join(ACTIVATIONS)}")
