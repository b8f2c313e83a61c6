"""Prefill attention cases shared by tests/test_prefill_attention_cpu.py and tests/gpu/test_prefill_attention.py.

``PrefillCase`` holds one layer of random K/V encoded once with the reference's ``kv_encode`` and the same stored
codes in two caches: the reference backend's (contiguous or paged) and the CUDA backend's layout (ops.KVCache /
ops.PagedKVCache, on any device), the paged ones over a scrambled block table. ``reference`` is the reference
backend's attention over its cache; ``rel_err`` the relative error used by both tests.
"""
from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import torch

BS = 16
KS, VS = 0.05, 0.04          # the layer's k_scale / v_scale (K/V values ~N(0, 1): fp8 codes up to ~100, nvfp4 ok)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all(), "non-finite output"
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@contextlib.contextmanager
def tf32_allowed(api: str):
    """TF32 allowed for CUDA matmuls through torch's legacy ``allow_tf32`` or its ``fp32_precision`` API inside; on
    exit, checks the setting is still "tf32" (what qtool changed, it put back) and restores the one before."""
    m = torch.backends.cuda.matmul
    old, old_global = m.fp32_precision, torch.get_float32_matmul_precision()
    try:
        if api == "legacy":
            m.allow_tf32 = True
        else:
            m.fp32_precision = "tf32"
        yield m
        assert m.fp32_precision == "tf32"
    finally:            # both settings back (the legacy switch also moved the global one), so no API mix remains
        torch.set_float32_matmul_precision(old_global)
        m.fp32_precision = old


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


class PrefillCase:
    """B rows whose K/V fill positions 0..length-1 (length = the largest position + 1), queries at ``positions``."""

    def __init__(self, kv: str, hq: int, hkv: int, d: int, paged: bool, positions: torch.Tensor, device,
                 seed: int = 0):
        from qtool.formats.kv import kv_encode
        from qtool.kernels import ops
        from qtool.runtime.backends.torch_ref import TorchRefBackend
        g = torch.Generator().manual_seed(seed)
        self.positions = positions
        B, T = positions.shape
        length = int(positions.max()) + 1
        per_row = math.ceil(length / BS) + 1
        max_len = per_row * BS
        self.ref = TorchRefBackend()
        self.ref.config = SimpleNamespace(num_layers=1, num_kv_heads=hkv, head_dim=d)
        self.ref.k_scales, self.ref.v_scales = [torch.tensor(KS)], [torch.tensor(VS)]
        if paged:
            num_blocks = 1 + B * per_row
            tables = (torch.randperm(B * per_row, generator=g) + 1).reshape(B, per_row).to(torch.int32)
            self.rcache = self.ref.new_paged_cache(num_blocks, BS, kv, max_batch=B, max_blocks_per_seq=per_row)
            self.rcache.block_tables[:] = tables
            self.cache = ops.PagedKVCache(kv, num_blocks, BS, B, per_row, 1, hkv, d, device, [KS], [VS])
            self.cache.block_tables.copy_(tables.to(device))
            p = torch.arange(length)
            blk, slot = tables[:, p // BS].long(), (p % BS).expand(B, length)
        else:
            self.rcache = self.ref.new_cache(B, max_len, kv)
            self.cache = ops.KVCache(kv, B, max_len, 1, hkv, d, device, [KS], [VS])
        for which, scale in (("k", KS), ("v", VS)):
            x = torch.randn(B, length, hkv, d, generator=g)
            enc = kv_encode(kv, x, scale)                          # [B, length, Hkv, ...] each
            ref_store, store = getattr(self.rcache, which)[0], getattr(self.cache, which)[0]
            for i, e in enumerate(enc):
                dst = store[i]
                src = _u8(e) if dst.dtype == torch.uint8 else e
                if paged:
                    ref_store[i][blk, slot] = e
                    dst[blk.to(device), :, slot.to(device)] = src.to(device)
                else:
                    ref_store[i][:, :length] = e
                    dst[:, :, :length] = src.transpose(1, 2).to(device)
        self.q = torch.randn(B * T, hq, d, generator=g)

    def reference(self) -> torch.Tensor:
        return self.ref.attention(self.q, self.rcache, 0, self.positions)
