#!/usr/bin/env python3
"""Recipe variants that `qtool quantize` does not offer, for the sensitivity measurements of docs/quality.md.

Contract: ``python bench/quant_variants.py [--keep PATTERN]... [--cpu-nvfp4] -- QUANTIZE-ARGS...`` runs
``qtool quantize QUANTIZE-ARGS`` with two experiment-only changes, then exits with qtool's exit code:
- ``--keep PATTERN`` (repeatable) appends ``{"quantizer_name": PATTERN, "enable": False}`` to the ModelOpt config,
  so the modules PATTERN matches stay in bf16 (ModelOpt's export lists them in ``exclude_modules``, which qtool's
  loader honours). E.g. ``--keep '*mlp*'`` quantizes attention only; ``--keep '*layers.0.*'`` keeps layer 0.
- ``--cpu-nvfp4`` lets the NVFP4 AWQ / MSE calibrations run on a CPU: ModelOpt 0.47 fake-quantizes NVFP4 (dynamic
  E4M3 block scales, E2M1 values) with CUDA kernels only, so this replaces its dynamic-block operator by a
  pure-torch one built from ModelOpt's own NVFP4 export arithmetic (NVFP4QTensor: per-block amax / 6 / global
  scale cast to E4M3, values rounded to E2M1 with its tie rule), and drops the "needs CUDA" refusal of
  recipes/algorithms.toml for this run. Only NVFP4 (E2M1 values, E4M3 block scales) is handled; other dynamic block
  formats still fail.
The product (qtool/) is unchanged: these are measurements, not recipes.
"""
from __future__ import annotations

import argparse
import sys


def _nvfp4_fake_quant(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
    import torch
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor, e2m1_values

    if (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) != (4, 2, 8, 4):
        raise NotImplementedError("bench/quant_variants.py --cpu-nvfp4 handles NVFP4 (E2M1, E4M3 scales) only")
    shape, dtype = inputs.shape, inputs.dtype
    x = inputs.float().reshape(-1, block_size)
    amax = (x.abs().amax() if amax is None else amax.float().amax()).to(x.device)
    scale2 = amax / (6.0 * 448.0)
    if float(scale2) == 0.0:
        return inputs.clone()
    scale, _ = NVFP4QTensor.get_weights_scaling_factor(x, block_size, scale2)
    step = scale.float().reshape(-1, 1) * scale2
    codes = NVFP4QTensor._cast_fp4(x / step)
    out = e2m1_values.to(x.device)[codes.long()] * step
    return out.reshape(shape).to(dtype)


def _install(keep: list[str], cpu_nvfp4: bool) -> None:
    from qtool.quantize import configs

    build = configs.build_config

    def build_config(*args, **kwargs):
        cfg = build(*args, **kwargs)
        for pattern in keep:
            cfg["quant_cfg"].append({"quantizer_name": pattern, "enable": False})
        return cfg

    configs.build_config = build_config
    if cpu_nvfp4:
        import modelopt.torch.quantization.tensor_quant as tq

        table = configs.algorithms()
        for entry in table.values():
            entry.pop("cuda", None)
        configs.algorithms = lambda: table
        tq.dynamic_block_quantize_op = _nvfp4_fake_quant


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: bench/quant_variants.py [--keep PATTERN]... [--cpu-nvfp4] -- QUANTIZE-ARGS...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="append", default=[])
    ap.add_argument("--cpu-nvfp4", action="store_true")
    opts = ap.parse_args(argv[:cut])
    _install(opts.keep, opts.cpu_nvfp4)
    from qtool.cli import app
    try:
        app(["quantize", *argv[cut + 1:]])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
