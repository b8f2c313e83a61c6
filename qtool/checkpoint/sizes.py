"""Sizes of a checkpoint: parameter count, bytes, bits per weight, memory for weights + KV cache.

Contract: `sizes(files, scheme, context, batch)` returns a Sizes computed from the headers only.
Parameters are logical (unpacked) values: a linear counts out*in whatever its packing (two int4
or FP4 values per byte count as two), plus its bias; other tensors (embeddings, norms) count
their elements; scale, zero-point, g_idx and KV-scale tensors are not parameters. Bits per
weight = 8 * bytes of a linear's weight-bearing tensors (weight/qweight and every scale, zero
and g_idx tensor; bias excluded) / its out*in, over all linears and over the quantized ones.
The KV cache holds K and V for every layer: 2 * layers * kv_heads * head_dim * context * batch
elements at 2 bytes (bf16), 1 (fp8) or 0.5 + 1/16 (nvfp4: E2M1 plus one E4M3 scale per 16).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from qtool.checkpoint.files import CheckpointFiles
from qtool.checkpoint.scheme import CheckpointScheme, num_layers
from qtool.support.families import text_config

KV_BYTES_PER_ELEMENT = {"bf16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1.0 / 16}


@dataclass
class Sizes:
    parameters: int                 # logical parameter count
    linear_weights: int             # out*in over all linears
    quantized_weights: int          # out*in over quantized linears
    tensor_bytes: int               # sum of tensor data bytes
    bytes_on_disk: int              # file sizes (headers included)
    bits_per_weight: float | None             # all linears
    bits_per_weight_quantized: float | None   # quantized linears only
    bf16_bytes: int                 # parameters * 2
    size_vs_bf16: float | None      # bytes_on_disk / bf16_bytes
    kv_cache_bytes: int | None      # at context x batch in the checkpoint's KV format (None: unknown dims)
    memory_bytes: int | None        # tensor_bytes + kv_cache_bytes
    context: int
    batch: int
    kv_format: str

    def as_dict(self) -> dict:
        return asdict(self)


def kv_dims(config: dict) -> tuple[int, int, int] | None:
    """(layers, kv_heads, head_dim) from config.json, or None when it does not say."""
    c = text_config(config)
    layers = num_layers(config)
    heads = c.get("num_attention_heads")
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or (c.get("hidden_size") // heads if c.get("hidden_size") and heads else None)
    if not all(isinstance(x, int) and x > 0 for x in (layers, kv_heads, head_dim)):
        return None
    return layers, kv_heads, head_dim


def kv_cache_bytes(config: dict, kv_format: str, context: int, batch: int) -> int | None:
    dims = kv_dims(config)
    if dims is None:
        return None
    layers, kv_heads, head_dim = dims
    return int(2 * layers * kv_heads * head_dim * context * batch * KV_BYTES_PER_ELEMENT[kv_format])


def sizes(files: CheckpointFiles, scheme: CheckpointScheme, context: int = 4096, batch: int = 1) -> Sizes:
    t = files.tensors
    params = lin_all = lin_q = 0
    bytes_all = bytes_q = 0
    for spec in scheme.linears.values():
        n = spec.out_features * spec.in_features
        b = sum(t[name].nbytes for role, name in spec.tensors.items() if role != "bias" and name in t)
        params += n + (t[spec.tensors["bias"]].numel if "bias" in spec.tensors else 0)
        lin_all += n
        bytes_all += b
        if spec.format != "bf16":
            lin_q += n
            bytes_q += b
    params += sum(t[name].numel for name in scheme.other_tensors if t[name].dtype not in ("I32", "I64", "U8"))
    tensor_bytes = sum(x.nbytes for x in t.values())
    disk = files.bytes_on_disk or tensor_bytes
    kv = kv_cache_bytes(files.config, scheme.kv_format, context, batch)
    return Sizes(
        parameters=params, linear_weights=lin_all, quantized_weights=lin_q, tensor_bytes=tensor_bytes,
        bytes_on_disk=disk,
        bits_per_weight=8 * bytes_all / lin_all if lin_all else None,
        bits_per_weight_quantized=8 * bytes_q / lin_q if lin_q else None,
        bf16_bytes=2 * params, size_vs_bf16=disk / (2 * params) if params else None,
        kv_cache_bytes=kv, memory_bytes=None if kv is None else tensor_bytes + kv,
        context=context, batch=batch, kv_format=scheme.kv_format)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
