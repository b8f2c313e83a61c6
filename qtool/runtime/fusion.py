"""Fusing the linear layers that read the same input (q|k|v, gate|up) along the output dimension.

Contract: ``fuse(parts, label)`` returns one LinearWeights whose ``dequantize()`` equals the concatenation of
the parts' decodes, exactly wherever the format allows it (bf16, fp8-rowwise, fp8-block with out % 128 == 0,
mxfp4, int4-awq, gptq with equal g_idx, autoawq, nvfp4 and fp8 with equal scales), and otherwise:
- fp8 per-tensor with different ``weight_scale``: every part is re-quantized to the largest scale
  (``e4m3(q * s_i / s_max)``, vLLM's ``requantize_with_max_scale``) and ``note`` says so;
- nvfp4 with different ``weight_scale_2``: the codes are kept and the E4M3 block scales are rescaled to the
  shared ``weight_scale_2 = max`` (``e4m3(sb * s2_i / s2_max)``), and ``note`` says so;
- different ``input_scale``: the largest is used, and ``note`` says so.
Where fusing would change the numerics in any other way (different formats, activations, group sizes,
pre_quant_scale, W4A8 weight_scale_2, GPTQ g_idx, or a block grid that does not line up), the parts are kept
as they are: the result has ``parts`` set and the backend applies each part to the same input.
"""
from __future__ import annotations

import torch

from qtool.runtime.weights import LinearWeights


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
    return torch.cat([p.tensors[role] for p in parts], dim=dim)


def _scalar_max(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.float().reshape(()) for v in values]).max()


def _unfusable_reason(parts: list[LinearWeights]) -> str | None:
    p0 = parts[0]
    for attr in ("format", "activation", "group_size", "fp8_weight_stage"):
        if len({getattr(p, attr) for p in parts}) > 1:
            return f"different {attr}"
    if len({p.in_features for p in parts}) > 1:
        return "different in_features"
    if not _same(_role(parts, "pre_quant_scale")):
        return "different pre_quant_scale"
    fmt = p0.format
    if fmt == "int4-awq" and p0.fp8_weight_stage and not _same(_role(parts, "weight_scale_2")):
        return "different W4A8 weight_scale_2"
    if fmt == "fp8-block" and any(p.out_features % (p.group_size or 128) for p in parts[:-1]):
        return "out_features not a multiple of the 128-row block"
    if fmt == "int4-awq" and any(p.out_features % 2 for p in parts[:-1]):
        return "odd out_features"
    if fmt in ("gptq", "autoawq"):
        if any(p.out_features % 8 for p in parts[:-1]):
            return "out_features not a multiple of 8"
        if fmt == "gptq" and not _same(_role(parts, "g_idx")):
            return "different g_idx"
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
    if fmt in ("bf16", "fp8-rowwise", "mxfp4", "int4-awq"):
        t["weight"] = _cat(parts, "weight")
        if fmt != "bf16":
            t["weight_scale"] = _cat(parts, "weight_scale")
    elif fmt == "fp8-block":
        role = "weight_scale_inv" if "weight_scale_inv" in p0.tensors else "weight_scale"
        t["weight"], t[role] = _cat(parts, "weight"), _cat(parts, role)
    elif fmt in ("fp8", "nvfp4"):
        # fp8: the e4m3 weights carry the per-tensor weight_scale; nvfp4: the e4m3 block scales carry weight_scale_2
        scaled, role = ("weight", "weight_scale") if fmt == "fp8" else ("weight_scale", "weight_scale_2")
        if fmt == "nvfp4":
            t["weight"] = _cat(parts, "weight")
        scales = _role(parts, role)
        if _same(scales):
            t[scaled], t[role] = _cat(parts, scaled), scales[0]
        else:
            from qtool.formats import e4m3
            s_max = _scalar_max(scales)
            t[scaled] = torch.cat([e4m3(p.tensors[scaled].float() * (s.float() / s_max))
                                   for p, s in zip(parts, scales)])
            t[role] = s_max
            notes.append(f"requantized {scaled} to the shared (max) {role}")
    elif fmt in ("gptq", "autoawq"):
        for role in ("qweight", "qzeros", "scales"):
            t[role] = _cat(parts, role, dim=1)
        if fmt == "gptq" and p0.tensors.get("g_idx") is not None:
            t["g_idx"] = p0.tensors["g_idx"]
    else:
        raise ValueError(f"cannot fuse format {fmt!r}")
    for role in ("weight_scale_2",):
        if role not in t and p0.tensors.get(role) is not None:
            t[role] = p0.tensors[role]
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
