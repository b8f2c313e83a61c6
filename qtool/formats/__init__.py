"""Numerics of every weight, activation and KV-cache format qtool reads (torch only, CPU or CUDA).

Contract: this package implements docs/numerics.md and nothing else; the reference backend and the CUDA
kernels are checked against it, and it is checked against ModelOpt 0.47's own export math (tests/test_formats.py).
Modules: fp8 (E4M3, per-tensor / rowwise / 2-D block), fp4 (E2M1 tables, NVFP4, MXFP4), int4 (ModelOpt AWQ,
GPTQ, AutoAWQ), activations (x → x̂ per recipe), kv (KV-cache storage), decode (decode_weight dispatch).
"""
from qtool.formats.activations import ACTIVATIONS, quantize_activation
from qtool.formats.decode import FORMATS, decode_weight
from qtool.formats.fp4 import (E2M1_VALUES, e2m1_decode, e2m1_encode, e2m1_round, encode_mxfp4_weight,
                               encode_nvfp4_weight, pack_nibbles, unpack_nibbles)
from qtool.formats.fp8 import E4M3_MAX, e4m3, encode_fp8, encode_fp8_block, encode_fp8_rowwise, fake_e4m3
from qtool.formats.int4 import encode_int4_awq, w4a8_weight_scale_2
from qtool.formats.kv import KV_FORMATS, kv_decode, kv_encode

__all__ = [
    "ACTIVATIONS", "E2M1_VALUES", "E4M3_MAX", "FORMATS", "KV_FORMATS", "decode_weight", "e2m1_decode",
    "e2m1_encode", "e2m1_round", "e4m3", "encode_fp8", "encode_fp8_block", "encode_fp8_rowwise",
    "encode_int4_awq", "encode_mxfp4_weight", "encode_nvfp4_weight", "fake_e4m3", "kv_decode", "kv_encode",
    "pack_nibbles", "quantize_activation", "unpack_nibbles", "w4a8_weight_scale_2",
]
