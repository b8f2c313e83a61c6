"""Rewrite ModelOpt's INT4 block export as the standard GPTQ (AutoGPTQ v1) layout.

Contract: `convert_to_gptq(out_dir, group_size, fp8_activations, modelopt_version)` reads the
safetensors written by `export_hf_checkpoint` for an INT4-blockwise model (ModelOpt's packing:
uint8 (out/2, in), two OUTPUT rows per byte, row 2j in the low nibble, signed int4; fp32
`weight_scale` (out, in/g) = amax/7) and replaces every quantized linear's tensors with
  qweight int32 (in/8, out)   input row 8r+j in bits 4j of qweight[r] (unsigned q = signed + 8)
  qzeros  int32 (in/g, out/8) every nibble 7 (v1 stores zero-1; symmetric zero = 8)
  scales  fp16  (in/g, out)
  g_idx   int32 (in,)         = i // g (desc_act false)
so that W[i, o] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1)) reproduces
ModelOpt's dequantized weight exactly (up to the fp16 rounding of the scale). `input_scale`
(fp32, amax/448) is kept for w4a8-gptq. config.json gets `quantization_config` with
quant_method "gptq" (also written to quantize_config.json); ModelOpt's hf_quant_config.json,
which would describe the replaced tensors as W4A16_AWQ, is removed and returned for the manifest.
"""
from __future__ import annotations

import json
from pathlib import Path

from qtool.errors import Failure

PACK = 8   # int4 values per int32


def gptq_quantization_config(group_size: int, fp8_activations: bool, modelopt_version: str) -> dict:
    cfg = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": True, "desc_act": False,
           "static_groups": False, "true_sequential": True, "damp_percent": 0.01, "lm_head": False,
           "format": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32",
           "meta": {"quantizer": [f"modelopt:{modelopt_version}"], "method": "gptq (ModelOpt GPTQCalibConfig)",
                    "producer": "qtool"}}
    if fp8_activations:
        cfg["activation_quantization"] = {"num_bits": 8, "type": "float", "format": "e4m3", "dynamic": False,
                                          "strategy": "tensor", "scale": "<module>.input_scale = amax/448"}
    return cfg


def unpack_modelopt_int4(packed, out_features: int):
    """ModelOpt uint8 (out/2, in) → signed int8 codes (out, in)."""
    import torch
    p = packed.to(torch.int16)
    lo, hi = p & 0x0F, (p >> 4) & 0x0F
    codes = torch.stack([lo, hi], dim=1).reshape(out_features, -1)   # row 2j = lo, 2j+1 = hi
    return torch.where(codes >= 8, codes - 16, codes).to(torch.int8)


def pack_gptq(codes, weight_scale, group_size: int) -> dict:
    """Signed codes (out, in) + scale (out, in/g) → GPTQ qweight/qzeros/scales/g_idx."""
    import torch
    out_f, in_f = codes.shape
    if in_f % PACK or out_f % PACK or in_f % group_size:
        raise Failure(f"GPTQ packing needs in ({in_f}) and out ({out_f}) divisible by 8 and by the group size")
    q = (codes.to(torch.int64) + 8).t().contiguous()                 # (in, out), unsigned 0..15
    q = q.view(in_f // PACK, PACK, out_f)
    shifts = (torch.arange(PACK, dtype=torch.int64) * 4).view(1, PACK, 1)
    qweight = (q << shifts).sum(dim=1)                                 # (in/8, out), < 2^32
    qweight = torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32)
    n_groups = in_f // group_size
    z = torch.full((n_groups, out_f // PACK, PACK), 7, dtype=torch.int64)
    qzeros = (z << shifts.view(1, 1, PACK)).sum(dim=-1)
    qzeros = torch.where(qzeros >= 2**31, qzeros - 2**32, qzeros).to(torch.int32)
    scales = weight_scale.to(torch.float32).t().contiguous().to(torch.float16)   # (in/g, out)
    g_idx = (torch.arange(in_f, dtype=torch.int32) // group_size).to(torch.int32)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}


def _load_all(out_dir: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file
    tensors, owner = {}, {}
    for f in sorted(out_dir.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            tensors[k], owner[k] = v, f.name
    return tensors, owner


def convert_to_gptq(out_dir: Path, group_size: int, fp8_activations: bool, modelopt_version: str) -> dict:
    """Rewrite the export in `out_dir` in place; returns {'modules': n, 'modelopt_hf_quant_config': …}."""
    import torch

    out_dir = Path(out_dir)
    tensors, owner = _load_all(out_dir)
    new, new_owner, n = {}, {}, 0
    for name, t in list(tensors.items()):
        if not name.endswith(".weight_scale"):
            continue
        mod = name[: -len(".weight_scale")]
        w = tensors.get(mod + ".weight")
        if w is None or w.dtype != torch.uint8 or t.dim() != 2:
            continue
        if mod + ".pre_quant_scale" in tensors:
            raise Failure(f"{mod} has an AWQ pre_quant_scale; the GPTQ layout cannot carry it")
        out_f = t.shape[0]
        if t.shape[1] * group_size != w.shape[1]:
            raise Failure(f"{mod}: weight_scale {tuple(t.shape)} does not match group size {group_size}")
        for k, v in pack_gptq(unpack_modelopt_int4(w, out_f), t, group_size).items():
            new[f"{mod}.{k}"], new_owner[f"{mod}.{k}"] = v, owner[name]
        for k in (".weight", ".weight_scale", ".weight_scale_2"):
            tensors.pop(mod + k, None)
        if not fp8_activations:
            tensors.pop(mod + ".input_scale", None)
        n += 1
    if n == 0:
        raise Failure("the export holds no INT4 block-quantized linear layer to write in the GPTQ layout")
    for k, v in tensors.items():
        new[k], new_owner[k] = v, owner[k]
    rewrite_shards(out_dir, new, new_owner, owner)
    qcfg = gptq_quantization_config(group_size, fp8_activations, modelopt_version)
    (out_dir / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    return {"modules": n, "modelopt_hf_quant_config": replace_quantization_config(out_dir, qcfg)}


def rewrite_shards(out_dir: Path, new: dict, new_owner: dict, owner: dict) -> None:
    """Write `new` tensors back into the shards they came from (`new_owner`), updating the index."""
    from safetensors.torch import save_file
    for f in sorted(set(owner.values())):
        (out_dir / f).unlink()
        part = {k: v.contiguous() for k, v in new.items() if new_owner[k] == f}
        save_file(part, str(out_dir / f), metadata={"format": "pt"})
    index = out_dir / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"] = {k: new_owner[k] for k in sorted(new)}
        index.write_text(json.dumps(idx, indent=2) + "\n")


def replace_quantization_config(out_dir: Path, qcfg: dict) -> dict | None:
    """config.json's quantization_config := qcfg; ModelOpt's hf_quant_config.json (which TensorRT-LLM reads
    first and which would describe the replaced tensors) is removed; its content is returned for qtool.json."""
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = qcfg
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    hf_q = out_dir / "hf_quant_config.json"
    modelopt_cfg = json.loads(hf_q.read_text()) if hf_q.is_file() else None
    if hf_q.is_file():
        hf_q.unlink()
    return modelopt_cfg
