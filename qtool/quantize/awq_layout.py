"""Rewrite ModelOpt's INT4 AWQ export (W4A16_AWQ) in AutoAWQ's gemm layout, the one vLLM's awq loaders read.

Contract: `convert_to_autoawq(out_dir, group_size)` reads the safetensors written by `export_hf_checkpoint`
for an INT4-AWQ model (ModelOpt's packing: uint8 (out/2, in), row 2j in the low nibble, signed int4; fp32
`weight_scale` (out, in/g) = amax/7; `pre_quant_scale` (in,) where ModelOpt could not fold it into a norm)
and replaces every quantized linear's tensors with
  qweight int32 (in, out/8)   nibble k of qweight[i, c] holds column 8c + [0,2,4,6,1,3,5,7][k] (u = q + 8)
  qzeros  int32 (in/g, out/8) same order; 8 for every symmetric group (AutoAWQ: W = (u - z) * s)
  scales  fp16  (in/g, out)
so that the decoded weight equals ModelOpt's up to the fp16 rounding of the scale. AutoAWQ has no
`pre_quant_scale`: each one is folded into the output rows of the linear that feeds the scaled one
(recipes/consumers.toml `layouts.autoawq-gemm.fold_into`: up_proj for down_proj, v_proj for o_proj) by
multiplying those rows' scales (and bias), which is exact; o_proj under grouped-query attention, where one
v_proj row feeds several query heads whose scales differ, is instead re-quantized (asymmetric round to
nearest, as AutoAWQ's own `pseudo_quantize_tensor`) with the scale folded into its weight, and reported.
config.json gets `quantization_config` {quant_method awq, bits/w_bit 4, group_size/q_group_size, zero_point,
version gemm, modules_to_not_convert}; ModelOpt's hf_quant_config.json is removed and returned.
"""
from __future__ import annotations

import json
from pathlib import Path

from qtool.errors import Failure
from qtool.quantize.gptq_layout import _load_all, replace_quantization_config, rewrite_shards, unpack_modelopt_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_quantization_config(group_size: int, not_converted: list[str], modelopt_version: str) -> dict:
    return {"quant_method": "awq", "bits": 4, "w_bit": 4, "group_size": group_size, "q_group_size": group_size,
            "zero_point": True, "version": "gemm", "modules_to_not_convert": not_converted or None,
            "producer": {"name": "qtool", "from": f"modelopt:{modelopt_version}"}}


def pack_awq_columns(u):
    """(rows, out) unsigned nibbles → int32 (rows, out/8) in AutoAWQ's interleaved column order."""
    import torch
    rows, out_f = u.shape
    u = u.to(torch.int64).view(rows, out_f // 8, 8)
    packed = torch.zeros(rows, out_f // 8, dtype=torch.int64)
    for k, col in enumerate(AWQ_ORDER):
        packed |= u[..., col] << (4 * k)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def pack_autoawq(u, zeros, scales) -> dict:
    """u (out, in) unsigned 0..15, zeros/scales (out, in/g) → AutoAWQ gemm tensors."""
    import torch
    return {"qweight": pack_awq_columns(u.t().contiguous()), "qzeros": pack_awq_columns(zeros.t().contiguous()),
            "scales": scales.t().contiguous().to(torch.float16)}


def requantize_asym(w, group_size: int):
    """AutoAWQ's zero-point round-to-nearest of w (out, in) → (u, zeros, scales), each (out, ·)."""
    import torch
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group_size, group_size).float()
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    u = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, 15).reshape(out_f, in_f)
    return u.to(torch.int64), zeros.to(torch.int64), scales


def _fold_map() -> dict[str, str]:
    from qtool.support.consumers import contracts
    return dict(contracts()["layouts"]["autoawq-gemm"]["fold_into"])


def _heads(config: dict) -> tuple[int | None, int | None]:
    c = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return c.get("num_attention_heads"), c.get("num_key_value_heads") or c.get("num_attention_heads")


def _row_scale(pqs, rows_out: int, n_heads, n_kv):
    """pqs of the scaled linear's inputs → one factor per output row of the feeding linear, or None."""
    import torch
    if pqs.numel() == rows_out:
        return pqs
    if n_heads and n_kv and pqs.numel() % n_heads == 0 and rows_out * n_heads == pqs.numel() * n_kv:
        hd = pqs.numel() // n_heads
        grouped = pqs.view(n_kv, n_heads // n_kv, hd)
        if torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
            return grouped[:, 0].reshape(-1)
    return None


def convert_to_autoawq(out_dir: Path, group_size: int, modelopt_version: str = "?") -> dict:
    """Rewrite the export in `out_dir` in place; returns what was folded / re-quantized and ModelOpt's config."""
    import torch

    out_dir = Path(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    tensors, owner = _load_all(out_dir)
    n_heads, n_kv = _heads(config)
    mods = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale") and t.dim() == 2:
            mod = name[: -len(".weight_scale")]
            w = tensors.get(mod + ".weight")
            if w is not None and w.dtype == torch.uint8:
                if t.shape[1] * group_size != w.shape[1]:
                    raise Failure(f"{mod}: weight_scale {tuple(t.shape)} does not match group size {group_size}")
                if mod + ".weight_scale_2" in tensors or mod + ".input_scale" in tensors:
                    raise Failure(f"{mod}: an FP8 stage or input scale (W4A8) has no place in AutoAWQ's layout")
                mods[mod] = {"codes": unpack_modelopt_int4(w, t.shape[0]).to(torch.int64), "scale": t.float()}
    if not mods:
        raise Failure("the export holds no INT4-AWQ linear layer to write in AutoAWQ's layout")
    row_scales: dict[str, torch.Tensor] = {}
    folded, requantized = [], []
    fold = _fold_map()
    for mod in mods:
        pqs = tensors.pop(mod + ".pre_quant_scale", None)
        if pqs is None:
            continue
        pqs = pqs.float()
        suffix = next((s for s in fold if mod.endswith("." + s)), None)
        feeder = mod[: -len(suffix)] + fold[suffix] if suffix else None
        rs = None
        if feeder in mods:
            rs = _row_scale(pqs, mods[feeder]["scale"].shape[0], n_heads, n_kv)
        if rs is not None:
            row_scales[feeder] = row_scales.get(feeder, 1.0) * rs
            folded.append(f"{mod} -> {feeder}")
            continue
        # not exact: fold into this layer's own weight and re-quantize it
        m = mods[mod]
        w = m["codes"].float() * m["scale"].repeat_interleave(group_size, dim=1) * pqs[None, :]
        u, z, s = requantize_asym(w, group_size)
        back = (u - z.repeat_interleave(group_size, dim=1)).float() * s.to(torch.float16).float().repeat_interleave(
            group_size, dim=1)
        rel = float((back - w).norm() / w.norm().clamp(min=1e-30))
        mods[mod] = {"u": u, "zeros": z, "scale": s}
        why = (f"its input scale differs between the query heads that share one {fold[suffix].split('.')[-1]} row "
               "(grouped-query attention)" if feeder in mods else "no preceding linear to fold it into")
        requantized.append({"module": mod, "reason": why, "relative_change": round(rel, 5)})
    new, new_owner = {}, {}
    for mod, m in mods.items():
        if "u" in m:
            packed = pack_autoawq(m["u"], m["zeros"], m["scale"])
        else:
            scale = m["scale"]
            if mod in row_scales:
                scale = scale * row_scales[mod][:, None]
                bias = tensors.get(mod + ".bias")
                if bias is not None:
                    tensors[mod + ".bias"] = (bias.float() * row_scales[mod]).to(bias.dtype)
            u = m["codes"] + 8
            zeros = torch.full_like(scale, 8, dtype=torch.int64)
            packed = pack_autoawq(u, zeros, scale)
        src = owner[mod + ".weight"]
        for k, v in packed.items():
            new[f"{mod}.{k}"], new_owner[f"{mod}.{k}"] = v, src
        for k in (".weight", ".weight_scale"):
            tensors.pop(mod + k, None)
    for k, v in tensors.items():
        new[k], new_owner[k] = v, owner[k]
    rewrite_shards(out_dir, new, new_owner, owner)
    hfq = out_dir / "hf_quant_config.json"
    exclude = (json.loads(hfq.read_text()).get("quantization", {}).get("exclude_modules") or []) if hfq.is_file() else []
    qcfg = awq_quantization_config(group_size, [e.rstrip("*") for e in exclude], modelopt_version)
    return {"modules": len(mods), "folded": folded, "requantized": requantized,
            "modelopt_hf_quant_config": replace_quantization_config(out_dir, qcfg)}
