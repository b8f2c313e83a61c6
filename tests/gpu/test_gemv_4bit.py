"""gemv_q4 (kernels_cuda/gemv_4bit.cu: 4-bit decode GEMV on the tensor cores, q4-tiled codes) against float64 of the
reference numerics, for every 4-bit format the CUDA backend decodes: nvfp4 and mxfp4 (with their own activation
quantization and weight-only), ModelOpt int4 AWQ (groups 128 / 64 / 32, pre-quant scale), GPTQ (groups 128 / 64 / 32,
act-order, one scale per row) and AutoAWQ, at Llama-3.1-8B's K (4096, 14336) and SmolLM2-135M's shapes, M = 1..8.

Tolerances (docs/numerics.md): nvfp4 / mxfp4 activations are exact E2M1 values in f16, every product exact, f32 sums:
1e-4. Weight-only recipes round x̂ to f16 (2^-12 relative per element): 2e-3. Quick: each case is one small layer.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
DEV = "cuda"


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def poison():
    for n in (1 << 12, 1 << 16, 1 << 20, 1 << 22):
        torch.full((n,), float("nan"), device=DEV)
    torch.cuda.synchronize()


def _lw(fmt, O, K, act, gs, g):
    """LinearWeights of a random float weight encoded by qtool.formats' ModelOpt-equivalent encoders, or (gptq,
    gptq-actorder, autoawq) random codes in the test packers' layouts."""
    from qtool import formats as F
    from qtool.runtime.weights import LinearWeights
    if fmt in ("gptq", "gptq-actorder", "autoawq"):
        import packers
        return packers.random_int4_linear(fmt, g, O, K, gs)
    w = torch.randn(O, K, generator=g) * 0.05
    t = {}
    if fmt == "nvfp4":
        t["weight"], t["weight_scale"], t["weight_scale_2"] = F.encode_nvfp4_weight(w)
    elif fmt == "mxfp4":
        t["weight"], t["weight_scale"] = F.encode_mxfp4_weight(w)
    else:
        t["weight"], t["weight_scale"] = F.encode_int4_awq(w, gs)
        t["pre_quant_scale"] = torch.rand(K, generator=g) + 0.5
        fmt = "int4-awq"
    if act == "nvfp4":
        t["input_scale"] = torch.tensor(10 / 2688)
    return LinearWeights(fmt, act, O, K, t, group_size=gs if fmt == "int4-awq" else None,
                         bias=torch.randn(O, generator=g) if O % 3 == 0 else None)


def _ref(lw, x):
    from qtool.formats import decode_weight
    W = decode_weight(lw.format, lw.tensors, lw.group_size).double()
    ref = lw.quantize_input(x).double() @ W.t()
    return ref + lw.bias.double() if lw.bias is not None else ref


CASES = [("nvfp4", "nvfp4", None), ("nvfp4", "none", None), ("mxfp4", "mxfp4", None), ("mxfp4", "none", None),
         ("int4-awq", "none", 128), ("int4-awq", "none", 64), ("int4-awq", "none", 32),
         ("gptq", "none", 128), ("gptq", "none", 64), ("gptq", "none", 32), ("gptq-actorder", "none", 128),
         ("autoawq", "none", 128)]
SHAPES = [(1, 512, 4096), (3, 256, 14336), (1, 960, 576), (2, 576, 1536), (8, 3072, 576), (5, 200, 1024)]


@pytest.mark.parametrize("fmt,act,gs", CASES)
@pytest.mark.parametrize("m,o,k", SHAPES)
def test_gemv_q4_vs_float64(fmt, act, gs, m, o, k):
    from qtool.kernels import gemv_4bit, ops
    from qtool.kernels.weights import prepare_linear
    if gs is not None and k % gs:
        pytest.skip("group does not divide K")
    g = torch.Generator().manual_seed(m * 7 + o * 13 + k + len(fmt) + (gs or 0))
    lw = _lw(fmt, o, k, act, gs, g)
    x = torch.randn(m, k, generator=g)
    ref = _ref(lw, x)
    kl = ops.adopt_layout(prepare_linear(lw, DEV))
    assert kl.q4 is not None and gemv_4bit.applies(kl, m), f"{fmt}/{act}/{gs}: no q4 copy"
    assert ops.decode_path(kl, m) == "q4"
    tol = 1e-4 if act in ("nvfp4", "mxfp4") else 2e-3
    poison()
    y = ops.linear(x.to(DEV), kl)
    assert rel(y, ref) < tol, f"{fmt}/{act}/{gs} m={m} {o}x{k}: rel {rel(y, ref):.2e}"
    for S in (1, 3):                               # forced K splits: one warp per tile, several
        poison()
        y2 = torch.empty(m, o, device=DEV)
        xx = x.to(DEV).index_select(1, kl.perm) if kl.perm is not None else x.to(DEV)
        q = ops.q4_input(xx, kl)
        gemv_4bit.launch(q, kl, y2, m, S=S)
        assert rel(y2, ref) < tol, f"{fmt}/{act}/{gs} S={S}: rel {rel(y2, ref):.2e}"


@pytest.mark.parametrize("m,k", [(1, 4096), (3, 576), (2, 14336)])
def test_q4_input_nvfp4_fold(m, k):
    """act_quant's hperm-3 output for gemv_q4 (nvfp4 activations): xh = E2M1 * the e4m3 block scale, hs = g, so
    xh * hs equals x̂ (act_quant's own f32 x̂ = E2M1 * (scale * g), itself tested against qtool.formats) up to
    the order of the two f32 roundings (one ulp)."""
    from qtool.kernels import ops
    from qtool.kernels.weights import ACT_CODES, KLinear
    g = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=g) * 3).to(DEV)
    kl = KLinear(2, 1, k, torch.empty(0), act=ACT_CODES["nvfp4"], in_scale=torch.full((1,), 6 / 2688, device=DEV))
    q = ops.q4_input(x, kl)
    assert "xsc" not in q and torch.equal(q["hs"], torch.full((m,), 6 / 2688, device=DEV))
    perm = [0, 4, 1, 5, 2, 6, 3, 7]
    want = q["x"].view(m, k // 8, 8)[:, :, perm].reshape(m, k)
    got = q["xh"].double() * q["hs"].double()[:, None]
    assert torch.all((got - want.double()).abs() <= want.double().abs() * 2.0 ** -23)


@pytest.mark.parametrize("fmt,act", [("nvfp4", "nvfp4"), ("int4-awq", "none")])
def test_gemv_q4_fused_producer_and_graph(fmt, act):
    """rmsnorm_quant hands gemv_q4 its f16 input (pre['path'] == 'q4'); a CUDA-graph replay gives the same bits."""
    from qtool.kernels import ops
    from qtool.kernels.weights import prepare_linear
    g = torch.Generator().manual_seed(5)
    lw = _lw(fmt, 768, 4096, act, 128, g)
    kl = ops.adopt_layout(prepare_linear(lw, DEV))
    h = torch.randn(1, 4096, device=DEV)
    w = torch.rand(4096, device=DEV) + 0.5
    y0, _, pre = ops.rmsnorm_quant(h, w, 1e-5, None, kl)
    assert pre is not None and pre["path"] == "q4"
    y = ops.linear(y0, kl, pre=pre)
    ref = _ref(lw, y0.cpu())
    tol = 1e-4 if act == "nvfp4" else 2e-3
    assert rel(y, ref) < tol
    want = ops.linear(y0, kl)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        out = ops.linear(y0, kl)
    for _ in range(3):
        out.fill_(float("nan"))
        gr.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
