"""The CUDA side of the paged KV cache (ops.PagedKVCache: rope_kv_write and attn_partial address position p of
batch row b at block block_tables[b, p // block_size], slot p % block_size) against the reference backend's paged
cache and float64.

For every KV format, two head shapes and batch sizes 1, 3, 8, 33 with mixed lengths (1 .. 150 positions, blocks
of 16 handed out in a scrambled order, one padded row on the dummy block 0 at position 0): a prefill of the real
rows (T = the longest row, one rope_kv_write launch) and one decode step (T = 1), on CUDA both with RoPE + the KV
write fused into attn_partial and unfused (rope_kv_write + attn_partial), and on the reference backend. Checked:
- the stored codes (gathered through the block table) equal the reference's kv_encode except at rounding
  boundaries (at most 0.2 % of elements differ, as tests/gpu/test_kernels.py allows for the contiguous cache);
- each CUDA attention output against float64 attention over the CUDA cache's decoded contents gathered through
  the block table: relative error <= 1e-5 (float32 sums);
- each CUDA output against the reference backend's output: relative error <= 1e-2 (docs/numerics.md's
  per-kernel bound; the two caches differ only at those rounding boundaries).
Long rows (up to 1200 positions at batch 33: 4 splits of up to 300 positions each, walked in sub-chunks of 128
with the running softmax) are checked the same way. A batch-8 decode step captured in a CUDA graph replays to the eager bits, also after every block has moved to
another block id and the table was rewritten in place (the graph reads the live table).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.gpu
DEV = "cuda"
BS = 16
SHAPES = [(8, 2, 128), (9, 3, 64)]      # (Hq, Hkv, d): GM = 4 heads per KV head with d 128, 3 with d 64


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _u8(t):
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn,) else t


class Case:
    """B rows of random lengths over a scrambled block table, the reference backend and two CUDA caches."""

    def __init__(self, kv: str, B: int, hq: int, hkv: int, d: int, seed: int, longest: int = 150):
        from qtool.kernels import ops
        from qtool.runtime import rope
        from qtool.runtime.backends.torch_ref import TorchRefBackend
        g = torch.Generator().manual_seed(seed)
        self.kv, self.B, self.hq, self.hkv, self.d = kv, B, hq, hkv, d
        lens = torch.randint(1, longest + 1, (B,), generator=g)
        lens[0] = 1 if B > 1 else lens[0]                      # a row whose decode sees 2 positions
        if B > 2:
            lens[1], lens[2] = BS, BS - 1                      # the decode position on a block's first / last slot
        self.lens = lens
        self.T0 = int(lens.max())
        self.per_row = math.ceil((self.T0 + 1) / BS)
        self.num_blocks = 1 + B * self.per_row
        self.tables = (torch.randperm(B * self.per_row, generator=g) + 1).reshape(B, self.per_row).to(torch.int32)
        self.ks, self.vs = 0.05, 0.04
        self.ref = TorchRefBackend()
        self.ref.config = SimpleNamespace(num_layers=1, num_kv_heads=hkv, head_dim=d)
        self.ref.inv_freq = rope.inv_freq(d, 10000.0, None)
        self.ref.k_scales, self.ref.v_scales = [torch.tensor(self.ks)], [torch.tensor(self.vs)]
        self.rcache = self.ref.new_paged_cache(self.num_blocks, BS, kv, max_batch=B + 1, max_blocks_per_seq=self.per_row)
        self.rcache.block_tables[:B] = self.tables
        self.caches = []
        for _ in range(2):                                     # [0]: unfused decode, [1]: RoPE + write fused
            c = ops.PagedKVCache(kv, self.num_blocks, BS, B + 1, self.per_row, 1, hkv, d, DEV, [self.ks], [self.vs])
            c.block_tables[:B] = self.tables.to(DEV)
            self.caches.append(c)
        cos, sin = rope.cos_sin(self.ref.inv_freq, torch.arange(self.per_row * BS))
        self.cos, self.sin = cos[:, :d // 2].contiguous().to(DEV), sin[:, :d // 2].contiguous().to(DEV)
        self.g = g

    def qkv(self, n: int):
        """Random q, k, v [n, H, d] as views of one qkv row (as the model hands them over), CPU and CUDA."""
        hq, hkv, d = self.hq, self.hkv, self.d
        x = torch.randn(n, (hq + 2 * hkv) * d, generator=self.g)
        xd = x.to(DEV)
        cut = lambda t: (t[:, :hq * d].view(n, hq, d), t[:, hq * d:(hq + hkv) * d].view(n, hkv, d),  # noqa: E731
                         t[:, (hq + hkv) * d:].view(n, hkv, d))
        return cut(x), cut(xd)

    def gathered(self, cache, which: str, b: int, n: int) -> tuple:
        """Row b's first n positions of the CUDA cache's K or V, [n, Hkv, ...] per stored tensor."""
        blocks = self.tables[b, :math.ceil(n / BS)].long().to(DEV)
        out = []
        for t in getattr(cache, which)[0]:
            if t is None:
                continue
            x = t[blocks]                                      # [nb, Hkv, BS, ...]
            out.append(x.permute(0, 2, 1, 3).reshape(-1, *x.shape[1:2], x.shape[3])[:n].cpu())
        return tuple(out)

    def ref_gathered(self, which: str, b: int, n: int) -> tuple:
        blocks = self.tables[b, :math.ceil(n / BS)].long()
        return tuple(_u8(t[blocks].reshape(-1, *t.shape[2:])[:n]) for t in getattr(self.rcache, which)[0])

    def decoded(self, cache, which: str, b: int, n: int) -> torch.Tensor:
        from qtool.formats import kv_decode
        st = self.gathered(cache, which, b, n)
        scale = self.ks if which == "k" else self.vs
        if self.kv == "bf16":
            return kv_decode("bf16", st[0])
        if self.kv == "fp8":
            return kv_decode("fp8", st[0].view(torch.float8_e4m3fn), scale=scale)
        return kv_decode("nvfp4", st[0], st[1].view(torch.float8_e4m3fn), scale=scale)


def _check_codes(case: Case, cache, upto: list[int]):
    for which in ("k", "v"):
        bad = total = 0
        for b, n in enumerate(upto):
            for got, want in zip(case.gathered(cache, which, b, n), case.ref_gathered(which, b, n)):
                bad += int((_u8(got) != _u8(want)).sum())
                total += got.numel()
        assert bad <= max(2, total // 500), f"{which}: {bad} of {total} stored codes differ from kv_encode"


def _float64_attention(case: Case, cache, q_rot: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[B, Hq*d]: row b's query at pos[b] over its positions 0..pos[b] of the CUDA cache (decoded, float64)."""
    rows = []
    rep = case.hq // case.hkv
    for b in range(q_rot.shape[0]):
        n = int(pos[b]) + 1
        K = case.decoded(cache, "k", b, n).double().repeat_interleave(rep, 1)      # [n, Hq, d]
        V = case.decoded(cache, "v", b, n).double().repeat_interleave(rep, 1)
        s = torch.einsum("hd,nhd->hn", q_rot[b].double(), K) / math.sqrt(case.d)
        rows.append(torch.einsum("hn,nhd->hd", s.softmax(-1), V).reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("kv", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("B", [1, 3, 8, 33])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_paged_prefill_and_decode(kv, B, shape):
    from qtool.kernels import ops
    case = Case(kv, B, *shape, seed=B * 31 + shape[2] + len(kv))
    # prefill: every real row over T0 positions (the engine's padded prefill writes them all)
    (q, k, v), (qd, kd, vd) = case.qkv(B * case.T0)
    pos = torch.arange(case.T0).repeat(B, 1)
    ref_q = case.ref.rope_and_store(q, k, v, pos, case.rcache, 0)
    ref_out = case.ref.attention(ref_q, case.rcache, 0, pos)
    for cache in case.caches:
        qr = ops.rope_and_store(qd, kd, vd, pos.to(DEV), cache, 0, case.cos, case.sin, case.T0)
        out = ops.attention(qr, pos.to(DEV), cache, 0, case.T0)
        assert _rel(out, ref_out) < 1e-2, f"prefill vs reference: {_rel(out, ref_out):.2e}"
    _check_codes(case, case.caches[0], [case.T0] * B)
    _decode_and_check(case)


def _decode_and_check(case: Case):
    from qtool.kernels import ops
    from qtool.runtime import rope
    B = case.B
    # decode: row b at position lens[b] (mixed lengths) plus a padded row on block 0 at position 0
    (q, k, v), (qd, kd, vd) = case.qkv(B + 1)
    dpos = torch.cat([case.lens, torch.tensor([0])])[:, None]
    ref_q = case.ref.rope_and_store(q, k, v, dpos, case.rcache, 0)
    ref_out = case.ref.attention(ref_q, case.rcache, 0, dpos)[:B]
    c, s = rope.cos_sin(case.ref.inv_freq, dpos.reshape(-1))
    q_rot = rope.apply(q, c, s)[:B]
    for fused, cache in enumerate(case.caches):
        if fused:
            out = ops.attention(qd, dpos.to(DEV), cache, 0, 1, rope=(kd, vd, case.cos, case.sin))
        else:
            qr = ops.rope_and_store(qd, kd, vd, dpos.to(DEV), cache, 0, case.cos, case.sin, 1)
            out = ops.attention(qr, dpos.to(DEV), cache, 0, 1)
        out = out[:B]
        want = _float64_attention(case, cache, q_rot, dpos[:B, 0])
        assert _rel(out, want) < 1e-5, f"fused={fused}: vs float64 over the cache {_rel(out, want):.2e}"
        assert _rel(out, ref_out) < 1e-2, f"fused={fused}: vs reference {_rel(out, ref_out):.2e}"
        _check_codes(case, cache, [max(int(n) + 1, case.T0) for n in case.lens])


@pytest.mark.parametrize("kv", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("shape", [(32, 8, 128), (64, 8, 256)], ids=["d128", "d256-g8"])
def test_paged_long_rows(kv, shape):
    """Decode at batch 33 over rows of up to 1200 positions (the prefill only writes: its float64 check would be
    large), so each split spans several staged sub-chunks; head_dim 256 with 8 query heads per KV head is the
    kernel instance with the most shared memory and registers."""
    _long_rows(kv, *shape)


@pytest.mark.parametrize("kv", ["bf16", "nvfp4"])
@pytest.mark.parametrize("sub", [32, 96])
def test_paged_long_rows_short_sub_chunks(kv, sub, monkeypatch):
    """The staged sub-chunk length follows the launch's dynamic shared memory (ops.paged_stage_bytes): forced to 32
    and 96 positions, what GPUs with 99 KB per block get for head_dim 256 (an H100 / H200 always fits 128)."""
    from qtool.kernels import ops
    monkeypatch.setattr(ops, "_stage_bytes", lambda name, row, device: sub * row)
    _long_rows(kv, 32, 8, 128, sub)


def _long_rows(kv: str, hq: int, hkv: int, d: int, sub: int | None = None):
    from qtool.kernels import ops
    case = Case(kv, 33, hq, hkv, d, seed=3 + len(kv) + d, longest=1200)
    S = ops._paged_splits(34, hkv, case.per_row * BS)
    assert int(case.lens.max()) > S * (sub or ops.PAGED_SUB_CHUNK)    # some split walks two or more sub-chunks
    (q, k, v), (qd, kd, vd) = case.qkv(case.B * case.T0)
    pos = torch.arange(case.T0).repeat(case.B, 1)
    case.ref.rope_and_store(q, k, v, pos, case.rcache, 0)
    for cache in case.caches:
        ops.rope_and_store(qd, kd, vd, pos.to(DEV), cache, 0, case.cos, case.sin, case.T0)
    _decode_and_check(case)


@pytest.mark.parametrize("kv", ["bf16", "fp8", "nvfp4"])
def test_paged_decode_graph_replay(kv):
    """Batch-8 decode (RoPE + write fused, then the o projection's quantized merge as CudaBackend runs it)
    captured in a CUDA graph: every replay equals the eager bits; after the blocks move to other ids and the
    table is rewritten in place, the replays still give those bits."""
    from qtool.kernels import ops
    from qtool.kernels.random_weights import random_linear
    from qtool.runtime.backends.cuda import warm_and_capture
    B, (hq, hkv, d) = 8, SHAPES[0]
    case = Case(kv, B, hq, hkv, d, seed=7 + len(kv))
    cache = case.caches[1]
    (_, _, _), (qd0, kd0, vd0) = case.qkv(B * case.T0)
    pos0 = torch.arange(case.T0).repeat(B, 1).to(DEV)
    ops.rope_and_store(qd0, kd0, vd0, pos0, cache, 0, case.cos, case.sin, case.T0)
    (_, _, _), (qd, kd, vd) = case.qkv(B)
    dpos = case.lens[:, None].to(DEV)
    o = ops.adopt_layout(random_linear("fp8", 256, hq * d, torch.Generator(device=DEV).manual_seed(1), DEV))

    def step():
        return ops.attention_o(qd, kd, vd, dpos, cache, 0, case.cos, case.sin, o)

    eager = step().clone()
    graph, out = warm_and_capture(step)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    # a pool of twice the size (the graph holds the pool's pointers, so blocks move within it): captured with the
    # blocks at their ids, then every block moved to id + num_blocks and the table rewritten in place
    big = ops.PagedKVCache(kv, 2 * case.num_blocks, BS, B + 1, case.per_row, 1, hkv, d, DEV, [case.ks], [case.vs])
    big.block_tables[:B] = case.tables.to(DEV)
    for src, dst in zip(cache.k + cache.v, big.k + big.v):
        for a, b in zip(src, dst):
            if a is not None:
                b[:case.num_blocks].copy_(a)

    def step_big():
        return ops.attention_o(qd, kd, vd, dpos, big, 0, case.cos, case.sin, o)

    assert torch.equal(step_big(), eager)
    graph, out = warm_and_capture(step_big)
    moved = case.tables.to(DEV) + case.num_blocks              # block i -> i + num_blocks (unused until now)
    for t in big.k[0] + big.v[0]:
        if t is not None:
            t[case.num_blocks:].copy_(t[:case.num_blocks])
            t[:case.num_blocks].zero_()                      # the old copies are gone
    big.block_tables[:B].copy_(moved.to(torch.int32))
    for _ in range(2):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
