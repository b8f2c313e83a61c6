"""``decode_weight``: one entry point from a format name and its role-keyed tensors to float32 ``[out, in]``.

Contract: ``fmt`` is one of FORMATS (qtool.checkpoint.scheme); ``tensors`` maps ROLES (weight, weight_scale,
weight_scale_2, weight_scale_inv, qweight, qzeros, scales, g_idx, ...) to tensors in their on-disk form;
``group_size`` is the block size where the format has one (inferred from the shapes when None);
``fp8_weight_stage`` turns on W4A8-AWQ's second, FP8 stage. Works on CPU and CUDA tensors (result on the
weight's device). The rules are those of docs/numerics.md, implemented in fp8.py, fp4.py and int4.py.
"""
from __future__ import annotations

import torch

from qtool.formats import fp4, fp8, int4

FORMATS = ("bf16", "fp8", "fp8-rowwise", "fp8-block", "nvfp4", "mxfp4", "int4-awq", "gptq", "autoawq")


def _need(tensors: dict, fmt: str, *roles: str):
    missing = [r for r in roles if tensors.get(r) is None]
    if missing:
        raise ValueError(f"{fmt} weight is missing tensor(s): {', '.join(missing)}")
    return [tensors[r] for r in roles]


def decode_weight(fmt: str, tensors: dict[str, torch.Tensor], group_size: int | None = None,
                  fp8_weight_stage: bool = False) -> torch.Tensor:
    if fmt == "bf16":
        (w,) = _need(tensors, fmt, "weight")
        return w.float()
    if fmt in ("fp8", "fp8-rowwise"):
        w, s = _need(tensors, fmt, "weight", "weight_scale")
        return fp8.decode_fp8(w, s)
    if fmt == "fp8-block":
        (w,) = _need(tensors, fmt, "weight")
        s = tensors.get("weight_scale_inv")
        if s is None:
            (s,) = _need(tensors, fmt, "weight_scale")
        return fp8.decode_fp8_block(w, s, group_size)
    if fmt == "nvfp4":
        w, s, s2 = _need(tensors, fmt, "weight", "weight_scale", "weight_scale_2")
        return fp4.decode_nvfp4(w, s, s2, group_size)
    if fmt == "mxfp4":
        w, s = _need(tensors, fmt, "weight", "weight_scale")
        return fp4.decode_mxfp4(w, s, group_size)
    if fmt == "int4-awq":
        w, s = _need(tensors, fmt, "weight", "weight_scale")
        return int4.decode_int4_awq(w, s, tensors.get("weight_scale_2"), fp8_weight_stage)
    if fmt == "gptq":
        qw, qz, sc = _need(tensors, fmt, "qweight", "qzeros", "scales")
        return int4.decode_gptq(qw, qz, sc, tensors.get("g_idx"), group_size)
    if fmt == "autoawq":
        qw, qz, sc = _need(tensors, fmt, "qweight", "qzeros", "scales")
        return int4.decode_autoawq(qw, qz, sc, group_size)
    raise ValueError(f"unknown weight format {fmt!r}; expected one of {', '.join(FORMATS)}")
