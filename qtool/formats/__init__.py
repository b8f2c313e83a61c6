"""Numerics of every weight, activation and KV-cache format qtool reads, and the format registry.

Contract: this package implements docs/numerics.md and nothing else; the reference backend and the CUDA
kernels are checked against it, and it is checked against ModelOpt 0.47's own export math (tests/test_formats.py).
Modules: registry (torch-free: what every recipe and format is, from recipes/), fp8 (E4M3, per-tensor / rowwise /
2-D block), fp4 (E2M1 tables, NVFP4, MXFP4), int4 (ModelOpt AWQ, GPTQ, AutoAWQ), activations (x → x̂ per
recipe), kv (KV-cache storage), decode (decode_weight dispatch). The numeric names below are imported on first
use, so `import qtool.formats.registry` loads no torch.
"""
import importlib

_EXPORTS = {
    "activations": ("ACTIVATIONS", "quantize_activation"),
    "decode": ("FORMATS", "decode_weight"),
    "fp4": ("E2M1_VALUES", "e2m1_decode", "e2m1_encode", "e2m1_round", "encode_mxfp4_weight", "encode_nvfp4_weight",
            "pack_nibbles", "unpack_nibbles"),
    "fp8": ("E4M3_MAX", "e4m3", "encode_fp8", "encode_fp8_block", "encode_fp8_rowwise", "fake_e4m3"),
    "int4": ("encode_int4_awq", "w4a8_weight_scale_2"),
    "kv": ("KV_FORMATS", "kv_decode", "kv_encode"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'qtool.formats' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qtool.formats.{mod}"), name)
