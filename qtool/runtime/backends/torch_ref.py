"""The PyTorch reference backend: float32 on CPU; it DEFINES the numerics of docs/numerics.md.

Contract: implements qtool.runtime.backend.Backend. `prepare` decodes every linear layer once to
a float32 `[out, in]` matrix (cached per LinearWeights; the quantized tensors stay referenced by
the ModelWeights, the float32 copies are this backend's working form), all of them and the float32 embedding
table as views of one buffer (`_Arena`), each decoded in place (`LinearWeights.dequantize(out=)`). `linear` applies the
layer's `pre_quant_scale`, then the activation quantization of its scheme
(`qtool.formats.quantize_activation`), then `x @ W^T + bias` in float32 (with `sum64` set: the same products summed in float64 and rounded
once to float32, the summation-order self-pair of `qtool eval --noise-floor`). The KV cache holds K/V
in their stored (quantized) form, written with `qtool.formats.kv_encode` and read back with
`kv_decode`, using each layer's k_scale / v_scale (1.0 when the checkpoint has none).
Two cache layouts: `new_cache` (contiguous rows, [B, max_len, Hkv, ...]) and `new_paged_cache`
(a pool of fixed-size blocks [num_blocks, block_size, Hkv, ...] plus an int32 `block_tables`
[max_batch, max_blocks_per_seq] that the engine fills in place: position p of row b lives in block
`block_tables[b, p // block_size]`, slot `p % block_size`; block 0 is the dummy of padded rows).
Attention, softmax, norms and RoPE are float32. No CUDA-graph concerns apply here.
"""
from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass, field

import torch

from qtool.runtime import rope
from qtool.runtime.sampling import nucleus, sample as _sample


def _sum64(x: torch.Tensor, w: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """x @ w^T with the products summed in float64, rounded once to float32; w converted in blocks of ``rows``
    output rows (a float64 copy of a whole lm_head would be 8 bytes a weight)."""
    x64 = x.double()
    y = torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.float32)
    for o0 in range(0, w.shape[0], rows):
        y[..., o0:o0 + rows] = (x64 @ w[o0:o0 + rows].double().t()).float()
    return y


@dataclass
class RefKVCache:
    """Per layer: K and V as tuples of stored tensors, each [B, max_len, Hkv, ...]."""

    fmt: str
    batch: int
    max_len: int
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)


@dataclass
class RefPagedKVCache:
    """Per layer: K and V as tuples of stored tensors, each [num_blocks, block_size, Hkv, ...]."""

    fmt: str
    num_blocks: int
    block_size: int
    block_tables: torch.Tensor          # int32 [max_batch, max_blocks_per_seq], filled by the engine
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)


def _f32(t):
    return None if t is None else t.to(torch.float32)


class _Arena:
    """One float32 buffer for every decoded weight, handed out in order as ``[rows, cols]`` views (decoders
    write into them: no temporaries, no second pass). torch's allocator, not NumPy's: NumPy advises huge pages
    for large arrays, and first-touching huge pages cost 3-5x more kernel time than 4 KiB pages on the shared
    CPU machine (a VM) where start-up is measured (bench/bench_startup.py)."""

    def __init__(self, shapes: list[tuple[int, int]]):
        self.shapes, self.offset = list(shapes), 0
        self.buf = torch.empty(sum(r * c for r, c in self.shapes))

    def take(self) -> torch.Tensor:
        r, c = self.shapes.pop(0)
        view = self.buf[self.offset:self.offset + r * c].view(r, c)
        self.offset += r * c
        return view


class TorchRefBackend:
    name = "torch"

    def __init__(self):
        self.device = torch.device("cpu")
        self.act_dtype = torch.float32
        self.sum64 = False        # linears summed in float64, then rounded (qtool eval's summation-order floor)
        self._w: dict[int, torch.Tensor] = {}
        self._bias: dict[int, torch.Tensor | None] = {}

    # -- weights -----------------------------------------------------------------------------
    def prepare(self, weights) -> None:
        self.weights = weights
        c = weights.config
        self.config = c
        self.inv_freq = rope.inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        lm = weights.lm_head
        groups = [lm] + [lw for L in weights.layers for lw in (L.qkv, L.o, L.gate_up, L.down)]
        for lw in groups:
            if lw.parts is not None:          # an unfused q/k/v or gate/up group: each part on the same input
                self._w[id(lw)] = None
        tied = lm.parts is None and lm.format == "bf16" and lm.tensors.get("weight") is weights.embed
        decoded = [lw for g in groups for lw in (g.parts or [g]) if not (tied and lw is lm)]
        decoded = list({id(lw): lw for lw in decoded}.values())
        arena = _Arena([tuple(weights.embed.shape)] + [(lw.out_features, lw.in_features) for lw in decoded])
        self.embed_table = arena.take().copy_(weights.embed)
        if tied:
            self._w[id(lm)] = self.embed_table        # tied: the same float32 table, converted once
            self._bias[id(lm)] = _f32(lm.bias)
        self.final_norm = _f32(weights.final_norm)
        for lw in decoded:
            self._w[id(lw)] = lw.dequantize(arena.take())
            self._bias[id(lw)] = _f32(lw.bias)
        self.k_scales = [self._scale(L.k_scale) for L in weights.layers]
        self.v_scales = [self._scale(L.v_scale) for L in weights.layers]

    @staticmethod
    def _scale(s) -> torch.Tensor:
        return torch.tensor(1.0) if s is None else torch.as_tensor(s, dtype=torch.float32).reshape(())

    # -- elementwise ---------------------------------------------------------------------------
    def embed(self, ids):
        return self.embed_table[ids.reshape(-1)]

    @staticmethod
    def _rms(x, weight, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(torch.float32)

    def rmsnorm(self, x, weight, eps, residual=None):
        h = x if residual is None else x + residual
        return self._rms(h, weight, eps), h

    def head_rmsnorm(self, x, weight, eps):
        return self._rms(x, weight, eps)

    def silu_mul(self, gate_up):
        g, u = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    # -- linear --------------------------------------------------------------------------------
    def linear(self, x, lw):
        if lw.parts is not None:
            return torch.cat([self.linear(x, part) for part in lw.parts], dim=-1)
        xq, w = lw.quantize_input(x), self._w[id(lw)]
        y = _sum64(xq, w) if self.sum64 else xq @ w.t()
        bias = self._bias[id(lw)]
        return y if bias is None else y + bias

    def final_logits(self, x):
        h = self._rms(x, self.final_norm, self.config.rms_norm_eps)
        return self.linear(h, self.weights.lm_head)

    # -- fused sequences: the compositions that define them (backend.py) ------------------------------
    def rmsnorm_linear(self, x, weight, eps, residual, lw):
        y, residual = self.rmsnorm(x, weight, eps, residual)
        return self.linear(y, lw), residual

    def attention_with_rope_store(self, q, k, v, positions, cache, layer, o):
        q = self.rope_and_store(q, k, v, positions, cache, layer)
        return self.linear(self.attention(q, cache, layer, positions), o)

    def rmsnorm_mlp(self, x, weight, eps, residual, gate_up, down):
        m, residual = self.rmsnorm(x, weight, eps, residual)
        return self.linear(self.silu_mul(self.linear(m, gate_up)), down), residual

    # -- KV cache and attention ----------------------------------------------------------------
    def _fill(self, cache, lead: tuple, kv_format):
        from qtool.formats import kv_encode
        c = self.config
        for i in range(c.num_layers):
            zeros = torch.zeros(*lead, c.num_kv_heads, c.head_dim)
            cache.k.append(tuple(t.clone() for t in kv_encode(kv_format, zeros, self.k_scales[i])))
            cache.v.append(tuple(t.clone() for t in kv_encode(kv_format, zeros, self.v_scales[i])))
        return cache

    def new_cache(self, batch, max_len, kv_format):
        return self._fill(RefKVCache(kv_format, batch, max_len), (batch, max_len), kv_format)

    def new_paged_cache(self, num_blocks, block_size, kv_format, max_batch=64, max_blocks_per_seq=None):
        """A pool of `num_blocks` blocks of `block_size` positions; `block_tables` [max_batch,
        max_blocks_per_seq] (default: num_blocks) starts all zero (every row on the dummy block 0)."""
        tables = torch.zeros(max_batch, max_blocks_per_seq or num_blocks, dtype=torch.int32)
        return self._fill(RefPagedKVCache(kv_format, num_blocks, block_size, tables), (num_blocks, block_size),
                          kv_format)

    def cache_nbytes(self, cache) -> int:
        return sum(t.numel() * t.element_size() for tup in cache.k + cache.v for t in tup)

    @staticmethod
    def _slots(cache, positions):
        """Index tuple of the stored slots of `positions` [B,T]: (rows, positions) or (blocks, offsets)."""
        B, T = positions.shape
        if isinstance(cache, RefPagedKVCache):
            bs = cache.block_size
            blocks = cache.block_tables[:B].long().gather(1, positions // bs)
            return blocks, positions % bs
        return torch.arange(B).unsqueeze(1).expand(B, T), positions

    @staticmethod
    def _rows(cache, store, B: int, length: int):
        """Stored K or V of the first `length` positions of each of the B rows: tensors [B, length, Hkv, ...]."""
        if isinstance(cache, RefPagedKVCache):
            nb = -(-length // cache.block_size)
            ids = cache.block_tables[:B, :nb].long()
            return tuple(t[ids].reshape(B, nb * cache.block_size, *t.shape[2:])[:, :length] for t in store)
        return tuple(t[:, :length] for t in store)

    def rope_and_store(self, q, k, v, positions, cache, layer):
        from qtool.formats import kv_encode
        B, T = positions.shape
        cos, sin = rope.cos_sin(self.inv_freq, positions.reshape(-1))
        q = rope.apply(q, cos, sin)
        k = rope.apply(k, cos, sin)
        where = self._slots(cache, positions)
        for store, x, scale in ((cache.k[layer], k, self.k_scales[layer]), (cache.v[layer], v, self.v_scales[layer])):
            enc = kv_encode(cache.fmt, x.reshape(B, T, *x.shape[1:]), scale)
            for dst, src in zip(store, enc):
                dst[where] = src
        return q

    def attention(self, q, cache, layer, positions):
        from qtool.formats import kv_decode
        B, T = positions.shape
        length = int(positions.max()) + 1
        k = kv_decode(cache.fmt, *self._rows(cache, cache.k[layer], B, length), scale=self.k_scales[layer])
        v = kv_decode(cache.fmt, *self._rows(cache, cache.v[layer], B, length), scale=self.v_scales[layer])
        hq, d = q.shape[1], q.shape[2]
        rep = hq // k.shape[2]                            # query head h uses KV head h // rep
        k = k.repeat_interleave(rep, dim=2).transpose(1, 2)       # [B, Hq, L, d]
        v = v.repeat_interleave(rep, dim=2).transpose(1, 2)
        qb = q.reshape(B, T, hq, d).transpose(1, 2)               # [B, Hq, T, d]
        scores = torch.matmul(qb, k.transpose(2, 3)) * d ** -0.5
        visible = torch.arange(length)[None, None, :] <= positions[:, :, None]     # [B, T, L]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2)            # [B, T, Hq, d]
        return out.reshape(B * T, hq * d)

    # -- misc ----------------------------------------------------------------------------------
    def sample(self, logits, temperature, top_k, top_p, generator):
        return _sample(logits, temperature, *nucleus(top_k, top_p), generator)

    def synchronize(self) -> None:
        return None

    def peak_memory_bytes(self) -> int | None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024

    def wrap_decode(self, step):
        return step
