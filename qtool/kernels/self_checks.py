"""The fast paths' self-checks: each runs a kernel path once on random data against a reference path and says
whether it may be used.

Contract: ``run(name) -> bool`` for the names ``ops._path_ok`` asks about ("mma4", "inb", "mma", "half", "bulk", "tc",
"silu_quant", "silu_fused", "attn_quant", "merge_split", "combine_heads", "rope_fused"); a False comes with a warning naming what
differed, and ops then takes the next path for the rest of the process. The GPU tests call the same checks
(``merge_split``, ``combine_heads_error``, ``rope_fused_error``) at more shapes. Needs CUDA; imported only when a check runs.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from qtool.kernels import fp8_bulk
from qtool.kernels.ops import (KVCache, _attn_partial, _head_local, _launch_combine, _launch_mma4, _launch_silu_quant,
                               _path_ok, _quant_outputs, act_quant, interleave_gate_up, linear, mma_tile_fp8,
                               rope_and_store, silu_mul, silu_mul_quant)
from qtool.kernels.random_weights import random_linear
from qtool.kernels.weights import KLinear


def run(name: str) -> bool:
    g = torch.Generator(device="cuda").manual_seed(0)
    O, K = 96, 512
    dev = torch.device("cuda")
    if name == "mma4":
        return mma4(g, dev)
    if name == "inb":
        return inb(g, dev)
    if name == "bulk":
        return fp8_bulk.self_check(g, dev)
    if name == "tc":
        return tc(g, dev)
    if name == "silu_quant":
        return silu_quant(g, dev)
    if name == "attn_quant":
        return attn_quant(g, dev)
    if name == "merge_split":
        return merge_split(g, dev)
    if name == "combine_heads":
        for c in ((32, 8, 128, 1, 300), (9, 3, 64, 3, 300), (8, 8, 256, 2, 300), (32, 8, 128, 2, 3000)):
            err = combine_heads_error(g, dev, *c)
            if err:
                warnings.warn(f"qtool CUDA: attn_combine_heads: {err}; attn_combine")
                return False
        return True
    if name == "silu_fused":
        return silu_fused(g, dev)
    if name == "rope_fused":
        for fmt in ("bf16", "fp8", "nvfp4"):
            for c in ((32, 8, 128, 2, 300), (9, 3, 64, 3, 100), (8, 8, 256, 1, 50)):
                err = rope_fused_error(g, dev, fmt, *c)
                if err:
                    warnings.warn(f"qtool CUDA: attention with fused RoPE: {err}; rope_kv_write")
                    return False
        return True
    # "mma": per-row fp8; "half": int4 without a pre-quant scale (weight-only, f16 pair math)
    kl = random_linear("fp8-rowwise" if name == "mma" else "w4a16-awq", O, K, g, dev)
    if name != "mma":
        kl.pqs = None
    x = torch.randn(3, K, generator=g, device=dev)
    a = linear(x, kl, path=name)
    b = linear(x, kl, path="f32")
    err = float((a - b).norm() / b.norm())
    if not err < 5e-3:
        warnings.warn(f"qtool CUDA: fast path {name!r} differs from the f32 path by {err:.2e}; disabled")
        return False
    return True


def mma4(g, dev) -> bool:
    """gemv_mma4 against the f32 path: per-row and 128x128-block scales, odd O, K not a multiple of 256,
    M = 1 and 3, default split and S = 1, a repeated launch (counters reset, bit-identical result), and gemv_mma4p
    on the mma-tiled copy equal to gemv_mma4 bit for bit."""
    for O, K, act, M in ((96, 512, 2, 3), (200, 640, 3, 1), (1000, 4096, 2, 1), (72, 384, 3, 3)):
        kl = random_linear("fp8-block" if act == 3 else "fp8-rowwise", O, K, g, dev, bias=act == 3)
        x = torch.randn(M, K, generator=g, device=dev)
        b = linear(x, kl, path="f32")
        q = act_quant(x, kl, codes=True)
        outs = []
        for S in (None, None, 1):
            y = torch.full((M, O), float("nan"), device=dev)
            _launch_mma4(q, kl, y, M, S)
            outs.append(y)
        for tiled in (False, True):      # S = 3 on row-major and on mma-tiled weights (gemv_mma4p): same bits
            y = torch.full((M, O), float("nan"), device=dev)
            _launch_mma4(q, kl, y, M, 3, 4, mma_tile_fp8(kl.w) if tiled else None)
            outs.append(y)
        err = max(float((a - b).norm() / b.norm()) for a in outs)
        if not (err < 1e-4 and torch.equal(outs[0], outs[1]) and torch.equal(outs[-2], outs[-1])):
            warnings.warn(f"qtool CUDA: fast path 'mma4' differs from the f32 path by {err:.2e} "
                          f"(O={O}, K={K}, act={act}, M={M}); disabled")
            return False
    return True


def inb(g, dev) -> bool:
    """In-block gemv_mma4 (a tile's K slices as the warps of one block) == the one-warp-block ticket launch at the
    same slice count, bit for bit: per-tensor, per-row and 128-block scales, a bias, M = 1 and 3, S = 2, 3, 7, 16."""
    for O, K, recipe, M in ((96, 512, "fp8-rowwise", 3), (200, 640, "fp8-block", 1), (1000, 4096, "fp8", 1),
                            (72, 4096, "fp8-block", 3)):
        kl = random_linear(recipe, O, K, g, dev, bias=True)
        q = act_quant(torch.randn(M, K, generator=g, device=dev), kl, codes=True)
        for S in (2, 3, 7, 16):
            a, b = (torch.full((M, O), float("nan"), device=dev) for _ in range(2))
            _launch_mma4(q, kl, a, M, S, inb=True)
            _launch_mma4(q, kl, b, M, S, inb=False)
            if not torch.equal(a, b):
                warnings.warn(f"qtool CUDA: in-block gemv_mma4 differs from the ticket launch (O={O}, K={K}, "
                              f"{recipe}, M={M}, S={S}); ticket")
                return False
    return True


TC_CHECKS = (("fp8-rowwise", 70, 100, 400), ("fp8-block", 9, 200, 640), ("fp8", 130, 64, 256),
             ("fp8-weight-only", 20, 96, 512), ("bf16", 33, 72, 208), ("w4a16-awq", 17, 64, 256),
             ("nvfp4", 12, 80, 512), ("mxfp4", 40, 64, 256),   # fp4: weight-only (act 0) here
             ("fp8-block", 20, 130, 320), ("bf16", 64, 128, 4096), ("fp8-rowwise", 10, 64, 14336))


def tc(g, dev) -> bool:
    """gemm_tc against the f32 gemm (same weights, same x̂) to 1e-5 (exact fp8 products, split bf16 operands
    otherwise): odd M / O, K % 32 == 16, per-tensor / per-row / 128-block scales, tiled fp8, every weight format."""

    for recipe, M, O, K in TC_CHECKS:
        kl = random_linear(recipe, O, K, g, dev, bias=O % 3 == 0)
        if kl.fmt in (2, 3):
            kl = replace(kl, act=0, in_scale=None)
        x = torch.randn(M, K, generator=g, device=dev)
        for k in ((kl, fp8_bulk.to_tiled(kl)) if kl.fmt == 1 and K % 64 == 0 else (kl,)):
            a, b = linear(x, k, path="tc"), linear(x, k, path="gemm")
            err = float((a - b).norm() / b.norm())
            if not err < 1e-5:
                warnings.warn(f"qtool CUDA: tensor-core GEMM differs from the f32 GEMM by {err:.2e} ({recipe}, "
                              f"M={M}, O={O}, K={K}{', tiled' if k.tiled else ''}); f32 GEMM for prefill")
                return False
    return True


def silu_quant(g, dev) -> bool:
    """silu_mul_quant == silu_mul + act_quant bit for bit (out, e4m3 codes, scales) for per-tensor, per-token
    and per-128-group fp8 activations at I = 14336 and 176, M = 1 and 2."""
    for I, act, M in ((14336, 2, 1), (176, 3, 2), (14336, 1, 1)):
        w = torch.zeros(64, I, dtype=torch.uint8, device=dev)
        kl = KLinear(1, 64, I, w, sc=torch.ones(64, device=dev), sbo=1, sbi=I, act=act,
                     in_scale=torch.full((1,), 0.01, device=dev) if act == 1 else None)
        gu = torch.randn(M, 2 * I, generator=g, device=dev) * 3
        ref_out = silu_mul(gu)
        ref = act_quant(ref_out, kl, codes=True)
        out = torch.full((M, I), float("nan"), device=dev)
        pre = _quant_outputs(kl, M, I, "mma", dev)
        _launch_silu_quant(gu, out, kl, pre, "mma", M, I)
        if not (torch.equal(out, ref_out) and torch.equal(pre["xq"], ref["xq"]) and torch.equal(pre["xs"], ref["xs"])):
            warnings.warn(f"qtool CUDA: silu_mul_quant differs from silu_mul + act_quant (I={I}, act={act}); "
                          "unfused")
            return False
    return True


def silu_fused(g, dev) -> bool:
    """gemv_mma4s == gemv_mma4 + silu_mul_quant bit for bit (e4m3 codes and scale): fp8 per-tensor and per-row
    weight scales, with a bias, M = 1 and 3, one K slice and three (the ticket epilogue)."""
    I, K = 192, 512       # down's K = I must suit its mma path (K % 64 == 0); 12 tiles of 16 rows
    down = replace(random_linear("fp8", 64, I, g, dev), in_scale=torch.full((1,), 0.5, device=dev))  # few saturate
    for recipe in ("fp8", "fp8-rowwise"):
        kl = random_linear(recipe, 2 * I, K, g, dev, bias=True)
        if recipe != "fp8":
            kl = replace(kl, act=1, in_scale=down.in_scale)
        kil = interleave_gate_up(kl)
        for M in (1, 3):
            x = torch.randn(M, K, generator=g, device=dev)
            q = act_quant(x, kl, codes=True)
            for S in (1, 3):
                y = torch.empty(M, 2 * I, device=dev)
                _launch_mma4(q, kl, y, M, S)
                _, ref = silu_mul_quant(y, down, keep_out=False)
                pre = _quant_outputs(down, M, I, "mma4", dev)
                pre["xq"].fill_(0xFF)
                _launch_mma4(q, kil, y, M, S, silu=(down, pre))
                if not (torch.equal(pre["xq"], ref["xq"]) and torch.equal(pre["xs"], ref["xs"])):
                    warnings.warn(f"qtool CUDA: gemv_mma4s differs from gemv_mma4 + silu_mul_quant ({recipe}, M={M}, "
                                  f"S={S}); unfused")
                    return False
    return True


def _random_attention(g, dev, hq: int, hkv: int, d: int, n: int, L: int):
    """(cache, positions, q) for the merge self-checks: one layer of a random bf16 cache of length L, n rows at
    random positions (ragged: some splits empty), random q [n, hq, d]."""
    cache = KVCache("bf16", n, L, 1, hkv, d, dev, [1.0], [1.0])
    for t in (cache.k[0][0], cache.v[0][0]):
        t.copy_(torch.randn(t.shape, generator=g, device=dev))
    pos = torch.randint(0, L, (n, 1), generator=g, device=dev)
    return cache, pos, torch.randn(n, hq, d, generator=g, device=dev)


def rope_fused_error(g, dev, fmt: str, hq: int = 32, hkv: int = 8, d: int = 128, n: int = 1,
                     L: int = 300) -> str | None:
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
    out = _attn_partial(q, pos, caches[1], 0, 1, rope=(k, v, cos, sin))
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
        if not _head_local(kl, "mma", d):
            continue
        res = []
        for heads in (False, True):
            out = torch.full((n, HD), float("nan"), device=dev)
            pre = _quant_outputs(kl, n, HD, "mma", dev) if kl is not None else {}
            _launch_combine(part, ml, out, cache.splits, d, kl, pre, "mma", n, HD, split=False, heads=heads)
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


def merge_split(g, dev, hq: int = 32, hkv: int = 8, d: int = 128, n: int = 1) -> bool:
    """attn_combine with rows over several blocks == one block per row (run 8's verified grid), bit for bit:
    plain merge and fused per-tensor / per-128-group fp8 quantization (out, e4m3 codes, scales)."""
    cache, pos, q = _random_attention(g, dev, hq, hkv, d, n, 300)
    part, ml = _attn_partial(q, pos, cache, 0, 1)
    for act in (None, 1, 3):
        kl = _probe_linear(act, hq * d, dev)
        res = []
        for split in (True, False):
            out = torch.full((n, hq * d), float("nan"), device=dev)
            pre = _quant_outputs(kl, n, hq * d, "mma", dev) if kl is not None else {}
            _launch_combine(part, ml, out, cache.splits, d, kl, pre, "mma", n, hq * d, split=split, heads=False)
            res.append([out] + [pre[k] for k in ("xq", "xs") if k in pre])
        if not all(torch.equal(a, b) for a, b in zip(*res)):
            warnings.warn(f"qtool CUDA: attn_combine over several blocks differs from one block (act={act}); "
                          "one block per row")
            return False
    return True


def attn_quant(g, dev) -> bool:
    """attn_combine with a scheme == attn_combine (scheme 0) + act_quant bit for bit (out, e4m3 codes, scales) for per-tensor,
    per-token and per-128-group fp8 activations, with empty splits (ragged positions)."""
    hq, hkv, d, L = 8, 2, 128, 200
    cache = KVCache("bf16", 2, L, 1, hkv, d, dev, [1.0], [1.0])
    for t in (cache.k[0][0], cache.v[0][0]):
        t.copy_(torch.randn(t.shape, generator=g, device=dev))
    pos = torch.tensor([[37], [150]], device=dev)
    q = torch.randn(2, hq, d, generator=g, device=dev)
    for act in (1, 2, 3):
        kl = _probe_linear(act, hq * d, dev)
        part, ml = _attn_partial(q, pos, cache, 0, 1)
        heads = _head_local(kl, "mma", d) and _path_ok("combine_heads")    # the same merge kernel for both
        ref_out = torch.full((2, hq * d), float("nan"), device=dev)
        _launch_combine(part, ml, ref_out, cache.splits, d, None, {}, "mma", 2, hq * d, heads=heads)
        ref = act_quant(ref_out, kl, codes=True)
        out = torch.full_like(ref_out, float("nan"))
        pre = _quant_outputs(kl, 2, hq * d, "mma", dev)
        _launch_combine(part, ml, out, cache.splits, d, kl, pre, "mma", 2, hq * d, heads=heads)
        if not (torch.equal(out, ref_out) and torch.equal(pre["xq"], ref["xq"]) and torch.equal(pre["xs"], ref["xs"])):
            warnings.warn(f"qtool CUDA: the fused attention merge differs from attn_combine + act_quant (act={act}); "
                          "unfused")
            return False
    return True
