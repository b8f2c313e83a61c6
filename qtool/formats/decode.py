"""``decode_weight``: one entry point from a format name and its role-keyed tensors to float32 ``[out, in]``.

Contract: ``fmt`` is a weight format of the registry (recipes/formats.toml); ``tensors`` maps roles (weight,
weight_scale, weight_scale_2, weight_scale_inv, qweight, qzeros, scales, g_idx, ...) to tensors in their on-disk
form; ``group_size`` is the block size where the format has one (inferred from the shapes when None);
``fp8_weight_stage`` turns on W4A8-AWQ's second, FP8 stage; ``out`` (float32 ``[out, in]``, contiguous), when
given, receives the result (decoders with an ``out`` parameter write into it directly, others are copied). The registry names each format's decode function
and its arguments; the rules are those of docs/numerics.md, implemented in fp8.py, fp4.py and int4.py. Works on
CPU and CUDA tensors (result on the weight's device).
"""
from __future__ import annotations

import functools
import importlib
import inspect

import torch

from qtool.formats import registry

FORMATS = tuple(registry.weight_formats())


def _arg(arg: str, fmt: str, tensors: dict, layer: dict):
    if arg.startswith("@"):
        return layer[arg[1:]]
    if arg.startswith("?"):
        return tensors.get(arg[1:])
    for role in arg.split("|"):
        if tensors.get(role) is not None:
            return tensors[role]
    raise ValueError(f"{fmt} weight is missing tensor {arg.replace('|', ' or ')}")


@functools.lru_cache(maxsize=None)
def _decoder(fmt: str):
    """(function, whether it takes ``out``) for a weight format, from the registry."""
    module, _, func = registry.weight_format(fmt).decode.rpartition(".")
    fn = getattr(importlib.import_module(f"qtool.formats.{module}"), func)
    return fn, "out" in inspect.signature(fn).parameters


def decode_weight(fmt: str, tensors: dict[str, torch.Tensor], group_size: int | None = None,
                  fp8_weight_stage: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    spec = registry.weight_format(fmt)
    fn, takes_out = _decoder(fmt)
    layer = {"group_size": group_size, "fp8_weight_stage": fp8_weight_stage}
    args = [_arg(a, fmt, tensors, layer) for a in spec.decode_args]
    if out is None:
        return fn(*args).float()
    if takes_out:
        return fn(*args, out=out)
    w = fn(*args)
    if tuple(w.shape) != tuple(out.shape):
        raise ValueError(f"decoded weight {tuple(w.shape)} != out {tuple(out.shape)}")
    return out.copy_(w)
