#!/usr/bin/env python3
"""Batch-1 decode benchmark of qtool's CUDA kernels on random weights, against the bandwidth limit and a
PyTorch bf16 torch.compile(mode="reduce-overhead") static-cache decoder, all in one run.

Contract: `python3 scripts/bench_decode.py [--grid quick|full|4bit] [--json out.json]`; `--grid 4bit --q4-compare
--gemv4 --peer ""` is the 4-bit decode comparison (fp8, nvfp4, w4a16-awq, w4a16-gptq rows; the 4-bit rows again on
gemv_h; per-GEMV gemv_h vs gemv_q4 at Llama-3.1-8B shapes). Weights of Llama-3.1-8B /
Qwen3-8B / SmolLM2-135M shape are generated on the GPU directly in the kernels' layouts (random codes, no
checkpoint). One decode step = embed, per layer (rmsnorm + act-quant, qkv GEMV, RoPE + KV write, split attention,
split merge + act-quant, o GEMV, rmsnorm + act-quant, gate_up GEMV, silu*mul + act-quant, down GEMV; "+" = one
fused kernel where the linear takes an mma path, unless --no-fuse), final norm, lm_head (bf16, as ModelOpt exports it), GPU
sampling, position advance: captured once as a CUDA graph, timed over replays with CUDA events (median of 5
blocks of 20 tokens). The KV cache is filled with random codes to the context length. Prints per row: tok/s,
bytes moved per token (weights + KV read), the bandwidth limit (copy bandwidth measured here / bytes), and
the ratio. Numbers are not checked for correctness here (tests/gpu does that). The decode step runs the
kernel sequences CudaBackend runs (ops.norm_linear, ops.attention_o, ops.norm_mlp); --pdl-compare adds rows with
plain launches, --no-fuse rows with every op unfused.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qtool.kernels import ops  # noqa: E402
from qtool.kernels.random_weights import random_linear  # noqa: E402
from qtool.kernels.weights import KLinear  # noqa: E402

SHAPES = {  # hidden, inter, layers, heads, kv heads, head_dim, vocab
    "llama3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256),
    "qwen3-8b": (4096, 12288, 36, 32, 8, 128, 151936),
    "smollm2-135m": (576, 1536, 30, 9, 3, 64, 49152),
}
DEV = "cuda"
FUSE = True   # rmsnorm and silu_mul fused with the next linear's activation quantization (as CudaBackend does)


Q4 = True    # 4-bit layers get their q4-tiled copy (gemv_q4); False: row-major only (gemv_h, the earlier path)


def rand_linear(fmt: str, O: int, K: int) -> KLinear:
    """Random weights of ``fmt`` in the layout CudaBackend holds (fp8: mma-tiled; 4-bit: a q4-tiled copy unless Q4
    is off; see ops.adopt_layout)."""
    kl = _rand_linear(fmt, O, K)
    return ops.adopt_layout(kl) if Q4 or fmt.startswith(("fp8", "bf16")) else kl


def _rand_linear(fmt: str, O: int, K: int) -> KLinear:
    return random_linear(fmt, O, K, device=DEV)


def fill_cache(cache, full_range: bool = False) -> None:
    """Random codes in every KV-cache tensor (bf16: normal; fp8 / nvfp4 bytes: no NaN codes; 0..0x7d, or with
    full_range every byte but the e4m3 NaNs 0x7f / 0xff, negative values and block scales included)."""
    for pair in cache.k + cache.v:
        for t in pair:
            if t is None:
                continue
            if t.dtype == torch.bfloat16:
                t.normal_()
            elif full_range:
                c = torch.randint(0, 256, t.shape, device=DEV, dtype=torch.uint8)
                c[(c & 0x7f) == 0x7f] = 0x7e
                t.copy_(c)
            else:
                t.copy_(torch.randint(0, 0x7e, t.shape, device=DEV, dtype=torch.uint8))


class Decoder:
    def __init__(self, shape, fmt, kv, ctx):
        H, I, NL, HQ, HKV, D, V = SHAPES[shape]
        self.H, self.NL, self.HQ, self.HKV, self.D, self.V = H, NL, HQ, HKV, D, V
        self.layers = [dict(qkv=rand_linear(fmt, (HQ + 2 * HKV) * D, H), o=rand_linear(fmt, H, HQ * D),
                            gu=rand_linear(fmt, 2 * I, H), down=rand_linear(fmt, H, I),
                            n1=torch.rand(H, device=DEV) + 0.5, n2=torch.rand(H, device=DEV) + 0.5)
                       for _ in range(NL)]
        for Ly in self.layers:     # as CudaBackend.prepare: gate|up interleaved where its GEMV applies silu
            if ops.silu_fusable(Ly["gu"], Ly["down"]):
                Ly["gu"] = ops.interleave_gate_up(Ly["gu"])
        self.embed = (torch.randn(V, H, device=DEV) * 0.02).to(torch.bfloat16)
        self.head = rand_linear("bf16", V, H)
        self.norm = torch.rand(H, device=DEV) + 0.5
        L = ctx + 64
        self.cache = ops.KVCache(kv, 1, L, NL, HKV, D, DEV, [0.05] * NL, [0.05] * NL,
                                 o_proj=self.layers[0]["o"] if FUSE else None)
        fill_cache(self.cache)
        cos = torch.randn(L, D // 2, device=DEV)
        self.cos, self.sin = cos.cos(), cos.sin()
        self.ctx = ctx
        kv_tok = sum(t[0, :, 0].numel() * t.element_size() for pair in self.cache.k + self.cache.v for t in pair
                     if t is not None)
        self.weight_bytes = sum(kl.nbytes() for Ly in self.layers for kl in (Ly["qkv"], Ly["o"], Ly["gu"],
                                                                            Ly["down"])) + self.head.nbytes()
        self.kv_bytes = kv_tok * ctx
        self.rng = torch.zeros(1, dtype=torch.int64, device=DEV)

    def step(self, ids, pos):
        x = ops.embed(ids, self.embed)
        res = None
        qn = self.HQ * self.D
        kn = self.HKV * self.D
        for i, Ly in enumerate(self.layers):
            qkv, res = ops.norm_linear(x, Ly["n1"], 1e-5, res, Ly["qkv"], FUSE)
            q = qkv[:, :qn].view(-1, self.HQ, self.D)
            k = qkv[:, qn:qn + kn].view(-1, self.HKV, self.D)
            v = qkv[:, qn + kn:].view(-1, self.HKV, self.D)
            x = ops.attention_o(q, k, v, pos, self.cache, i, self.cos, self.sin, Ly["o"], FUSE)
            x, res = ops.norm_mlp(x, Ly["n2"], 1e-5, res, Ly["gu"], Ly["down"], FUSE)
        h, _ = ops.rmsnorm(x, self.norm, 1e-5, res)
        return ops.linear(h, self.head)


def time_graph(fn_next, n_blocks=5, per_block=20):
    for _ in range(5):
        fn_next()
    torch.cuda.synchronize()
    times = []
    for _ in range(n_blocks):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(per_block):
            fn_next()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / per_block)
    return statistics.median(times)


def _decode_loop(shape, fmt, kv, ctx):
    """(Decoder, DecodeLoop, next): one captured decode step + sampling; next() replays it at position ctx."""
    from qtool.runtime.backends.cuda import DecodeLoop

    class _Be:  # DecodeLoop needs only the rng buffer
        pass
    dec = Decoder(shape, fmt, kv, ctx)
    be = _Be()
    be._rng = dec.rng
    ids = torch.tensor([[1]], device=DEV)
    pos = torch.tensor([[ctx]], device=DEV)
    loop = DecodeLoop(be, dec.step, ids, pos, 0.0, 0, 1.0)

    def nxt():
        loop.pos.fill_(ctx)   # stay at the context length (a tiny memset captured outside the graph)
        loop.graph.replay()
    return dec, loop, nxt


def bench_qtool(shape, fmt, kv, ctx):
    dec, loop, nxt = _decode_loop(shape, fmt, kv, ctx)
    t = time_graph(nxt)
    out = dict(weight_bytes=dec.weight_bytes, kv_bytes=dec.kv_bytes, sec_per_tok=t)
    del loop, dec
    torch.cuda.empty_cache()
    return out


def profile_step(shape="llama3.1-8b", fmt="fp8", kv="bf16", ctx=512, tokens=20):
    """Per-kernel GPU time per token inside the replayed decode graph (torch.profiler / CUPTI), against the
    replay wall time: the difference is launch gaps and idle time between kernels."""
    from torch.profiler import ProfilerActivity, profile
    dec, loop, nxt = _decode_loop(shape, fmt, kv, ctx)
    wall = time_graph(nxt)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(tokens):
            nxt()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = getattr(e, "cuda_time_total", 0.0)
        if us > 0:
            rows.append((us / tokens, e.count / tokens, e.key))
    rows.sort(reverse=True)
    busy = sum(r[0] for r in rows)
    print(f"\nprofile {shape} {fmt} kv={kv} ctx {ctx} ({'PDL' if ops.pdl.available() else 'no PDL'}): "
          f"wall {wall * 1e6:.0f} us/token, kernels {busy:.0f} us/token "
          f"(gaps and overlap {wall * 1e6 - busy:+.0f} us)")
    print("| kernel | launches/token | us/token |")
    print("|---|---|---|")
    for us, cnt, name in rows[:16]:
        print(f"| {name[:70]} | {cnt:.0f} | {us:.1f} |")
    del loop, dec
    torch.cuda.empty_cache()


class TorchPeer(torch.nn.Module):
    """bf16 Llama-style decoder with a static KV cache (module buffers), plain PyTorch ops, greedy argmax."""

    def __init__(self, shape, ctx):
        super().__init__()
        H, I, NL, HQ, HKV, D, V = SHAPES[shape]
        self.dims = (H, I, NL, HQ, HKV, D, V)
        bf = torch.bfloat16
        self.L = L = ctx + 64
        r = lambda *sh: torch.nn.Parameter(torch.randn(*sh, device=DEV, dtype=bf) * 0.02, requires_grad=False)  # noqa: E731
        self.qkv = torch.nn.ParameterList([r((HQ + 2 * HKV) * D, H) for _ in range(NL)])
        self.o = torch.nn.ParameterList([r(H, HQ * D) for _ in range(NL)])
        self.gu = torch.nn.ParameterList([r(2 * I, H) for _ in range(NL)])
        self.down = torch.nn.ParameterList([r(H, I) for _ in range(NL)])
        self.emb, self.head = r(V, H), r(V, H)
        self.register_buffer("norm", torch.ones(H, device=DEV, dtype=bf))
        for i in range(NL):
            self.register_buffer(f"k{i}", torch.randn(1, HKV, L, D, device=DEV, dtype=bf))
            self.register_buffer(f"v{i}", torch.randn(1, HKV, L, D, device=DEV, dtype=bf))
        self.register_buffer("inv", 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=DEV).float() / D)))

    def rms(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.norm

    def forward(self, ids, pos):
        import torch.nn.functional as F
        H, I, NL, HQ, HKV, D, V = self.dims
        x = self.emb[ids[:, 0]]
        fr = pos.float()[:, None] * self.inv
        c, s = fr.cos().to(x.dtype), fr.sin().to(x.dtype)

        def rot(t):
            t1, t2 = t[..., :D // 2], t[..., D // 2:]
            return torch.cat((t1 * c - t2 * s, t2 * c + t1 * s), -1)
        mask = (torch.arange(self.L, device=x.device) <= pos)[None, None, None, :]
        for i in range(NL):
            kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            qkv = F.linear(self.rms(x), self.qkv[i])
            q = rot(qkv[:, :HQ * D].view(1, HQ, 1, D))
            k = rot(qkv[:, HQ * D:(HQ + HKV) * D].view(1, HKV, 1, D))
            v = qkv[:, (HQ + HKV) * D:].view(1, HKV, 1, D)
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
            x = x + F.linear(o.reshape(1, HQ * D), self.o[i])
            gu = F.linear(self.rms(x), self.gu[i])
            x = x + F.linear(F.silu(gu[:, :I]) * gu[:, I:], self.down[i])
        return F.linear(self.rms(x), self.head).float().argmax(-1)


def bench_torch_peer(shape, ctx):
    """The bf16 peer compiled with torch.compile(mode='reduce-overhead') (CUDA graphs)."""
    m = TorchPeer(shape, ctx)
    H, I, NL, HQ, HKV, D, V = m.dims
    cstep = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    ids = torch.tensor([[1]], device=DEV)
    pos = torch.tensor([ctx], device=DEV)
    t0 = time.time()
    with torch.no_grad():
        for _ in range(3):
            cstep(ids, pos)
        torch.cuda.synchronize()
        compile_s = time.time() - t0
        t = time_graph(lambda: cstep(ids, pos))
    wbytes = sum(p.numel() * 2 for n, p in m.named_parameters() if n != "emb")
    kvb = NL * 2 * HKV * m.L * D * 2
    del m, cstep
    torch.cuda.empty_cache()
    return dict(weight_bytes=wbytes, kv_bytes=kvb, sec_per_tok=t, compile_s=compile_s)


def copy_bandwidth():
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(ts)


GRIDS = {
    "one": [("llama3.1-8b", "fp8", "bf16", 512)],   # the acceptance row alone
    "must": [("llama3.1-8b", f, "bf16", 512) for f in ("fp8", "bf16")],
    "quick": [("llama3.1-8b", f, "bf16", 512) for f in ("fp8", "bf16", "fp8-rowwise", "nvfp4", "w4a16-awq")]
             + [("llama3.1-8b", "fp8", kv, 512) for kv in ("fp8", "nvfp4")]
             + [("llama3.1-8b", "fp8", kv, 8192) for kv in ("bf16", "fp8", "nvfp4")]
             + [("smollm2-135m", "bf16", "bf16", 512), ("qwen3-8b", "fp8", "bf16", 512)],
}
GRIDS["4bit"] = [("llama3.1-8b", f, "bf16", 512) for f in ("fp8", "nvfp4", "w4a16-awq", "w4a16-gptq")]
GRIDS["long"] = [("llama3.1-8b", "fp8", kv, c) for c in (8192, 32768) for kv in ("bf16", "fp8", "nvfp4")]  # target 4
GRIDS["full"] = GRIDS["quick"] + [(s, f, kv, c) for s in ("llama3.1-8b", "qwen3-8b") for f in
                                  ("bf16", "nvfp4", "w4a16-awq") for kv in ("bf16", "fp8", "nvfp4")
                                  for c in (512, 8192)]


def _pdl(on: bool):
    """Programmatic dependent launch on (the product's launches) or off (plain launches) inside."""
    return contextlib.nullcontext() if on else ops.pdl.plain_launches()


def graph_time(fn, reps=20):
    """Seconds per call of fn, from a CUDA graph holding `reps` calls (launch gaps included, no Python)."""
    from qtool.runtime.backends.cuda import warm_and_capture
    g, _ = warm_and_capture(lambda: [fn() for _ in range(reps)])
    return time_graph(g.replay, n_blocks=5, per_block=5) / reps


def kernel_table():
    """Per-kernel times at Llama-3.1-8B decode shapes (M = 1): linear paths per format, act quant, attention."""
    print("\n| kernel | shape | us | GB/s |")
    print("|---|---|---|---|")
    x = {k: torch.randn(1, k, device=DEV) for k in (4096, 14336)}
    for fmt in ("bf16", "fp8", "fp8-rowwise", "nvfp4", "w4a16-awq"):
        for O, K in ((6144, 4096), (4096, 14336), (28672, 4096), (128256, 4096)):
            kl = rand_linear(fmt, O, K)
            for name, kw in (("f32", dict(path="f32")), (ops.decode_path(kl, 1), {})):
                if name == "f32" and kl.tiled:
                    continue      # tiled fp8: the f32 reference is the prefill gemm, not a decode path
                t = graph_time(lambda: ops.linear(x[K], kl, **kw))
                print(f"| linear {fmt} {name} | {O}x{K} | {t * 1e6:.1f} | {kl.nbytes() / t / 1e9:.0f} |", flush=True)
            if fmt != "bf16" and O == 6144:
                t = graph_time(lambda: ops.act_quant(x[K], kl, half=True, codes=fmt.startswith("fp8")))
                print(f"| act_quant {fmt} | 1x{K} | {t * 1e6:.1f} | |", flush=True)
            del kl
    for kv in ("bf16", "fp8", "nvfp4"):
        for ctx in (512, 8192):
            cache = ops.KVCache(kv, 1, ctx + 64, 1, 8, 128, DEV, [0.05], [0.05])
            for pair in cache.k + cache.v:
                for t_ in pair:
                    if t_ is not None:
                        t_.copy_(torch.randint(0, 0x7e, t_.shape, device=DEV, dtype=torch.uint8).to(t_.dtype)
                                 if t_.dtype != torch.bfloat16 else torch.randn(t_.shape, device=DEV))
            q = torch.randn(1, 32, 128, device=DEV)
            pos = torch.tensor([[ctx]], device=DEV)
            t = graph_time(lambda: ops.attention(q, pos, cache, 0, 1))
            print(f"| attention kv={kv} | ctx {ctx} | {t * 1e6:.1f} | {cache.nbytes() * ctx / (ctx + 64) / t / 1e9:.0f} |",
                  flush=True)
    h = torch.randn(1, 4096, device=DEV)
    w = torch.rand(4096, device=DEV)
    t = graph_time(lambda: ops.rmsnorm(h, w, 1e-5, h))
    print(f"| rmsnorm+residual | 1x4096 | {t * 1e6:.1f} | |")
    gu = torch.randn(1, 28672, device=DEV)
    t = graph_time(lambda: ops.silu_mul(gu))
    print(f"| silu_mul | 1x14336 | {t * 1e6:.1f} | |", flush=True)


def prefill_table(M: int = 512):
    """Prefill GEMMs (M rows at once) at Llama-3.1-8B shapes: the tensor-core gemm_tc ("tc", the default where it
    applies) against the f32 tiled gemm, in TFLOP/s (2 M O K flops per call; the measured bf16 ceiling of this
    GPU is ~790 TFLOP/s, KINDS.md)."""
    print("\n| GEMM | path | M x O x K | ms | TFLOP/s |")
    print("|---|---|---|---|---|")
    for fmt in ("bf16", "fp8", "fp8-rowwise", "fp8-block", "w4a16-awq", "nvfp4"):
        for O, K in ((4096, 4096), (28672, 4096)):
            kl = rand_linear(fmt, O, K)
            x = torch.randn(M, K, device=DEV)
            for path in dict.fromkeys(("gemm", ops.decode_path(kl, M))):
                t = graph_time(lambda: ops.linear(x, kl, path=path), reps=3)
                print(f"| prefill {fmt} | {path} | {M}x{O}x{K} | {t * 1e3:.2f} | {2 * M * O * K / t / 1e12:.1f} |",
                      flush=True)
            del kl, x
            torch.cuda.empty_cache()


GEMV_PATHS = {   # format -> the decode GEMV paths timed by --gemv ("f32": gemv, "mma4": gemv_mma4p, mma-tiled)
    "bf16": ("f32",),
    "fp8": ("mma4",),
    "fp8-rowwise": ("mma4",),
    "fp8-block": ("mma4",),
}
COLD_BYTES = 180e6   # weight copies cycled per timed shape: 3x the 60 MB L2, so every call reads DRAM as in decode


def _gemv_call(path: str, kl: KLinear, pre: dict, x: torch.Tensor, y: torch.Tensor):
    """One launch of ``path`` on ``kl`` (row-major for f32, mma-tiled for mma4)."""
    if path == "f32":
        return ops.linear(x, kl, path="f32")
    return ops._launch_mma4(pre, kl, y, 1)


def gemv_table():
    """The decode GEMV variants against the bf16 GEMV at Llama-3.1-8B shapes (M = 1, graph-timed, weight GB/s),
    each call on another copy of the weights (COLD_BYTES in all), so the L2 holds none of them. x̂ is quantized
    once outside the timed region (in decode it comes fused with the rmsnorm / silu / attention merge)."""
    import itertools

    rows = []
    shapes = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096))
    x = {k: torch.randn(1, k, device=DEV) for k in (4096, 14336)}
    bf = {}
    for fmt, paths in GEMV_PATHS.items():
        for O, K in shapes:
            first = _rand_linear(fmt, O, K)
            kls = [first] + [_rand_linear(fmt, O, K) for _ in range(max(1, math.ceil(COLD_BYTES / first.nbytes())) - 1)]
            tiled = [ops.adopt_layout(k) for k in kls] if fmt.startswith("fp8") else []
            pre = ops.act_quant(x[K], first, codes=True) if fmt.startswith("fp8") else None
            y = torch.empty(1, O, device=DEV)
            for path in paths:
                it = itertools.cycle(tiled if path == "mma4" else kls)
                t = graph_time(lambda: _gemv_call(path, next(it), pre, x[K], y))
                gbs = first.nbytes() / t / 1e9
                if fmt == "bf16":
                    bf[(O, K)] = gbs
                rows.append((fmt, path, f"{O}x{K}", t * 1e6, gbs, bf.get((O, K))))
            del kls, tiled, first
            torch.cuda.empty_cache()
    print("\n| gemv | path | shape | us | GB/s | bf16 GB/s |")
    print("|---|---|---|---|---|---|")
    for fmt, path, shp, us, gbs, b in rows:
        print(f"| {fmt} | {path} | {shp} | {us:.1f} | {gbs:.0f} | {b:.0f} |" if b else
              f"| {fmt} | {path} | {shp} | {us:.1f} | {gbs:.0f} | |", flush=True)


Q4_FORMATS = ("nvfp4", "w4a16-awq", "w4a16-gptq")
Q4_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))


def gemv4_table():
    """The 4-bit decode GEMVs at Llama-3.1-8B shapes (M = 1, graph-timed, cold weights as gemv_table): gemv_h (f16
    pair math on row-major codes, the path before gemv_q4) against gemv_q4 (tensor cores on the q4-tiled copy), and
    fp8's gemv_mma4p for scale. GB/s counts the bytes one call reads (codes + scales)."""
    import itertools
    x = {k: torch.randn(1, k, device=DEV) for k in (4096, 14336)}
    print("\n| gemv | shape | gemv_h us | gemv_q4 us | speed-up | gemv_q4 GB/s | fp8 gemv_mma4p us |")
    print("|---|---|---|---|---|---|---|")
    for fmt in Q4_FORMATS:
        for O, K in Q4_SHAPES:
            first = ops.adopt_layout(_rand_linear(fmt, O, K))
            nbytes = first.nbytes()
            kls = [first] + [ops.adopt_layout(_rand_linear(fmt, O, K))
                             for _ in range(max(1, math.ceil(COLD_BYTES / nbytes)) - 1)]
            qs = {"half": ops.act_quant(x[K], first, half=True, fp4codes=first.act in (4, 5)),
                  "q4": ops.q4_input(x[K], first)}
            t = {}
            for path in ("half", "q4"):
                it = itertools.cycle(kls)
                pre = dict(qs[path], path=path)
                t[path] = graph_time(lambda: ops.linear(x[K], next(it), pre=pre))
            del kls, first
            f8 = [rand_linear("fp8", O, K) for _ in range(max(1, math.ceil(COLD_BYTES / (O * K))))]
            it8 = itertools.cycle(f8)
            q8 = dict(ops.act_quant(x[K], f8[0], codes=True), path="mma4")
            t8 = graph_time(lambda: ops.linear(x[K], next(it8), pre=q8))
            del f8
            torch.cuda.empty_cache()
            print(f"| {fmt} | {O}x{K} | {t['half'] * 1e6:.1f} | {t['q4'] * 1e6:.1f} | {t['half'] / t['q4']:.2f}x | "
                  f"{nbytes / t['q4'] / 1e9:.0f} | {t8 * 1e6:.1f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", action="store_true", help="print the per-kernel table first")
    ap.add_argument("--gemv", action="store_true", help="only the FP8-vs-bf16 GEMV table, then exit")
    ap.add_argument("--gemv4", action="store_true",
                    help="also the 4-bit GEMV table (gemv_h vs gemv_q4, fp8 for scale) at Llama-3.1-8B shapes")
    ap.add_argument("--q4-compare", action="store_true",
                    help="also time the grid's 4-bit rows without the q4-tiled copy (gemv_h, the earlier path)")
    ap.add_argument("--grid", default="quick", choices=sorted(GRIDS))
    ap.add_argument("--peer", default="llama3.1-8b:512", help="shape:ctx list for the torch peer, comma-separated")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="only the per-kernel profile of the Llama-3.1-8B FP8 decode step, with and without PDL")
    ap.add_argument("--pdl-compare", action="store_true",
                    help="also time the Llama-3.1-8B fp8 and bf16 rows with plain launches (no PDL)")
    ap.add_argument("--no-fuse", action="store_true",
                    help="unfused rmsnorm / silu_mul / attention combine + act_quant (for comparison)")
    args = ap.parse_args()
    global FUSE, Q4
    FUSE = not args.no_fuse
    if args.gemv:
        gemv_table()
        return
    if args.profile:
        for pdl_on in (True, False):
            with _pdl(pdl_on):
                try:
                    profile_step()
                except Exception as exc:
                    print(f"FAILED profile: {type(exc).__name__}: {exc}", flush=True)
        return
    bw = copy_bandwidth()
    if args.kernels:
        kernel_table()
        prefill_table()
    if args.gemv4:
        gemv4_table()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s (read+write)", flush=True)
    rows = []
    seen = set()
    for cfg in GRIDS[args.grid]:
        if cfg in seen:
            continue
        seen.add(cfg)
        shape, fmt, kv, ctx = cfg
        try:
            r = bench_qtool(shape, fmt, kv, ctx)
        except Exception as exc:  # keep the rest of the grid
            print(f"FAILED {cfg}: {type(exc).__name__}: {exc}", flush=True)
            continue
        r.update(engine="qtool", shape=shape, fmt=fmt, kv=kv, ctx=ctx)
        rows.append(r)
        _print(r, bw)
    if args.q4_compare:
        Q4 = False
        for cfg in [c for c in GRIDS[args.grid] if c[1] in Q4_FORMATS]:
            _bench_row(rows, bw, cfg, "qtool (gemv_h)")
        Q4 = True
    if args.pdl_compare and ops.pdl.available():
        for cfg in (("llama3.1-8b", "fp8", "bf16", 512), ("llama3.1-8b", "bf16", "bf16", 512)):
            _bench_row(rows, bw, cfg, "qtool (no PDL)", _pdl(False))
    for spec in filter(None, args.peer.split(",")):
        shape, ctx = spec.split(":")
        try:
            r = bench_torch_peer(shape, int(ctx))
        except Exception as exc:
            print(f"FAILED torch peer {spec}: {type(exc).__name__}: {exc}", flush=True)
            continue
        r.update(engine="torch-compile", shape=shape, fmt="bf16", kv="bf16", ctx=int(ctx))
        rows.append(r)
        _print(r, bw)
    print("\n| engine | shape | weights | kv | ctx | tok/s | MB/token | limit tok/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        _print(r, bw, table=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_bw=bw, rows=rows), indent=1))


def _bench_row(rows, bw, cfg, engine, ctx=None):
    """bench_qtool(*cfg) inside the context manager ctx, appended to rows as ``engine`` and printed (a failure is
    printed instead)."""
    try:
        with ctx or contextlib.nullcontext():
            r = bench_qtool(*cfg)
    except Exception as exc:  # keep the rest of the run
        print(f"FAILED {engine} {cfg}: {type(exc).__name__}: {exc}", flush=True)
        return
    r.update(engine=engine, shape=cfg[0], fmt=cfg[1], kv=cfg[2], ctx=cfg[3])
    rows.append(r)
    _print(r, bw)


def _print(r, bw, table=False):
    b = r["weight_bytes"] + r["kv_bytes"]
    tps = 1.0 / r["sec_per_tok"]
    lim = bw / b
    cells = [r["engine"], r["shape"], r["fmt"], r["kv"], str(r["ctx"]), f"{tps:.1f}", f"{b / 1e6:.0f}",
             f"{lim:.0f}", f"{tps / lim:.2f}"]
    print(("| " + " | ".join(cells) + " |") if table else "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
