"""CPU check of qtool/kernels/weights.py: every format's repacked kernel layout, decoded here by a test-local
decoder written from linear.cu's header comment, equals the reference decode (qtool.formats.decode_weight via
LinearWeights.dequantize) exactly, including GPTQ act-order (input permutation) and W4A8's FP8 stage."""
from __future__ import annotations

import pytest
import torch

from qtool.kernels.weights import prepare_linear


def kernel_decode(kl) -> torch.Tensor:
    """float32 [O, K] from the kernel layout, in the ORIGINAL input order."""
    O, K = kl.out_features, kl.in_features
    k = torch.arange(K)
    if kl.fmt == 0:
        W = kl.w.float()
    elif kl.fmt == 1:
        s = kl.sc.float().reshape(-1)
        idx = (torch.arange(O)[:, None] // kl.sbo) * kl.sld + (k[None, :] // kl.sbi)
        W = kl.w.view(torch.float8_e4m3fn).float() * s[idx]
    else:
        b = kl.w.to(torch.int64)
        nib = torch.stack([b & 15, b >> 4], -1).reshape(O, K)
        if kl.fmt in (2, 3):
            table = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
            v = table[nib]
            if kl.fmt == 2:
                W = v * (kl.sc.view(torch.float8_e4m3fn).float() * torch.tensor(kl.gs)).repeat_interleave(16, 1)
            else:
                W = v * torch.exp2(kl.sc.float() - 127).repeat_interleave(32, 1)
        else:
            g = k // kl.sbi
            W = (nib.float() - kl.zp[:, g]) * kl.sc[:, g]
            if kl.s2:
                W = (W / kl.s2).clamp(-448, 448).to(torch.float8_e4m3fn).float() * kl.s2
    if kl.perm is not None:
        out = torch.empty_like(W)
        out[:, kl.perm] = W
        W = out
    return W


CASES = [("bf16", "none"), ("fp8", "fp8"), ("fp8-rowwise", "fp8-token"), ("fp8-block", "fp8-block"),
         ("nvfp4", "nvfp4"), ("mxfp4", "none"), ("int4-awq", "none"), ("w4a8-awq", "fp8")]


@pytest.mark.parametrize("fmt,act", CASES)
@pytest.mark.parametrize("o,k", [(256, 512), (200, 384)])
def test_repack_decodes_equal(fmt, act, o, k):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent / "gpu"))
    from test_kernels import _lw
    g = torch.Generator().manual_seed(o + k + len(fmt))
    lw = _lw(fmt, torch.randn(o, k, generator=g) * 0.05, act, g)
    kl = prepare_linear(lw, "cpu")
    assert torch.equal(kernel_decode(kl), lw.dequantize())


@pytest.mark.parametrize("fmt", ["gptq", "gptq-actorder", "autoawq"])
def test_repack_int4_packed(fmt):
    import packers
    lw = packers.random_int4_linear(fmt, torch.Generator().manual_seed(len(fmt)))
    kl = prepare_linear(lw, "cpu")
    assert (kl.perm is not None) == (fmt == "gptq-actorder")
    assert torch.equal(kernel_decode(kl), lw.dequantize())


def test_mma_tile_fp8_layout():
    """ops.mma_tile_fp8 puts byte (o, k) where linear.cu's gemv_mma4p reads it (the offset formula of its header
    comment, evaluated here element by element), with zero padding rows."""
    from qtool.kernels.ops import mma_tile_fp8
    g = torch.Generator().manual_seed(3)
    O, K = 37, 192
    w = torch.randint(0, 256, (O, K), generator=g, dtype=torch.uint8)
    flat = mma_tile_fp8(w).reshape(-1)
    assert flat.numel() == 48 * K
    o = torch.arange(48).view(-1, 1).expand(48, K)
    k = torch.arange(K).view(1, -1).expand(48, K)
    off = ((o // 16 * (K // 64) + k // 64) * 2 + (o % 16) // 8) * 512 + ((o % 8) * 4 + (k % 64) // 16) * 16 + k % 16
    got = flat[off.reshape(-1)].view(48, K)
    assert torch.equal(got[:O], w)
    assert int(got[O:].abs().sum()) == 0


def test_mma_untile_and_tiled_interleave():
    """weights.mma_untile_fp8 inverts mma_tile_fp8 (odd O: padding rows dropped), and interleave_gate_up of an
    mma-tiled gate|up layer is the tiling of the row-major interleave (weights, per-row scales, bias)."""
    from dataclasses import replace
    from qtool.kernels import ops, weights
    from qtool.kernels.weights import KLinear
    g = torch.Generator().manual_seed(5)
    for O, K in ((37, 192), (64, 128)):
        w = torch.randint(0, 256, (O, K), generator=g, dtype=torch.uint8)
        assert torch.equal(weights.mma_untile_fp8(weights.mma_tile_fp8(w), O, K), w)
    I, K = 24, 128
    kl = KLinear(1, 2 * I, K, torch.randint(0, 256, (2 * I, K), generator=g, dtype=torch.uint8),
                 sc=torch.rand(2 * I, generator=g), sbo=1, sbi=K, act=1, bias=torch.randn(2 * I, generator=g),
                 in_scale=torch.ones(1))
    plain = ops.interleave_gate_up(kl)
    tiled = ops.interleave_gate_up(replace(kl, w=weights.mma_tile_fp8(kl.w), tiled=True))
    assert tiled.tiled and tiled.il == plain.il == I
    assert torch.equal(tiled.w, weights.mma_tile_fp8(plain.w))
    assert torch.equal(tiled.sc, plain.sc) and torch.equal(tiled.bias, plain.bias)
    assert not torch.equal(plain.w, kl.w)     # the interleave moved rows


def test_kernel_only_format_code_is_linear_cu_define():
    """weights.F_FP8T (mma-tiled fp8, a layout no checkpoint has, so not in recipes/formats.toml) is linear.cu's
    #define FMT_FP8T."""
    import re
    from pathlib import Path
    from qtool.kernels import weights
    text = (Path(__file__).resolve().parent.parent / "kernels_cuda" / "linear.cu").read_text(encoding="utf-8")
    assert weights.F_FP8T == int(re.search(r"^#define FMT_FP8T (\d+)\s*$", text, re.M).group(1))
