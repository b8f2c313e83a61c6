#!/usr/bin/env python3
"""Weight-only rounding of a bf16 Hugging Face folder, written back as bf16, for the sensitivity rows of
docs/quality.md.

Contract: ``python bench/fake_weights.py SRC OUT --format fp8|int4|nvfp4 [--block N] [--only REGEX]`` copies the
folder SRC to OUT (new) with every decoder-layer linear weight (``model.layers.N.{self_attn,mlp}.*_proj.weight``;
``--only`` narrows them by regular expression) replaced by its round trip through the format, round to nearest,
scales from the weight's absolute maximum (no calibration, no activation quantization):
- fp8: E4M3 with one per-tensor scale amax / 448 (ModelOpt FP8_DEFAULT_CFG's weight quantizer);
- int4: symmetric INT4 per block of ``--block`` input elements (default 64), scale amax / 7, values -8..7
  (ModelOpt INT4 weight fake quant; AWQ's `max` algorithm);
- nvfp4: E2M1 with an E4M3 scale per 16 and an FP32 global scale amax / (6 · 448), ModelOpt's NVFP4QTensor
  arithmetic (its export path).
The result is a plain bf16 checkpoint (the dequantized values rounded to bf16: a relative error ≤ 2⁻⁹, far below
the formats' own steps), so `qtool eval OUT --baseline SRC` measures what the weight rounding alone costs, without
activation quantization and on any backend. Prints the relative RMS weight error per module kind as JSON.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.weight$")


def round_trip(w, fmt: str, block: int):
    import torch

    x = w.float()
    if fmt == "fp8":
        scale = x.abs().amax() / 448.0
        return (x / scale).to(torch.float8_e4m3fn).float() * scale
    if fmt == "int4":
        xb = x.reshape(x.shape[0], -1, block)
        scale = xb.abs().amax(-1, keepdim=True) / 7.0
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return (torch.round(xb / scale).clamp(-8, 7) * scale).reshape(x.shape)
    if fmt == "nvfp4":
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor, e2m1_values
        scale2 = NVFP4QTensor.get_weights_scaling_factor_2(x)
        scale, _ = NVFP4QTensor.get_weights_scaling_factor(x, 16, scale2)
        step = (scale.float() * scale2).unsqueeze(-1)
        xb = x.reshape(x.shape[0], -1, 16)
        codes = NVFP4QTensor._cast_fp4(xb / step)
        return (e2m1_values[codes.long()] * step).reshape(x.shape)
    raise ValueError(fmt)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--format", required=True, choices=["fp8", "int4", "nvfp4"])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--only", default=None, help="regular expression on the tensor name")
    a = ap.parse_args(argv)
    import torch
    from safetensors.torch import load_file, save_file

    if a.out.exists():
        print(f"error: {a.out} exists", file=sys.stderr)
        return 2
    tensors = load_file(str(a.src / "model.safetensors"))
    err: dict[str, list[float]] = {}
    for name, w in tensors.items():
        m = LINEAR.search(name)
        if not m or (a.only and not re.search(a.only, name)):
            continue
        q = round_trip(w, a.format, a.block)
        err.setdefault(m.group(3), []).append(float(((q - w.float()).pow(2).mean() / w.float().pow(2).mean()).sqrt()))
        tensors[name] = q.to(torch.bfloat16)
    if not err:
        print("error: no tensor matched", file=sys.stderr)
        return 2
    tmp = a.out.with_name(a.out.name + ".tmp")
    shutil.copytree(a.src, tmp, ignore=shutil.ignore_patterns("model.safetensors", "qtool_source.json"))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(a.out)
    print(json.dumps({"format": a.format, "block": a.block if a.format == "int4" else None, "only": a.only,
                      "relative_rms_error": {k: sum(v) / len(v) for k, v in err.items()},
                      "tensors": sum(len(v) for v in err.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
