"""Independent decoders for checkpoints written by `qtool quantize`, for the tests only.

Written from the layouts in shared/reference/checkpoint-formats.md §3 (ModelOpt 0.47 export) and
§4 (GPTQ v1), in float64, with no qtool import: each returns the dequantized weight (out, in) of
one linear module from a flat {name: tensor} dict.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

E2M1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)


def load_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def hf_quant(folder: Path) -> dict:
    return json.loads((Path(folder) / "hf_quant_config.json").read_text())["quantization"]


def f64(t):
    return t.to(torch.float32).to(torch.float64)


def fp8(sd: dict, mod: str):
    """FP8 per-tensor (scalar scale), per-channel ((out,) scale) or 2D block ((out/128,1,in/128,1) scale)."""
    w, s = f64(sd[f"{mod}.weight"]), f64(sd[f"{mod}.weight_scale"])
    if s.dim() == 0:
        return w * s
    if s.dim() == 1:
        return w * s[:, None]
    s2 = s.squeeze(1).squeeze(-1)
    bo, bi = w.shape[0] // s2.shape[0], w.shape[1] // s2.shape[1]
    return w * s2.repeat_interleave(bo, 0).repeat_interleave(bi, 1)


def _fp4_codes(packed):
    p = packed.to(torch.int64)
    return torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).reshape(p.shape[0], -1)   # low nibble = even index


def nvfp4(sd: dict, mod: str):
    vals = E2M1[_fp4_codes(sd[f"{mod}.weight"])]
    bs = f64(sd[f"{mod}.weight_scale"])                    # fp8 e4m3, (out, in/16)
    g = vals.shape[1] // bs.shape[1]
    return vals * bs.repeat_interleave(g, 1) * f64(sd[f"{mod}.weight_scale_2"])


def mxfp4(sd: dict, mod: str):
    vals = E2M1[_fp4_codes(sd[f"{mod}.weight"])]
    e = sd[f"{mod}.weight_scale"].to(torch.float64)        # uint8 E8M0 biased exponent, (out, in/32)
    g = vals.shape[1] // e.shape[1]
    return vals * torch.pow(2.0, e - 127).repeat_interleave(g, 1)


def int4_awq(sd: dict, mod: str):
    """ModelOpt INT4: uint8 (out/2, in), row 2j low nibble, signed; fp32 scale (out, in/g). Returns q*s
    (without pre_quant_scale: the runtime computes (x * pqs) @ W^T)."""
    p = sd[f"{mod}.weight"].to(torch.int64)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    q = torch.stack([lo, hi], dim=1).reshape(-1, p.shape[1])
    q = torch.where(q >= 8, q - 16, q).to(torch.float64)
    s = f64(sd[f"{mod}.weight_scale"])
    return q * s.repeat_interleave(q.shape[1] // s.shape[1], 1)


def gptq(sd: dict, mod: str):
    """GPTQ v1: W[i, o] = scales[g_idx[i], o] * (q[i, o] - (z[g_idx[i], o] + 1)); returns (out, in)."""
    qw = sd[f"{mod}.qweight"].to(torch.int64) & 0xFFFFFFFF        # (in/8, out)
    shifts = torch.arange(8, dtype=torch.int64) * 4
    q = ((qw[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qw.shape[1])   # (in, out), row 8r+j
    qz = sd[f"{mod}.qzeros"].to(torch.int64) & 0xFFFFFFFF          # (in/g, out/8)
    z = ((qz[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(qz.shape[0], -1)   # (in/g, out)
    g_idx = sd[f"{mod}.g_idx"].to(torch.int64)
    s = f64(sd[f"{mod}.scales"])
    w = s[g_idx] * (q.to(torch.float64) - (z[g_idx] + 1).to(torch.float64))
    return w.t()


DECODERS = {"FP8": fp8, "FP8_PER_CHANNEL_PER_TOKEN": fp8, "FP8_PB_WO": fp8, "NVFP4": nvfp4, "MXFP4": mxfp4,
            "W4A16_AWQ": int4_awq, "W4A8_AWQ": int4_awq, "GPTQ": gptq}


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())
