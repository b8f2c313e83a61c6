"""The fast paths against their reference paths on random data (formerly a run-time self-check of
qtool/kernels/ops.py; now GPU tests): gemv_mma4p against the f32 GEMM, gemm_tc against the f32 GEMM, gemv_h
against gemv, the fused quantizing kernels (silu_mul_quant, gemv_mma4ps, the attention merge with a scheme)
bit for bit against the unfused kernel + act_quant, attn_combine over several blocks and attn_combine_heads
against one block per row, and attn_partial with fused RoPE + KV write against rope_kv_write + attn_partial.
The helpers ending in ``_error`` return None or what differed (test_kernels.py calls them at more shapes).
Run by scripts/gpu_tests.sh; skipped without CUDA + CuPy.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qtool.kernels.ops import (KVCache, _attn_partial, _head_local, _launch_combine, _launch_mma4, _launch_silu_quant,
                               _quant_outputs, act_quant, adopt_layout, interleave_gate_up, linear, rope_and_store,
                               silu_mul, silu_mul_quant)
from qtool.kernels.random_weights import random_linear
from qtool.kernels.weights import KLinear, to_tiled

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


def _gen(seed=0):
    return torch.Generator(device="cuda").manual_seed(seed)


@pytest.mark.parametrize("recipe", ["w4a16-awq"])
def test_half_path(recipe):
    """gemv_h (f16 pair math) on int4 weights without a pre-quant scale against gemv (f32) to 5e-3."""
    g = _gen()
    kl = random_linear(recipe, 96, 512, g, DEV)
    kl.pqs = None
    x = torch.randn(3, 512, generator=g, device=DEV)
    a, b = linear(x, kl, path="half"), linear(x, kl, path="f32")
    assert float((a - b).norm() / b.norm()) < 5e-3


@pytest.mark.parametrize("O,K,act,M", [(96, 512, 2, 3), (200, 640, 3, 1), (1000, 4096, 2, 1), (72, 384, 3, 3)])
def test_mma4(O, K, act, M):
    """gemv_mma4p against the f32 GEMM of the same tiled weights: per-row and 128x128-block scales, odd O, K not
    a multiple of 256, M = 1 and 3, the default K split, S = 1 and S = 3, bit-identical repeats."""
    g = _gen(O + K)
    kl = adopt_layout(random_linear("fp8-block" if act == 3 else "fp8-rowwise", O, K, g, DEV, bias=act == 3))
    assert kl.tiled
    x = torch.randn(M, K, generator=g, device=DEV)
    b = linear(x, kl, path="gemm")
    q = act_quant(x, kl, codes=True)
    outs = []
    for S in (None, None, 1, 3):
        y = torch.full((M, O), float("nan"), device=DEV)
        _launch_mma4(q, kl, y, M, S)
        outs.append(y)
    err = max(float((a - b).norm() / b.norm()) for a in outs)
    assert err < 1e-4 and torch.equal(outs[0], outs[1])


TC_CHECKS = (("fp8-rowwise", 70, 100, 400), ("fp8-block", 9, 200, 640), ("fp8", 130, 64, 256),
             ("fp8-weight-only", 20, 96, 512), ("bf16", 33, 72, 208), ("w4a16-awq", 17, 64, 256),
             ("nvfp4", 12, 80, 512), ("mxfp4", 40, 64, 256),   # fp4: weight-only (act 0) here
             ("fp8-block", 20, 130, 320), ("bf16", 64, 128, 4096), ("fp8-rowwise", 10, 64, 14336))


@pytest.mark.parametrize("recipe,M,O,K", TC_CHECKS)
def test_tc(recipe, M, O, K):
    """gemm_tc against the f32 gemm (same weights, same x̂) to 1e-5 (exact fp8 products, split bf16 operands
    otherwise): odd M / O, K % 32 == 16, per-tensor / per-row / 128-block scales, tiled fp8, every weight format."""
    g = _gen(M + O + K)
    kl = random_linear(recipe, O, K, g, DEV, bias=O % 3 == 0)
    if kl.fmt in (2, 3):
        kl = replace(kl, act=0, in_scale=None)
    x = torch.randn(M, K, generator=g, device=DEV)
    for k in ((kl, to_tiled(kl)) if kl.fmt == 1 and K % 64 == 0 else (kl,)):
        a, b = linear(x, k, path="tc"), linear(x, k, path="gemm")
        assert float((a - b).norm() / b.norm()) < 1e-5, (recipe, k.tiled)


@pytest.mark.parametrize("I,act,M", [(14336, 2, 1), (176, 3, 2), (14336, 1, 1)])
def test_silu_quant(I, act, M):
    """silu_mul_quant == silu_mul + act_quant bit for bit (out, e4m3 codes, scales) for per-tensor, per-token
    and per-128-group fp8 activations."""
    g = _gen(I + act)
    w = torch.zeros(64, I, dtype=torch.uint8, device=DEV)
    kl = KLinear(1, 64, I, w, sc=torch.ones(64, device=DEV), sbo=1, sbi=I, act=act,
                 in_scale=torch.full((1,), 0.01, device=DEV) if act == 1 else None)
    gu = torch.randn(M, 2 * I, generator=g, device=DEV) * 3
    ref_out = silu_mul(gu)
    ref = act_quant(ref_out, kl, codes=True)
    out = torch.full((M, I), float("nan"), device=DEV)
    pre = _quant_outputs(kl, M, I, "mma4", DEV)
    _launch_silu_quant(gu, out, kl, pre, "mma4", M, I)
    assert torch.equal(out, ref_out) and torch.equal(pre["xq"], ref["xq"]) and torch.equal(pre["xs"], ref["xs"])


@pytest.mark.parametrize("recipe", ["fp8", "fp8-rowwise"])
def test_silu_fused(recipe):
    """gemv_mma4ps == gemv_mma4p + silu_mul_quant bit for bit (e4m3 codes and scale): fp8 per-tensor and per-row
    weight scales, with a bias, M = 1 and 3, one K slice and three."""
    g = _gen(len(recipe))
    I, K = 192, 512
    down = adopt_layout(replace(random_linear("fp8", 64, I, g, DEV), in_scale=torch.full((1,), 0.5, device=DEV)))
    kl = random_linear(recipe, 2 * I, K, g, DEV, bias=True)
    if recipe != "fp8":
        kl = replace(kl, act=1, in_scale=down.in_scale)
    kl = adopt_layout(kl)
    kil = interleave_gate_up(kl)
    for M in (1, 3):
        x = torch.randn(M, K, generator=g, device=DEV)
        q = act_quant(x, kl, codes=True)
        for S in (1, 3):
            y = torch.empty(M, 2 * I, device=DEV)
            _launch_mma4(q, kl, y, M, S)
            _, ref = silu_mul_quant(y, down, keep_out=False)
            pre = _quant_outputs(down, M, I, "mma4", DEV)
            pre["xq"].fill_(0xFF)
            _launch_mma4(q, kil, y, M, S, silu=(down, pre))
            assert torch.equal(pre["xq"], ref["xq"]) and torch.equal(pre["xs"], ref["xs"]), (M, S)


def _random_attention(g, dev, hq: int, hkv: int, d: int, n: int, L: int):
    """(cache, positions, q) for the merge self-checks: one layer of a random bf16 cache of length L, n rows at
    random positions (ragged: some splits empty), random q [n, hq, d]."""
    cache = KVCache("bf16", n, L, 1, hkv, d, dev, [1.0], [1.0])
    for t in (cache.k[0][0], cache.v[0][0]):
        t.copy_(torch.randn(t.shape, generator=g, device=dev))
    pos = torch.randint(0, L, (n, 1), generator=g, device=dev)
    return cache, pos, torch.randn(n, hq, d, generator=g, device=dev)


def rope_fused_error(g, dev, fmt: str, hq: int = 32, hkv: int = 8, d: int = 128, n: int = 1,
                     L: int = 300, early: bool = True) -> str | None:
    """attn_partial with fused RoPE + KV write against rope_kv_write + attn_partial, on one random cache of ``fmt``
    (two identical copies), n decode rows at random positions, q|k|v as strided views of one qkv row. None when
    the caches agree (codes equal except at most max(2, 0.5 %) of the new row's elements: the rope expression may
    contract differently) and part / ml agree to 1e-5 relative; else what differs."""
    caches = [KVCache(fmt, n, L, 1, hkv, d, dev, [0.05], [0.07]) for _ in range(2)]
    for ts in zip(*(c.k[0] + c.v[0] for c in caches)):
        if ts[0] is None:
            continue
        r = (torch.randint(0, 0x7e, ts[0].shape, generator=g, device=dev, dtype=torch.uint8) if ts[0].dtype == torch.uint8
             else torch.randn(ts[0].shape, generator=g, device=dev).to(ts[0].dtype))
        for t in ts:
            t.copy_(r)
    pos = torch.randint(0, L, (n, 1), generator=g, device=dev)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g, device=dev)
    q, k, v = (qkv[:, a:b].view(n, -1, d) for a, b in ((0, hq * d), (hq * d, (hq + hkv) * d), ((hq + hkv) * d, None)))
    ang = torch.rand(L, d // 2, generator=g, device=dev) * 6.3
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    qr = rope_and_store(q, k, v, pos, caches[0], 0, cos, sin, 1)
    ref = _attn_partial(qr, pos, caches[0], 0, 1)
    out = _attn_partial(q, pos, caches[1], 0, 1, rope=(k, v, cos, sin), early=early)
    where = f"kv={fmt}, hq={hq}, hkv={hkv}, d={d}, n={n}"
    for a, b in zip(caches[0].k[0] + caches[0].v[0], caches[1].k[0] + caches[1].v[0]):
        if a is not None:
            diff = int((a != b).sum())
            if diff > max(2, n * hkv * d // 200):
                return f"{diff} cache elements differ ({where})"
    live = ref[1][..., 0] > float("-inf")             # splits past a row's position are empty (part unwritten)
    if not torch.equal(live, out[1][..., 0] > float("-inf")):
        return f"empty splits differ ({where})"
    for a, b, what in ((ref[0][live], out[0][live], "part"), (ref[1][live], out[1][live], "m, l")):
        err = float((a - b).norm() / a.norm().clamp_min(1e-30))
        if not err < 1e-5:
            return f"{what} differs by {err:.2e} ({where})"
    return None


def _probe_linear(act: int | None, K: int, dev) -> KLinear | None:
    """A zero fp8 KLinear [64, K] whose only use is its activation scheme ``act`` (None: no linear): the
    quantization the merge self-checks fuse (per-tensor static with scale 0.01, per-token, per-128-group)."""
    if act is None:
        return None
    return KLinear(1, 64, K, torch.zeros(64, K, dtype=torch.uint8, device=dev), sc=torch.ones(64, device=dev), sbo=1,
                   sbi=K, act=act, in_scale=torch.full((1,), 0.01, device=dev) if act == 1 else None)


def combine_heads_error(g, dev, hq: int = 32, hkv: int = 8, d: int = 128, n: int = 1, L: int = 300) -> str | None:
    """attn_combine_heads against attn_combine (one block per row) on one random bf16 cache with ragged positions
    (empty splits): plain, per-tensor and per-128-group fp8 (where local). None when the rows agree to 1e-5
    relative and the e4m3 codes agree except at most max(2, 0.5 %) elements (another summation order may move a
    value across a rounding boundary) with scales to 1e-5; else what differs."""
    cache, pos, q = _random_attention(g, dev, hq, hkv, d, n, L)
    part, ml = _attn_partial(q, pos, cache, 0, 1)
    HD = hq * d
    for act in (None, 1, 3):
        kl = _probe_linear(act, HD, dev)
        if not _head_local(kl, "mma4", d):
            continue
        res = []
        for heads in (False, True):
            out = torch.full((n, HD), float("nan"), device=dev)
            pre = _quant_outputs(kl, n, HD, "mma4", dev) if kl is not None else {}
            _launch_combine(part, ml, out, cache.splits, d, kl, pre, "mma4", n, HD, split=False, heads=heads)
            res.append((out, pre))
        (ref, rp), (out, pre) = res
        err = float((out - ref).norm() / ref.norm())
        if not err < 1e-5:
            return f"rows differ by {err:.2e} (act={act}, hq={hq}, hkv={hkv}, d={d}, n={n}, L={L})"
        if kl is not None:
            diff = int((pre["xq"] != rp["xq"]).sum())
            serr = float(((pre["xs"] - rp["xs"]).abs() / rp["xs"].abs()).max())
            if diff > max(2, n * HD // 200) or not serr < 1e-5:
                return f"{diff} e4m3 codes / scales ({serr:.1e}) differ (act={act}, hq={hq}, d={d}, n={n}, L={L})"
    return None


def merge_split_error(g, dev, hq: int = 32, hkv: int = 8, d: int = 128, n: int = 1) -> str | None:
    """attn_combine with rows over several blocks == one block per row (run 8's verified grid), bit for bit:
    plain merge and fused per-tensor / per-128-group fp8 quantization (out, e4m3 codes, scales)."""
    cache, pos, q = _random_attention(g, dev, hq, hkv, d, n, 300)
    part, ml = _attn_partial(q, pos, cache, 0, 1)
    for act in (None, 1, 3):
        kl = _probe_linear(act, hq * d, dev)
        res = []
        for split in (True, False):
            out = torch.full((n, hq * d), float("nan"), device=dev)
            pre = _quant_outputs(kl, n, hq * d, "mma4", dev) if kl is not None else {}
            _launch_combine(part, ml, out, cache.splits, d, kl, pre, "mma4", n, hq * d, split=split, heads=False)
            res.append([out] + [pre[k] for k in ("xq", "xs") if k in pre])
        if not all(torch.equal(a, b) for a, b in zip(*res)):
            return f"attn_combine over several blocks differs from one block (act={act})"
    return None


@pytest.mark.parametrize("act", [1, 2, 3])
def test_attn_quant(act):
    """attn_combine with a scheme == attn_combine (scheme 0) + act_quant bit for bit (out, e4m3 codes, scales) for
    per-tensor, per-token and per-128-group fp8 activations, with empty splits (ragged positions)."""
    g, dev = _gen(act), DEV
    hq, hkv, d, L = 8, 2, 128, 200
    cache = KVCache("bf16", 2, L, 1, hkv, d, dev, [1.0], [1.0])
    for t in (cache.k[0][0], cache.v[0][0]):
        t.copy_(torch.randn(t.shape, generator=g, device=dev))
    pos = torch.tensor([[37], [150]], device=dev)
    q = torch.randn(2, hq, d, generator=g, device=dev)
    kl = _probe_linear(act, hq * d, dev)
    part, ml = _attn_partial(q, pos, cache, 0, 1)
    heads = _head_local(kl, "mma4", d)    # the same merge kernel for both
    ref_out = torch.full((2, hq * d), float("nan"), device=dev)
    _launch_combine(part, ml, ref_out, cache.splits, d, None, {}, "mma4", 2, hq * d, heads=heads)
    ref = act_quant(ref_out, kl, codes=True)
    out = torch.full_like(ref_out, float("nan"))
    pre = _quant_outputs(kl, 2, hq * d, "mma4", dev)
    _launch_combine(part, ml, out, cache.splits, d, kl, pre, "mma4", 2, hq * d, heads=heads)
    assert torch.equal(out, ref_out) and torch.equal(pre["xq"], ref["xq"]) and torch.equal(pre["xs"], ref["xs"])


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("case", [(32, 8, 128, 2, 300), (9, 3, 64, 3, 100), (8, 8, 256, 1, 50)])
def test_rope_fused(fmt, case):
    assert rope_fused_error(_gen(case[0]), DEV, fmt, *case) is None


@pytest.mark.parametrize("case", [(32, 8, 128, 1, 300), (9, 3, 64, 3, 300), (8, 8, 256, 2, 300), (32, 8, 128, 2, 3000)])
def test_combine_heads_vs_rows(case):
    assert combine_heads_error(_gen(case[0]), DEV, *case) is None


def test_merge_split():
    assert merge_split_error(_gen(), DEV) is None
