"""Each CUDA kernel against the reference numerics (qtool.formats / torch_ref) and float64, on the GPU.

Fresh random inputs per case, several shapes incl. odd ones, outputs poisoned (the ops allocate with
torch.empty; the caching allocator hands back the NaN-filled blocks freed just before each run).
Tolerances: docs/numerics.md (1e-2 relative for float outputs; exact for quantize/encode except elements
within an ulp of a rounding boundary). Run by scripts/gpu_tests.sh; skipped without CUDA + CuPy.
"""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu
DEV = "cuda"


def poison():
    """Allocate and free NaN-filled blocks so that the next torch.empty outputs start as NaN."""
    for n in (1 << 12, 1 << 16, 1 << 20, 1 << 22):
        torch.full((n,), float("nan"), device=DEV)
    torch.cuda.synchronize()


def assert_replays_equal(launch, want, times=3):
    """launch(y) captured in a CUDA graph writes want bit for bit at every replay (y NaN-poisoned before each)."""
    y = torch.full_like(want, float("nan"))
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        launch(y)
    for _ in range(times):
        y.fill_(float("nan"))
        gr.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, want)


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------ elementwise
@pytest.mark.parametrize("n,h", [(1, 256), (3, 576), (7, 4096), (5, 100)])
def test_rmsnorm_residual_embed_silu(n, h):
    from qtool.kernels import ops
    g = torch.Generator().manual_seed(n * h)
    x, r = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    w = torch.rand(h, generator=g) + 0.5
    poison()
    y, res = ops.rmsnorm(x.to(DEV), w.to(DEV), 1e-6, r.to(DEV))
    hd = x.double() + r.double()
    ref = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert rel(y, ref) < 1e-5 and rel(res, hd) < 1e-6
    table = torch.randn(50, h, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 50, (n,), generator=g)
    poison()
    assert torch.equal(ops.embed(ids.to(DEV), table.to(DEV)).cpu(), table[ids].float())
    gu = torch.randn(n, 2 * h, generator=g)
    poison()
    out = ops.silu_mul(gu.to(DEV))
    gd = gu.double()
    assert rel(out, torch.nn.functional.silu(gd[:, :h]) * gd[:, h:]) < 1e-6


# ------------------------------------------------------------------ activation quantization (exact)
@pytest.mark.parametrize("scheme", ["fp8", "fp8-dynamic", "fp8-token", "fp8-block", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("m,k", [(1, 256), (4, 576), (9, 1024)])
def test_act_quant_exact(scheme, m, k):
    from qtool.formats import quantize_activation
    from qtool.kernels import ops
    from qtool.kernels.weights import ACT_CODES, KLinear
    g = torch.Generator().manual_seed(m * k + len(scheme))
    x = torch.randn(m, k, generator=g) * 3
    name = "fp8" if scheme == "fp8-dynamic" else scheme
    ins = None if scheme == "fp8-dynamic" else (torch.tensor(0.02) if name == "fp8" else torch.tensor(8 / 2688))
    kl = KLinear(0, 1, k, torch.empty(0), act=ACT_CODES[name],
                 in_scale=None if ins is None or name not in ("fp8", "nvfp4") else ins.reshape(1).to(DEV))
    poison()
    got = ops.act_quant(x.to(DEV), kl)["x"].cpu()
    ref = quantize_activation(name, x, ins if name in ("fp8", "nvfp4") else None)
    mism = int((got != ref).sum())
    assert mism <= max(1, got.numel() // 1000), f"{scheme}: {mism} of {got.numel()} elements differ"


@pytest.mark.parametrize("scheme", ["fp8", "fp8-token", "fp8-block", "nvfp4", "mxfp4", "none"])
@pytest.mark.parametrize("m,k", [(1, 4096), (3, 576), (2, 14336)])
def test_act_quant_fast_outputs(scheme, m, k):
    """The register kernel: x̂ exact; fp8 codes * scales == x̂; f16 copy == x̂ * 2^k in pair order."""
    from qtool.formats import quantize_activation
    from qtool.kernels import ops
    from qtool.kernels.weights import ACT_CODES, KLinear
    g = torch.Generator().manual_seed(m + k + len(scheme))
    x = torch.randn(m, k, generator=g) * 2
    ins = {"fp8": torch.tensor(0.02), "nvfp4": torch.tensor(6 / 2688)}.get(scheme)
    fmt = 1 if scheme.startswith("fp8") else 2
    kl = KLinear(fmt, 1, k, torch.empty(0), act=ACT_CODES[scheme],
                 in_scale=None if ins is None else ins.reshape(1).to(DEV))
    ref = quantize_activation(scheme, x, ins)
    codes = scheme.startswith("fp8")
    poison()
    res = ops.act_quant(x.to(DEV), kl, half=True, codes=codes)
    got = res["x"].cpu()
    assert int((got != ref).sum()) <= max(1, got.numel() // 1000)
    if codes:
        xq = res["xq"].cpu().view(torch.float8_e4m3fn).float()
        xs = res["xs"].cpu()
        if xs.shape[1] > 1:
            xs = xs.repeat_interleave(128, 1)[:, :k]
        assert int((xq * xs != got).sum()) == 0
    hp = 1 if fmt == 1 else 2
    perm = [0, 2, 1, 3] if hp == 1 else [0, 4, 1, 5, 2, 6, 3, 7]
    n = len(perm)
    want = (got * res["hs"].cpu()[:, None].reciprocal()).view(m, k // n, n)[:, :, perm].reshape(m, k).half()
    assert torch.equal(res["xh"].cpu(), want)


# ------------------------------------------------------------------ linear, every format
def _lw(fmt, w, act="none", g=None):
    """LinearWeights of float weight w [O, K] encoded in fmt with qtool.formats' ModelOpt-equivalent encoders."""
    from qtool import formats as F
    from qtool.runtime.weights import LinearWeights
    O, K = w.shape
    t, gs, stage = {}, None, False
    if fmt == "bf16":
        t["weight"] = w.to(torch.bfloat16)
    elif fmt == "fp8":
        t["weight"], t["weight_scale"] = F.encode_fp8(w)
    elif fmt == "fp8-rowwise":
        t["weight"], t["weight_scale"] = F.encode_fp8_rowwise(w)
    elif fmt == "fp8-block":
        t["weight"], t["weight_scale"] = F.encode_fp8_block(w)
    elif fmt == "nvfp4":
        t["weight"], t["weight_scale"], t["weight_scale_2"] = F.encode_nvfp4_weight(w)
    elif fmt == "mxfp4":
        t["weight"], t["weight_scale"] = F.encode_mxfp4_weight(w)
    elif fmt in ("int4-awq", "w4a8-awq"):
        gs = 128 if K % 128 == 0 else 64
        t["weight"], t["weight_scale"] = F.encode_int4_awq(w, gs)
        t["pre_quant_scale"] = torch.rand(K, generator=g) + 0.5
        if fmt == "w4a8-awq":
            from qtool.formats.int4 import decode_int4_awq
            t["weight_scale_2"] = F.w4a8_weight_scale_2(decode_int4_awq(t["weight"], t["weight_scale"]))
            stage = True
        fmt = "int4-awq"
    if act in ("fp8", "nvfp4"):
        t["input_scale"] = torch.tensor(0.03 if act == "fp8" else 10 / 2688)
    return LinearWeights(fmt, act, O, K, t, group_size=gs, fp8_weight_stage=stage,
                         bias=torch.randn(O, generator=g) if O % 3 == 0 else None)


def _ref(lw, x):
    """float64 reference of the linear lw on the (CPU copy of) input x: its activation quantization, the decoded
    weight, the bias."""
    ref = lw.quantize_input(x.cpu()).double() @ lw.dequantize().double().t()
    return ref + lw.bias.double() if lw.bias is not None else ref


def _fp8_case(fmt, act, m, o, k, seed):
    """A random fp8 linear (row-major, as prepared), an input, its float64 reference and the input's codes."""
    from qtool.kernels import ops
    from qtool.kernels.weights import prepare_linear
    g = torch.Generator().manual_seed(seed)
    lw = _lw(fmt, torch.randn(o, k, generator=g) * 0.05, act, g)
    x = torch.randn(m, k, generator=g)
    kl = prepare_linear(lw, DEV)
    return kl, x, _ref(lw, x), ops.act_quant(x.to(DEV), kl, codes=True)


CASES = [("bf16", "none"), ("fp8", "fp8"), ("fp8-rowwise", "fp8-token"), ("fp8-block", "fp8-block"),
         ("nvfp4", "nvfp4"), ("nvfp4", "none"), ("mxfp4", "mxfp4"), ("mxfp4", "none"), ("int4-awq", "none"),
         ("w4a8-awq", "fp8"), ("fp8", "none")]


@pytest.mark.parametrize("fmt,act", CASES)
@pytest.mark.parametrize("m,o,k", [(1, 256, 512), (2, 384, 256), (4, 1000, 768), (8, 96, 1024), (37, 200, 512),
                                   (1, 4096, 4096)])
def test_linear_vs_reference(fmt, act, m, o, k):
    from qtool.kernels import ops
    from qtool.kernels.weights import prepare_linear
    g = torch.Generator().manual_seed(m * 7 + o * 13 + k + len(fmt) + len(act))
    w = torch.randn(o, k, generator=g) * 0.05
    lw = _lw(fmt, w, act, g)
    x = torch.randn(m, k, generator=g)
    ref = _ref(lw, x)
    kl = prepare_linear(lw, DEV)
    for path, tol in _paths(kl, m):
        poison()
        y = ops.linear(x.to(DEV), kl, path=path)
        assert rel(y, ref) < tol, f"{fmt}/{act} {path}: rel {rel(y, ref):.2e}"
    poison()
    y = ops.linear(x.to(DEV), kl)
    assert rel(y, ref) < 5e-3, f"{fmt}/{act} default path: rel {rel(y, ref):.2e}"
    kt = _layouts(kl)[-1]            # mma-tiled fp8 (gemv_mma4p, gemm<5>, gemm_tc<5, 1>)
    if kt.tiled:
        for path in ("f32", None):
            poison()
            y = ops.linear(x.to(DEV), kt, path=path)
            tol = 5e-3 if path is None and ops.decode_path(kt, m) == "blas" else 1e-4   # blas: test_gemm.py
            assert rel(y, ref) < tol, f"{fmt}/{act} tiled {path or ops.decode_path(kt, m)}: rel {rel(y, ref):.2e}"


def _paths(kl, m):
    """Every path that applies to row-major kl, with its bound: f32 paths (gemv, gemm) and gemm_tc (exact fp8
    products or split bf16 operands, f32 sums) ~1e-6; gemv_h with exact fp4 codes likewise; gemv_h on weight-only
    recipes rounds x̂ to f16 and sums 8 terms in f16, ~1e-3, inside numerics.md's 1e-2 per-kernel budget (the
    fp8 x fp8 decode GEMV reads mma-tiled weights: test_linear_vs_reference checks it on _layouts)."""
    from qtool.kernels import ops
    out = [("gemm", 1e-4)]
    if ops._tc_ok(kl):                 # tensor cores: exact fp8 products or split bf16 operands, f32 sums
        out.append(("tc", 1e-4))
    if m <= 8 and kl.gemv_ok:
        out.append(("f32", 1e-4))
    if ops._half_ok(kl, m):
        out.append(("half", 1e-4 if kl.act in (4, 5) else 5e-3))
    return out


def _layouts(kl):
    """[kl in CudaBackend's layout]: mma-tiled where its decode GEMV is gemv_mma4p, with a q4-tiled copy where it
    is gemv_q4 (ops.adopt_layout)."""
    from qtool.kernels import ops
    return [ops.adopt_layout(kl)]


@pytest.mark.parametrize("fmt,act", [("fp8-rowwise", "fp8-token"), ("fp8-block", "fp8-block"), ("fp8", "fp8")])
@pytest.mark.parametrize("m,i", [(1, 14336), (3, 320)])
def test_silu_mul_fused_quant(fmt, act, m, i):
    """silu_mul_quant + linear(pre=...) == silu_mul + linear: silu(g) * u against float64, the down projection
    of it against the float64 reference of the quantized input."""
    from qtool.kernels import ops
    from qtool.kernels.weights import prepare_linear
    g = torch.Generator().manual_seed(m + i + len(fmt))
    lw = _lw(fmt, torch.randn(192, i, generator=g) * 0.05, act, g)
    gu = torch.randn(m, 2 * i, generator=g) * 2
    for kl in _layouts(prepare_linear(lw, DEV)):
        poison()
        out, pre = ops.silu_mul_quant(gu.to(DEV), kl)
        assert pre is not None and pre["path"] == "mma4"
        gd, ud = gu[:, :i].double(), gu[:, i:].double()
        assert rel(out, gd * torch.sigmoid(gd) * ud) < 1e-6
        assert torch.equal(out, ops.silu_mul(gu.to(DEV)))
        y = ops.linear(out, kl, pre=pre)
        ref = _ref(lw, out)
        assert rel(y, ref) < 1e-4, (pre["path"], rel(y, ref))


@pytest.mark.parametrize("fmt,act", [("fp8-rowwise", "fp8-token"), ("fp8-block", "fp8-block"), ("fp8", "fp8")])
@pytest.mark.parametrize("m,o,k", [(1, 1000, 4096), (3, 200, 640), (8, 96, 14336), (1, 28672, 4096), (5, 72, 384),
                                   (2, 1000, 1088)])
def test_mma4_splits(fmt, act, m, o, k):
    """gemv_mma4p (mma-tiled weights) at forced K-slice counts (S = 1 writes y directly; S > 1: the slices are the
    warps of one block, summed through shared memory in a fixed order) and the default split: float64
    reference, every output written (NaN-poisoned), bit-identical repeats, a CUDA-graph replay equal to the eager
    launch; and the tiled prefill GEMM (gemm<5>) bit-identical to the row-major one (gemm<1>)."""
    from qtool.kernels import ops
    kl, x, ref, q = _fp8_case(fmt, act, m, o, k, m * 11 + o + k + len(fmt))
    kt = ops.adopt_layout(kl)
    assert kt.tiled and ops.decode_path(kt, m) == "mma4"
    for S in (1, 2, 3, 7, 16, None):
        outs = []
        for _ in range(2):
            y = torch.full((m, o), float("nan"), device=DEV)
            ops._launch_mma4(q, kt, y, m, S)
            outs.append(y)
        assert rel(outs[0], ref) < 1e-4, f"S={S}: rel {rel(outs[0], ref):.2e}"
        assert torch.equal(outs[0], outs[1]), f"S={S}: repeat differs"
    assert_replays_equal(lambda y: ops._launch_mma4(q, kt, y, m), outs[0])
    assert torch.equal(ops.linear(x.to(DEV), kt, pre=dict(q, path="mma4")), outs[0])
    xg = torch.randn(11, k, device=DEV)
    assert torch.equal(ops.linear(xg, kt, path="gemm"), ops.linear(xg, kl, path="gemm"))


@pytest.mark.parametrize("fmt,act", [("fp8", "fp8"), ("fp8-rowwise", "fp8-token"), ("fp8-block", "fp8-block"),
                                     ("nvfp4", "nvfp4"), ("mxfp4", "mxfp4"), ("int4-awq", "none")])
@pytest.mark.parametrize("m,h", [(1, 4096), (3, 576)])
def test_rmsnorm_fused_quant(fmt, act, m, h):
    """rmsnorm_quant + linear(pre=...) == rmsnorm + linear, and y / residual as the reference."""
    from qtool.kernels import ops
    from qtool.kernels.weights import prepare_linear
    g = torch.Generator().manual_seed(m + h + len(fmt))
    lw = _lw(fmt, torch.randn(256, h, generator=g) * 0.05, act, g)
    x, r = torch.randn(m, h, generator=g), torch.randn(m, h, generator=g)
    w = torch.rand(h, generator=g) + 0.5
    for kl in _layouts(prepare_linear(lw, DEV)):
        poison()
        y, res, pre = ops.rmsnorm_quant(x.to(DEV), w.to(DEV), 1e-6, r.to(DEV), kl)
        assert pre is not None and pre["path"] in ("mma4", "q4", "half")
        hd = x.double() + r.double()
        yref = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        assert rel(y, yref) < 1e-5 and rel(res, hd) < 1e-6
        out = ops.linear(y, kl, pre=pre)
        ref = _ref(lw, y)
        assert rel(out, ref) < (5e-3 if pre["path"] in ("half", "q4") and act == "none" else 1e-4), pre["path"]


@pytest.mark.parametrize("fmt,act", [("fp8", "fp8"), ("fp8-rowwise", "fp8-token"), ("fp8-block", "fp8-block"),
                                     ("nvfp4", "nvfp4"), ("int4-awq", "none")])
@pytest.mark.parametrize("kv,d,hq,hkv", [("bf16", 128, 32, 8), ("fp8", 64, 9, 3), ("nvfp4", 128, 8, 8)])
def test_attention_fused_quant(fmt, act, kv, d, hq, hkv):
    """attention_quant (split merge fused with the o projection's input quantization) == attention followed by
    linear: the merged output bit for bit, and the o projection of it against the float64 reference of the
    quantized input; ragged positions leave some splits empty."""
    from qtool.kernels import ops
    from qtool.kernels.weights import prepare_linear
    g = torch.Generator().manual_seed(d + hq + len(fmt) + len(kv))
    lw = _lw(fmt, torch.randn(160, hq * d, generator=g) * 0.05, act, g)
    B, L = 3, 700
    cache = ops.KVCache(kv, B, L, 1, hkv, d, DEV, [0.05], [0.04])
    for pair in cache.k + cache.v:
        for t in pair:
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype) if t.dtype == torch.bfloat16 else
                        torch.randint(0, 0x7e, t.shape, generator=g, dtype=torch.uint8))
    pos = torch.tensor([[5], [300], [699]], device=DEV)
    q = torch.randn(B, hq, d, generator=g).to(DEV)
    for kl in _layouts(prepare_linear(lw, DEV)):
        poison()
        out, pre = ops.attention_quant(q, pos, cache, 0, 1, kl)
        assert pre is not None and pre["path"] in ("mma4", "q4", "half")
        plain = ops.attention(q, pos, cache, 0, 1)       # attn_combine_heads; quantized: heads where local
        assert torch.equal(out, plain) if ops._head_local(kl, pre["path"], d) else rel(out, plain) < 1e-5
        y = ops.linear(out, kl, pre=pre)
        ref = _ref(lw, out)
        assert rel(y, ref) < (5e-3 if pre["path"] in ("half", "q4") and act == "none" else 1e-4), pre["path"]


@pytest.mark.parametrize("hq,hkv,d,n", [(32, 8, 128, 1), (9, 3, 64, 3), (8, 8, 256, 2), (16, 2, 128, 4)])
def test_merge_split_equals_one_block(hq, hkv, d, n):
    """attn_combine spread over blocks of 512 elements (schemes 0, 1, 3; the grid used when attn_combine_heads is
    off) gives one block's bits, incl. a partial last block (9 x 64 = 576) and several rows."""
    from test_fast_paths import merge_split_error
    assert merge_split_error(torch.Generator(device=DEV).manual_seed(hq + d + n), DEV, hq, hkv, d, n) is None


@pytest.mark.parametrize("hq,hkv,d,n,L", [(32, 8, 128, 1, 300), (9, 3, 64, 3, 300), (8, 8, 256, 2, 300),
                                          (16, 2, 128, 4, 700), (32, 8, 128, 2, 3000), (8, 2, 64, 1, 6000)])
def test_combine_heads(hq, hkv, d, n, L):
    """attn_combine_heads (splits merged in parallel groups, one block per head) against attn_combine's one
    block per row: rows to 1e-5, e4m3 codes except rounding-boundary elements, plain / per-tensor / per-128 fp8,
    1 to 65 splits with empty ones; and against the float64 softmax over the decoded cache; graph replay."""
    from test_fast_paths import combine_heads_error

    from qtool.kernels import ops
    g = torch.Generator(device=DEV).manual_seed(hq + d + n + L)
    assert combine_heads_error(g, DEV, hq, hkv, d, n, L) is None
    cache = ops.KVCache("bf16", n, L, 1, hkv, d, DEV, [1.0], [1.0])
    for t in (cache.k[0][0], cache.v[0][0]):
        t.copy_(torch.randn(t.shape, generator=g, device=DEV))
    pos = torch.randint(0, L, (n, 1), generator=g, device=DEV)
    q = torch.randn(n, hq, d, generator=g, device=DEV)
    part, ml = ops._attn_partial(q, pos, cache, 0, 1)
    want = torch.empty(n, hq * d, device=DEV)
    ops._launch_combine(part, ml, want, cache.splits, d, None, {}, "f32", n, hq * d, heads=True)
    K_, V_ = (t.double().cpu().repeat_interleave(hq // hkv, 1) for t in (cache.k[0][0], cache.v[0][0]))
    for b in range(n):
        p = int(pos[b, 0]) + 1
        sc_ = torch.einsum("hd,hld->hl", q[b].double().cpu(), K_[b, :, :p]) / math.sqrt(d)
        ref = torch.einsum("hl,hld->hd", sc_.softmax(-1), V_[b, :, :p]).reshape(-1)
        assert rel(want[b], ref) < 1e-5
    assert_replays_equal(lambda y: ops._launch_combine(part, ml, y, cache.splits, d, None, {}, "f32", n, hq * d,
                                                       heads=True), want)


@pytest.mark.parametrize("recipe", ["fp8", "fp8-rowwise"])
@pytest.mark.parametrize("m,i,k", [(1, 14336 // 8, 4096), (3, 200 - 8, 512), (8, 1536, 576)])
def test_gate_up_silu_epilogue(recipe, m, i, k):
    """gemv_mma4ps on interleaved gate|up rows (silu * mul + the down projection's fp8 quantization in the GEMV
    epilogue) == gemv_mma4p on the plain rows + silu_mul_quant, bit for bit, eager and graph-replayed; the
    interleaved layer's plain outputs deinterleave to the plain layer's; and down(act) against float64. Weights
    mma-tiled before the interleave, as CudaBackend lays them out."""
    from qtool.kernels import ops
    from qtool.kernels.random_weights import random_linear
    g = torch.Generator(device=DEV).manual_seed(m + i + k + len(recipe))
    down = random_linear("fp8", 256, i, g, DEV)
    down.in_scale = torch.full((1,), 0.5, device=DEV)
    down = ops.adopt_layout(down)
    kl = ops.adopt_layout(random_linear(recipe, 2 * i, k, g, DEV, bias=True))
    assert ops.silu_fusable(kl, down)
    assert not ops.silu_fusable(random_linear("fp8-block", 2 * i, k, g, DEV), down)      # 128-row scale blocks
    assert not ops.silu_fusable(kl, random_linear("fp8-rowwise", 256, i, g, DEV))       # dynamic down input
    kil = ops.interleave_gate_up(kl)
    x = torch.randn(m, k, generator=g, device=DEV)
    poison()
    act, pre = ops.gate_up_silu(x, kil, down)
    gu = ops.linear(x, kl)
    _, ref = ops.silu_mul_quant(gu, down, keep_out=False)
    assert torch.equal(pre["xq"], ref["xq"]) and torch.equal(pre["xs"], ref["xs"])
    assert torch.equal(ops.deinterleave(ops.linear(x, kil), i), gu)
    y = ops.linear(act, down, pre=pre)
    xhat = ref["xq"].view(torch.float8_e4m3fn).double() * ref["xs"].double()
    wd = ops.mma_untile_fp8(down.w, 256, i).view(torch.float8_e4m3fn).double() * down.sc.double()
    assert rel(y, xhat @ wd.t()) < 1e-5
    q = ops.act_quant(x, kil, codes=True)

    def run(out, layer=kil):
        p = ops._quant_outputs(down, m, i, "mma4", DEV)
        ops._launch_mma4(q, layer, out, m, silu=(down, p))
        out.copy_(p["xq"].float())
    assert kil.tiled and ops.decode_path(kil, m) == "mma4"
    assert_replays_equal(run, ref["xq"].float())


def test_pdl_launch_chain_and_graph():
    """Kernels launched with programmatic dependent launch (the default on sm_90+) give the plain launches'
    bits: a chain of dependent kernels (rmsnorm + fused quant -> gemv_mma4p (weights prefetched before the wait)
    -> silu_mul -> a torch op) eager and replayed from a CUDA graph, against the same chain with plain launches."""
    from qtool.kernels import ops
    from qtool.kernels.weights import prepare_linear
    if not ops.pdl.available():
        pytest.skip("no PDL on this GPU")
    g = torch.Generator().manual_seed(7)
    lw = _lw("fp8", torch.randn(4096, 1024, generator=g) * 0.05, "fp8", g)
    x0, w = torch.randn(1, 1024, generator=g).to(DEV), (torch.rand(1024, generator=g) + 0.5).to(DEV)
    from qtool.runtime.backends.cuda import warm_and_capture
    for kl in _layouts(prepare_linear(lw, DEV)):

        def chain():
            x = x0
            for _ in range(6):
                y, _, pre = ops.rmsnorm_quant(x, w, 1e-6, None, kl)
                h = ops.linear(y, kl, pre=pre)          # [1, 4096]
                x = ops.silu_mul(h)[:, :1024].contiguous() * 1.0
            return x

        with ops.pdl.plain_launches():
            assert not ops.pdl.available()
            ref = chain().clone()
        assert torch.equal(chain(), ref)
        gr, out = warm_and_capture(chain)
        for _ in range(3):
            gr.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, ref)


@pytest.mark.parametrize("fmt", ["gptq", "gptq-actorder", "autoawq", "fp8-deepseek"])
def test_linear_packed_formats(fmt):
    """GPTQ / AutoAWQ / DeepSeek-FP8 tensors built by the independent test packers' layouts."""
    import packers
    from qtool.formats import decode_weight
    from qtool.kernels import ops
    from qtool.kernels.weights import prepare_linear
    from qtool.runtime.weights import LinearWeights
    g = torch.Generator().manual_seed(len(fmt))
    O, K = 256, 512
    if fmt == "fp8-deepseek":
        w = torch.randn(O, K, generator=g).clamp(-4, 4).to(torch.float8_e4m3fn)
        t = {"weight": w, "weight_scale_inv": torch.rand(O // 128, K // 128, generator=g) + 0.1}
        lw = LinearWeights("fp8-block", "fp8-block", O, K, t, group_size=None)
    else:
        lw = packers.random_int4_linear(fmt, g, O, K)
    W = decode_weight(lw.format, lw.tensors, lw.group_size).double()
    for m in (1, 3, 20):
        x = torch.randn(m, K, generator=g)
        ref = lw.quantize_input(x).double() @ W.t()
        kl = prepare_linear(lw, DEV)
        for path, tol in _paths(kl, m):
            poison()
            y = ops.linear(x.to(DEV), kl, path=path)
            assert rel(y, ref) < tol, f"{fmt} m={m} {path}: {rel(y, ref):.2e}"


# ------------------------------------------------------------------ rope + KV write + attention
def _decoded(kv, pair, scale, n):
    """Cache codes [B, Hkv, L, ...] -> float [B, n, Hkv, d] via qtool.formats.kv_decode."""
    from qtool.formats import kv_decode
    codes, scales = (t[:, :, :n].permute(0, 2, 1, 3).contiguous().cpu() if t is not None else None for t in pair)
    if kv == "bf16":
        return kv_decode(kv, codes)
    if kv == "fp8":
        return kv_decode(kv, codes.view(torch.float8_e4m3fn), scale=scale)
    return kv_decode(kv, codes, scales.view(torch.float8_e4m3fn), scale=scale)


@pytest.mark.parametrize("kv", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_long_rows_attention(kv, layout):
    """Decode attention over long rows of random codes (every code but NaN, negative values included): a contiguous
    cache of 17000 positions (past ops.LONG_CACHE: attn_partial_paged through the one-block-per-row table) or a
    paged cache with shuffled blocks, rows at positions 9000 and 16900, so splits hold several staged sub-chunks
    merged by the running softmax; against float64 over the decoded cache, and a CUDA graph of the same launch
    replays to the eager bits."""
    from qtool.kernels import ops
    B, hq, hkv, d, L, bs = 2, 32, 8, 128, 17000, 16
    ks, vs = 0.05, 0.04
    g = torch.Generator().manual_seed(len(kv) + len(layout))
    if layout == "contiguous":
        cache = ops.KVCache(kv, B, L, 1, hkv, d, DEV, [ks], [vs])
        assert cache.row_table is not None
    else:
        nb = -(-L // bs)
        cache = ops.PagedKVCache(kv, 1 + B * nb, bs, B, nb, 1, hkv, d, DEV, [ks], [vs])
        cache.block_tables.copy_((1 + torch.randperm(B * nb, generator=g)).view(B, nb).to(torch.int32))
    for pair in cache.k + cache.v:
        for t in pair:
            if t is None:
                continue
            if t.dtype == torch.bfloat16:
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                c = torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8)
                c[(c & 0x7f) == 0x7f] = 0x7e                           # no e4m3 NaN (codes and block scales)
                t.copy_(c)
    q = torch.randn(B, hq, d, generator=g)
    pos = torch.tensor([[9000], [16900]])
    poison()
    out = ops.attention(q.to(DEV), pos.to(DEV), cache, 0, 1).cpu()

    def rows(pair):                      # [B, L, hkv, ...] of the stored tensors, through the block table if paged
        if layout == "contiguous":
            return pair
        ids = cache.block_tables.long()
        return tuple(None if t is None else t[ids].transpose(1, 2).reshape(B, hkv, -1, *t.shape[3:])[:, :, :L]
                     for t in pair)
    K_ = _decoded(kv, rows(cache.k[0]), ks, L).double().repeat_interleave(hq // hkv, 2)
    V_ = _decoded(kv, rows(cache.v[0]), vs, L).double().repeat_interleave(hq // hkv, 2)
    sc_ = torch.einsum("bhd,blhd->bhl", q.double(), K_) / math.sqrt(d)
    sc_ = sc_.masked_fill(torch.arange(L)[None, None, :] > pos[:, :, None], float("-inf"))
    ref = torch.einsum("bhl,blhd->bhd", sc_.softmax(-1), V_).reshape(B, hq * d)
    assert rel(out, ref) < 1e-5, f"{kv} {layout}: rel {rel(out, ref):.2e}"
    from qtool.runtime.backends.cuda import warm_and_capture
    qd, pd = q.to(DEV), pos.to(DEV)          # captured, as `qtool run`'s decode loop runs it: the same bits
    graph, got = warm_and_capture(lambda: ops.attention(qd, pd, cache, 0, 1))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), out), f"{kv} {layout}: the graph replay differs from the eager launch"


def test_cache_over_2gib_per_layer():
    """An fp8 contiguous cache of 72 rows x 32768 positions holds 2.4 GB of K per layer, so rows 64-71 start past
    2^31 bytes (the kernels' 64-bit row offsets): decode attention of rows 0, 64 and 71 (random codes, negatives
    included) against float64 over the decoded cache."""
    from qtool.kernels import ops
    B, hq, hkv, d, L, ks, vs = 72, 32, 8, 128, 32768, 0.05, 0.04
    cache = ops.KVCache("fp8", B, L, 1, hkv, d, DEV, [ks], [vs])
    assert cache.row_table is not None and cache.k[0][0].numel() > 2 ** 31
    g = torch.Generator(device=DEV).manual_seed(5)
    for t in (cache.k[0][0], cache.v[0][0]):
        for b in range(B):               # row by row: no 2.4 GB temporaries
            c = torch.randint(0, 256, t[b].shape, generator=g, dtype=torch.uint8, device=DEV)
            c[(c & 0x7F) == 0x7F] = 0x7E                                  # no e4m3 NaN
            t[b].copy_(c)
    q = torch.randn(B, hq, d, device=DEV)
    pos = (L - 1 - torch.arange(B, device=DEV) * 37).view(B, 1)
    out = ops.attention(q, pos, cache, 0, 1).cpu()
    for b in (0, 64, 71):
        n = int(pos[b]) + 1
        K_ = _decoded("fp8", (cache.k[0][0][b:b + 1], None), ks, n).double().repeat_interleave(hq // hkv, 2)
        V_ = _decoded("fp8", (cache.v[0][0][b:b + 1], None), vs, n).double().repeat_interleave(hq // hkv, 2)
        sc_ = torch.einsum("bhd,blhd->bhl", q[b:b + 1].double().cpu(), K_) / math.sqrt(d)
        ref = torch.einsum("bhl,blhd->bhd", sc_.softmax(-1), V_).reshape(1, hq * d)
        assert rel(out[b:b + 1], ref) < 1e-5, f"row {b}: rel {rel(out[b:b + 1], ref):.2e}"


@pytest.mark.parametrize("fused", [False, True], ids=["rope_kv_write", "rope_fused"])
@pytest.mark.parametrize("kv", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("d,hq,hkv,L", [(64, 4, 2, 300), (128, 32, 8, 300), (64, 9, 3, 300), (128, 32, 8, 2000),
                                        (128, 16, 2, 300), (128, 32, 8, 17000)])
def test_rope_kv_attention(kv, d, hq, hkv, L, fused):
    """RoPE + KV write and attention against float64; L = 2000 gives 64-position chunks (two rounds per warp)
    where L = 300 gives 32 (one); 16 / 2 heads take attn_partial's GM = 8 unroll (the others GM = 4); L = 17000 is
    past ops.LONG_CACHE for every format, so attn_partial_paged runs over the contiguous cache (one block per row;
    positions up to 37 here, long ones in test_long_rows_attention).
    fused: the decode token's RoPE and KV write happen inside the attention kernel (no rope_kv_write), checked the
    same way."""
    from qtool.formats import kv_encode
    from qtool.kernels import ops
    from qtool.runtime import rope
    g = torch.Generator().manual_seed(d + hq + len(kv))
    B, T0 = 2, 37
    inv = rope.inv_freq(d, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cos, sin = rope.cos_sin(inv, torch.arange(L))
    cosd, sind = cos[:, :d // 2].contiguous().to(DEV), sin[:, :d // 2].contiguous().to(DEV)
    ks, vs = 0.05, 0.04
    cache = ops.KVCache(kv, B, L, 1, hkv, d, DEV, [ks], [vs])
    assert (cache.row_table is not None) == (L > ops.LONG_CACHE[kv])
    # prefill T0 tokens per row, then one decode token per row at position T0
    for T, start in ((T0, 0), (1, T0)):
        qkv = torch.randn(B * T, (hq + 2 * hkv) * d, generator=g)
        pos = (torch.arange(T) + start).repeat(B, 1)
        qd = qkv.to(DEV)
        q = qd[:, :hq * d].view(-1, hq, d)
        k = qd[:, hq * d:(hq + hkv) * d].view(-1, hkv, d)
        v = qd[:, (hq + hkv) * d:].view(-1, hkv, d)
        poison()
        c, s = rope.cos_sin(inv, pos.reshape(-1))
        q_ref = rope.apply(qkv[:, :hq * d].view(-1, hq, d), c, s)
        k_ref = rope.apply(qkv[:, hq * d:(hq + hkv) * d].view(-1, hkv, d), c, s)
        in_attn = fused and T == 1
        if in_attn:
            out = ops.attention(q, pos.to(DEV), cache, 0, T, rope=(k, v, cosd, sind))
            qr = q_ref
        else:
            qr = ops.rope_and_store(q, k, v, pos.to(DEV), cache, 0, cosd, sind, T)
            assert rel(qr, q_ref) < 1e-5
        # stored codes equal kv_encode of the reference K (exact up to boundary elements)
        enc = kv_encode(kv, k_ref.view(B, T, hkv, d), ks)
        kc, ksc = cache.k[0]
        got = kc[:, :, start:start + T].permute(0, 2, 1, 3).cpu()
        want = enc[0].view(got.dtype) if enc[0].dtype != got.dtype else enc[0]
        assert (got != want).float().mean() < 2e-3
        if kv == "nvfp4":
            assert (ksc[:, :, start:start + T].permute(0, 2, 1, 3).cpu() != enc[1].view(torch.uint8)).float().mean() < 2e-3
        if not in_attn:
            poison()
            out = ops.attention(qr, pos.to(DEV), cache, 0, T)
        # float64 reference attention over the decoded cache
        K_ = _decoded(kv, cache.k[0], ks, start + T).double()            # [B, L, hkv, d]
        V_ = _decoded(kv, cache.v[0], vs, start + T).double()
        rep = hq // hkv
        K_, V_ = K_.repeat_interleave(rep, 2), V_.repeat_interleave(rep, 2)
        qb = qr.cpu().double().view(B, T, hq, d)
        sc_ = torch.einsum("bthd,blhd->bhtl", qb, K_) / math.sqrt(d)
        vis = torch.arange(start + T)[None, None, :] <= pos[:, :, None]
        sc_ = sc_.masked_fill(~vis[:, None], float("-inf"))
        ref = torch.einsum("bhtl,blhd->bthd", sc_.softmax(-1), V_).reshape(B * T, hq * d)
        assert rel(out, ref) < 1e-5, f"attention rel {rel(out, ref):.2e}"


@pytest.mark.parametrize("kv", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("hq,hkv,d,n,L", [(32, 8, 128, 1, 300), (16, 2, 128, 3, 1000), (9, 3, 64, 4, 77),
                                          (8, 8, 256, 2, 300), (4, 4, 64, 1, 1)])
@pytest.mark.parametrize("early", ["1", "0"], ids=["early", "after_wait"])
def test_rope_fused_matches_unfused(kv, hq, hkv, d, n, L, early):
    """attn_partial with RoPE + KV write fused == rope_kv_write + attn_partial (test_fast_paths.rope_fused_error:
    cache codes, split sums and softmax statistics), odd head counts, several rows, a one-position cache; with its
    pre-wait loads (early) and without."""
    from test_fast_paths import rope_fused_error
    g = torch.Generator(device=DEV).manual_seed(hq * d + n)
    assert rope_fused_error(g, torch.device(DEV), kv, hq, hkv, d, n, L, early=early == "1") is None


# ------------------------------------------------------------------ sampling
def test_sampling():
    from qtool.kernels import ops
    g = torch.Generator().manual_seed(0)
    for V in (384, 49152, 128256):
        logits = torch.randn(3, V, generator=g) * 3
        poison()
        assert torch.equal(ops.sample(logits.to(DEV), 0.0, 0, 1.0).cpu(), logits.argmax(-1))
    V = 50
    logits = torch.randn(1, V, generator=g) * 2
    ld = logits.to(DEV)
    n = 4000
    u = torch.rand(n, generator=g).to(DEV)
    rng = torch.zeros(1, dtype=torch.int64, device=DEV)
    for top_k, top_p in ((0, 1.0), (5, 1.0), (0, 0.7), (10, 0.5)):
        toks = torch.stack([ops.sample(ld, 0.8, top_k, top_p, u=u[i:i + 1]) for i in range(n)]).cpu().reshape(-1)
        p = (logits[0] / 0.8).double().softmax(-1)
        order = p.argsort(descending=True)
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order[:top_k if top_k else V]] = True
        pk = torch.where(keep, p, torch.zeros_like(p))
        pk = pk / pk.sum()
        if top_p < 1.0:
            srt = pk[order]
            cum = srt.cumsum(0)
            n_keep = int((cum < top_p).sum()) + 1
            keep2 = torch.zeros(V, dtype=torch.bool)
            keep2[order[:n_keep]] = True
            pk = torch.where(keep2, pk, torch.zeros_like(pk))
            pk = pk / pk.sum()
        freq = torch.bincount(toks, minlength=V).double() / n
        assert (freq[pk == 0] == 0).all(), f"top_k={top_k} top_p={top_p}: sampled outside the kept set"
        assert (freq - pk).abs().max() < 0.04, f"top_k={top_k} top_p={top_p}: frequencies off"
    # counter-based RNG path: advances per call
    a = [int(ops.sample(ld, 1.0, 0, 1.0, rng=rng)) for _ in range(200)]
    assert len(set(a)) > 5 and int(rng.item()) == 200
