"""Fusing the linear layers that read the same input (q|k|v, gate|up) along the output dimension.

Contract: ``fuse(parts, label)`` returns one LinearWeights whose ``dequantize()`` equals the concatenation of
the parts' decodes, exactly wherever the format allows it (bf16, fp8-rowwise, fp8-block with out % 128 == 0,
mxfp4, int4-awq, gptq with equal g_idx, autoawq, fp8, nvfp4 with equal weight_scale_2), and otherwise:
- fp8 per-tensor with different ``weight_scale`` (ModelOpt writes one per module): the e4m3 weights are
  concatenated unchanged and ``weight_scale`` becomes a per-row ``[out]`` vector (each part's scalar repeated over
  its rows), exact, instead of vLLM's lossy ``requantize_with_max_scale`` (≈2 % extra weight error measured on
  SmolLM2); ``note`` says so. The activation stays static per tensor (``input_scale``);
- nvfp4 with different ``weight_scale_2``: the codes are kept and the E4M3 block scales are rescaled to the
  shared ``weight_scale_2 = max`` (``e4m3(sb * s2_i / s2_max)``), and ``note`` says so;
- different ``input_scale``: the largest is used, and ``note`` says so.
Where fusing would change the numerics in any other way (different formats, activations, group sizes,
pre_quant_scale, W4A8 weight_scale_2, GPTQ g_idx, or a block grid that does not line up), the parts are kept
as they are: the result has ``parts`` set and the backend applies each part to the same input.
Which tensors are concatenated, along which axis, and the out alignment that needs (every part but the last a
multiple of the rows one element covers: 2 for int4-awq's packed rows, 8 for GPTQ / AutoAWQ qzeros, the 128-row
fp8 block) come from each role's shape in recipes/formats.toml (``_out_axis``); roles without an out dimension
must be equal, except the per-tensor scales merged above.
"""
from __future__ import annotations

import ast
import functools

import numpy as np
import torch

from qtool.formats import registry
from qtool.runtime.weights import LinearWeights

MERGED_SCALARS = ("weight_scale", "weight_scale_2", "input_scale")   # per-tensor roles fuse merges when they differ


def _same(tensors: list) -> bool:
    first = tensors[0]
    for t in tensors[1:]:
        if (first is None) != (t is None):
            return False
        if first is not None and (first.shape != t.shape or not torch.equal(first.float(), t.float())):
            return False
    return True


def _role(parts: list[LinearWeights], role: str) -> list:
    return [p.tensors.get(role) for p in parts]


def _cat(parts, role, dim=0):
    """Concatenate the parts' ``role`` tensors along ``dim`` (numpy on the raw bytes: torch's CPU cat of
    float8 / uint8 tensors is ~50x slower)."""
    ts = [p.tensors[role] for p in parts]
    if any(t.device.type != "cpu" or t.dim() < 1 or t.dtype != ts[0].dtype for t in ts):
        return torch.cat(ts, dim=dim)
    proxy = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}
    alias = proxy.get(ts[0].dtype)
    raw = [(t.contiguous().view(alias) if alias else t.contiguous()).numpy() for t in ts]
    out = torch.from_numpy(np.concatenate(raw, axis=dim))
    return out.view(ts[0].dtype) if alias else out


def requantize_e4m3(q: torch.Tensor, ratio: float) -> torch.Tensor:
    """``e4m3(q.float() * ratio)`` for an e4m3 tensor, through a 256-entry code map (exact, and fast on CPU)."""
    from qtool.formats import e4m3
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    new = e4m3(codes.view(torch.float8_e4m3fn).float() * ratio).view(torch.uint8)
    if q.device.type != "cpu":
        return new.to(q.device)[q.view(torch.uint8).long()].view(torch.float8_e4m3fn)
    out = np.take(new.numpy(), q.contiguous().view(torch.uint8).numpy())
    return torch.from_numpy(out).view(torch.float8_e4m3fn)


def _scalar_max(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.float().reshape(()) for v in values]).max()


@functools.lru_cache(maxsize=None)
def _out_axis(shape: str, group_size: int | None) -> tuple[int, int] | None:
    """(axis, out rows per element along it) of a tensor role whose recipes/formats.toml shape has a dimension in
    o (its first alternative): "o, i // 2" -> (0, 1), "i, o // 8" -> (1, 8), "cdiv(o, 128), ..." -> (0, 128),
    "cdiv(o, bo), ..." -> (0, the block: group size, else 128); None for "scalar" and shapes in i only."""
    if shape == "scalar":
        return None
    names = {"g": group_size, "bo": group_size or 128}
    dims = ast.parse(f"({shape.split('|')[0]},)", mode="eval").body.elts
    for axis, d in enumerate(dims):
        if isinstance(d, ast.Name) and d.id == "o":
            return axis, 1
        pair = ((d.left, d.right) if isinstance(d, ast.BinOp) and isinstance(d.op, ast.FloorDiv) else
                tuple(d.args) if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "cdiv" else ())
        if pair and isinstance(pair[0], ast.Name) and pair[0].id == "o":
            return axis, pair[1].value if isinstance(pair[1], ast.Constant) else names[pair[1].id]
    return None


def _unfusable_reason(parts: list[LinearWeights]) -> str | None:
    p0 = parts[0]
    for attr in ("format", "activation", "group_size", "fp8_weight_stage"):
        if len({getattr(p, attr) for p in parts}) > 1:
            return f"different {attr}"
    if len({p.in_features for p in parts}) > 1:
        return "different in_features"
    if not _same(_role(parts, "pre_quant_scale")):
        return "different pre_quant_scale"
    if p0.fp8_weight_stage and not _same(_role(parts, "weight_scale_2")):
        return "different W4A8 weight_scale_2"
    for role, rule in registry.weight_format(p0.format).tensors.items():
        axis = _out_axis(rule.shape, p0.group_size)
        if axis is not None:         # concatenated along out: every part but the last fills whole elements
            if p0.tensors.get(role) is not None and any(p.out_features % axis[1] for p in parts[:-1]):
                return f"out_features not a multiple of {axis[1]} ({role})"
        elif role not in MERGED_SCALARS and not _same(_role(parts, role)):
            return f"different {role}"
    return None


def _fuse_bias(parts: list[LinearWeights]) -> torch.Tensor | None:
    if all(p.bias is None for p in parts):
        return None
    return torch.cat([p.bias.float() if p.bias is not None else torch.zeros(p.out_features) for p in parts])


def fuse(parts: list[LinearWeights], label: str) -> LinearWeights:
    """Fuse ``parts`` (same input) along out; ``label`` names the group in notes, e.g. 'q/k/v'."""
    if len(parts) == 1:
        return parts[0]
    p0 = parts[0]
    out_f = sum(p.out_features for p in parts)
    reason = _unfusable_reason(parts)
    if reason:
        return LinearWeights("parts", "parts", out_f, p0.in_features, {}, None, False, None,
                             f"{label} kept as separate parts ({reason})", parts=list(parts))
    fmt, notes, t = p0.format, [f"fused {label}"], {}
    src = parts
    s2 = _role(parts, "weight_scale_2")
    if s2[0] is not None and not _same(s2):   # nvfp4: the codes stay; the e4m3 block scales are re-rounded to the
        g = _scalar_max(s2)                   # shared (max) global scale (W4A8's FP8 stage was refused above)
        src = [LinearWeights(fmt, p0.activation, p.out_features, p.in_features,
                             {**p.tensors, "weight_scale": requantize_e4m3(p.tensors["weight_scale"], float(s / g))})
               for p, s in zip(parts, (v.float() for v in s2))]
        t["weight_scale_2"] = g
        notes.append("requantized weight_scale to the shared (max) weight_scale_2")
    for role, rule in registry.weight_format(fmt).tensors.items():
        if role in t or role == "input_scale" or p0.tensors.get(role) is None:
            continue
        axis = _out_axis(rule.shape, p0.group_size)
        values = _role(parts, role)
        if axis is not None:
            t[role] = _cat(src, role, dim=axis[0])
        elif _same(values):
            t[role] = values[0]
        else:   # a per-tensor weight_scale (fp8): exact as the scale of each part's rows
            t[role] = torch.cat([v.float().reshape(-1).expand(p.out_features) if v.numel() == 1
                                 else v.float().reshape(-1) for p, v in zip(parts, values)])
            notes.append("per-module weight_scale kept as a per-row scale (exact, no requantization)")
    if p0.tensors.get("pre_quant_scale") is not None:
        t["pre_quant_scale"] = p0.tensors["pre_quant_scale"]
    ins = _role(parts, "input_scale")
    if any(v is not None for v in ins):
        if all(v is not None for v in ins) and _same(ins):
            t["input_scale"] = ins[0]
        else:
            t["input_scale"] = _scalar_max([v for v in ins if v is not None])
            notes.append("input_scale differs between parts; using the max")
    return LinearWeights(fmt, p0.activation, out_f, p0.in_features, t, p0.group_size, p0.fp8_weight_stage,
                         _fuse_bias(parts), "; ".join(notes))
