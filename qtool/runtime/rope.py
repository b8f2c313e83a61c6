"""Rotary position embedding (the Hugging Face "rotate half" form), shared by every backend.

Contract: `inv_freq(head_dim, theta, scaling)` returns the float32 inverse frequencies
`[head_dim/2]` exactly as transformers computes them (default, 'linear', and the 'llama3' rule);
`cos_sin(inv_freq, positions)` → (cos, sin) `[..., head_dim]` in float32 for an integer
position tensor; `apply(x, cos, sin)` rotates x `[..., heads, d]` with cos/sin broadcast over
heads. Unknown rope types raise Unsupported (one line).
"""
from __future__ import annotations

import math

import torch

from qtool.errors import Unsupported

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type") or scaling.get("type") or "default")


def inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    kind = rope_type(scaling)
    if kind == "default":
        return base
    if kind == "linear":
        return base / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / base
        scaled = torch.where(wavelen > low_wavelen, base / factor, base)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise Unsupported(f"rope scaling type {kind!r} is not supported by qtool's runtime",
                      hint="supported: " + ", ".join(SUPPORTED_ROPE_TYPES))


def cos_sin(inv: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] (int) → cos, sin [..., d] float32 (freqs concatenated twice, as HF does)."""
    freqs = positions.to(torch.float32)[..., None] * inv.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, d]; cos/sin [N, d] → rotated x (same dtype as x)."""
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * c + rotate_half(x) * s
