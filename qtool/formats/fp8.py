"""FP8 (E4M3) numerics: the saturating cast and the weight formats built on it.

Contract (docs/numerics.md): ``e4m3(v) = v.clamp(-448, 448).to(float8_e4m3fn)`` (round to nearest even).
Decoders return float32 ``[out, in]``; encoders reproduce ModelOpt 0.47's export bytes
(``to_quantized_weight`` / ``FP8QTensor.quantize``), including its dtype promotion: a bf16 weight divided by a
0-dim float32 scale is divided in bf16, as ModelOpt does for per-tensor FP8.
"""
from __future__ import annotations

import numpy as np
import torch

E4M3_MAX = 448.0
FP8_BLOCK = 128
_LUT: dict = {}


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast to float8_e4m3fn (NaN stays NaN)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _cpu_fp8(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def _table(dtype) -> torch.Tensor:
    """float32 value of each of the 256 codes of an fp8 dtype (torch's own cast)."""
    if dtype not in _LUT:
        _LUT[dtype] = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    return _LUT[dtype]


_CHUNK = 1 << 16


def gather_table(table: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """table[code] for every byte of w (CPU; uint8 codes below len(table)): numpy's take on the uint8 view, in chunks so that its index
    temporary (intp, 8 bytes a code) stays small and cache-resident instead of 8x the weight's size;
    mode 'clip' (codes are 0..255) lets take write straight into the output: ``out`` (a contiguous CPU tensor of
    the table's dtype and w's shape) when given, else a new tensor."""
    codes = w.contiguous().view(torch.uint8).numpy().reshape(-1)
    if out is not None and (out.shape != w.shape or not out.is_contiguous() or out.dtype != table.dtype):
        raise ValueError(f"gather_table: out must be a contiguous {table.dtype} tensor of shape {tuple(w.shape)}")
    dst = np.empty(codes.size, np.float32) if out is None else out.numpy().reshape(-1)
    t = table.numpy()
    for i in range(0, codes.size, _CHUNK):
        np.take(t, codes[i:i + _CHUNK], out=dst[i:i + _CHUNK], mode="clip")
    return torch.from_numpy(dst).reshape(w.shape) if out is None else out


def fp8_to_float(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``w.float()``; on the CPU through a 256-entry table (torch's scalar fp8 cast is ~3x slower there); into
    ``out`` (float32, w's shape) when given."""
    if not _cpu_fp8(w):
        return w.float() if out is None else out.copy_(w)
    return gather_table(_table(w.dtype), w, out)


def fake_e4m3(x: torch.Tensor, scale) -> torch.Tensor:
    """``e4m3(x / scale).float() * scale`` in float32."""
    x = x.float()
    return e4m3(x / scale).float() * scale


# ---------------------------------------------------------------- decode
_MAX_RUNS = 64      # per-row scales with at most this many runs of equal values: one scaled table per run


def decode_fp8(weight: torch.Tensor, weight_scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-tensor (0-dim scale) or per-row ([out] scale) FP8: ``weight.float() * scale`` in float32, into ``out``
    (float32 ``[out, in]``, contiguous) when given.

    On the CPU the scale is folded into the 256-entry table (each entry is the same float32 product
    ``value * scale``), so decoding is one gather: per tensor, and per run of rows with equal scale (a fused
    q|k|v of per-tensor parts has one run per part); a per-row scale with more runs multiplies in place after
    the gather. All give the bytes of ``weight.float() * scale`` (tests/test_decode_fast.py checks it against
    torch's cast).
    """
    s = weight_scale.float().to(weight.device)
    if _cpu_fp8(weight):
        table = _table(weight.dtype)
        if s.numel() == 1:
            return gather_table(table * s.reshape(()), weight, out)
        rows = s.reshape(-1).contiguous()
        bits, counts = torch.unique_consecutive(rows.view(torch.int32), return_counts=True)   # runs of equal bits
        if len(bits) > _MAX_RUNS:
            return gather_table(table, weight, out).mul_(rows.reshape(-1, 1))
        dst = torch.from_numpy(np.empty(tuple(weight.shape), np.float32)) if out is None else out
        tables, start = table[None, :] * bits.view(torch.float32)[:, None], 0
        for t, n in zip(tables, counts.tolist()):
            gather_table(t, weight[start:start + n], dst[start:start + n])
            start += n
        return dst
    w = weight.float()
    w = w * s.reshape(()) if s.numel() == 1 else w * s.reshape(-1, 1)
    return w if out is None else out.copy_(w)


def block_scale_2d(scale: torch.Tensor) -> torch.Tensor:
    """ModelOpt's 4-D ``[o/128, 1, i/128, 1]`` block scale (or DeepSeek's 2-D one) as 2-D ``[bo, bi]``."""
    s = scale.float()
    if s.dim() == 4:
        s = s[:, 0, :, 0]
    if s.dim() != 2:
        raise ValueError(f"fp8 block scale must be 2-D or 4-D, got shape {tuple(scale.shape)}")
    return s


def _block_len(n: int, blocks: int) -> int:
    """The block length of a dim of n split in ``blocks``: 128 when that fits, else ceil(n / blocks)."""
    return FP8_BLOCK if -(-n // FP8_BLOCK) == blocks else -(-n // blocks)


def expand_block_scale(scale2d: torch.Tensor, out_f: int, in_f: int, block: int | None = None) -> torch.Tensor:
    """Repeat a ``[bo, bi]`` scale over its blocks and crop to ``[out, in]``."""
    bo, bi = scale2d.shape
    so = block or _block_len(out_f, bo)
    si = block or _block_len(in_f, bi)
    return scale2d.repeat_interleave(so, 0).repeat_interleave(si, 1)[:out_f, :in_f]


def decode_fp8_block(weight: torch.Tensor, scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    out_f, in_f = weight.shape
    s2 = block_scale_2d(scale).to(weight.device)
    if block is not None:  # explicit block size: the scale grid must match it
        if s2.shape != (-(-out_f // block), -(-in_f // block)):
            raise ValueError(f"fp8 block scale {tuple(s2.shape)} does not match weight {out_f}x{in_f} "
                             f"with {block}x{block} blocks")
    return fp8_to_float(weight) * expand_block_scale(s2, out_f, in_f, block)


# ---------------------------------------------------------------- encode (ModelOpt export rules)
def encode_fp8(weight: torch.Tensor, scale: torch.Tensor | float | None = None):
    """Per-tensor FP8: ``scale = amax/448`` (float32, 0-dim) unless given; returns (fp8 weight, scale)."""
    if scale is None:
        scale = torch.tensor(weight.abs().amax().float().item() / E4M3_MAX)  # ModelOpt: amax.item()/maxbound
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(()).to(weight.device)
    return e4m3(weight / scale), scale


def encode_fp8_rowwise(weight: torch.Tensor, scale: torch.Tensor | None = None):
    """Per output row FP8 (``FP8_PER_CHANNEL_PER_TOKEN``): scale ``[out] = row_amax/448``."""
    if scale is None:
        scale = weight.abs().amax(dim=1).float() / E4M3_MAX
    scale = scale.float().reshape(-1).to(weight.device)
    return e4m3(weight / scale[:, None]), scale


def encode_fp8_block(weight: torch.Tensor, block: int = FP8_BLOCK, scale: torch.Tensor | None = None):
    """2-D block FP8 (``fp8_pb_wo``): returns (fp8 weight, 4-D scale ``[o/b, 1, i/b, 1]`` = block_amax/448)."""
    out_f, in_f = weight.shape
    bo, bi = -(-out_f // block), -(-in_f // block)
    if scale is None:
        pad = torch.zeros(bo * block, bi * block, dtype=weight.dtype, device=weight.device)
        pad[:out_f, :in_f] = weight
        amax = pad.abs().reshape(bo, block, bi, block).amax(dim=(1, 3))
        scale = (amax.float() / E4M3_MAX).reshape(bo, 1, bi, 1)
    s2 = block_scale_2d(scale).to(weight.device)
    return e4m3(weight / expand_block_scale(s2, out_f, in_f, block)), s2.reshape(bo, 1, bi, 1)
