"""CPU checks of the CUDA backend's host-side choices (qtool/kernels/ops.py, fp8_bulk.py): the bulk GEMV's launch
plan fits the shared-memory layout linear.cu's gemv_mma_bulk computes, fp8 layers are mma-tiled by default and
then take only the paths that read that layout, prefill takes the tensor-core GEMM exactly where its operands are exact or split, and the
fused row kernels' grids cover every element. The kernels themselves run in tests/gpu."""
from __future__ import annotations

import math
import re

import pytest
import torch

from qtool.kernels import fp8_bulk, loader, ops
from qtool.kernels.weights import KLinear

HOPPER, ADA = 232448, 101376   # cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_90 / sm_89


def kernel_smem(M, K, xh, stages):
    """Bytes gemv_mma_bulk addresses (linear.cu): 128 of mbarriers, the ring, x̂ rows of xb * K + 16 bytes
    rounded up to 128, then BULK_WARPS warps x 32 lanes x 16 B of fragments."""
    xb = 2 if xh else 1
    warps = int(re.search(r"#define BULK_WARPS (\d+)", (loader.kernel_dir() / "linear.cu").read_text()).group(1))
    return 128 + stages * 16 * 1024 + math.ceil(M * (xb * K + 16) / 128) * 128 + warps * 32 * 16


@pytest.mark.parametrize("limit", [HOPPER, ADA])
def test_plan_fits_the_kernel_layout(limit):
    for M in range(1, 9):
        for K in (64, 576, 1088, 4096, 14336, 16384):
            p = fp8_bulk.plan(M, K, limit=limit, per_sm=1)
            fits = {xh: (limit - kernel_smem(M, K, xh, 0)) // (16 * 1024) for xh in (0, 1)}
            if p is None:
                assert fits[1] < 4 and fits[0] < 2, (M, K)
                continue
            xh, stages, smem = p
            assert smem == kernel_smem(M, K, xh, stages) <= limit
            assert 2 <= stages <= 16 and stages <= fp8_bulk.DEFAULT_STAGES
            assert xh == (1 if fits[1] >= 4 else 0), (M, K, fits)   # f16 staging whenever it leaves 4 stages
            assert stages == min(fp8_bulk.DEFAULT_STAGES, fits[xh])
    # forced variants and ring sizes
    assert fp8_bulk.plan(1, 4096, stages=12, limit=HOPPER, per_sm=1)[1] == 12
    assert fp8_bulk.plan(8, 14336, xh=1, limit=HOPPER, per_sm=1) is None       # 229 KB of f16 x̂ leaves no ring
    assert fp8_bulk.plan(8, 14336, limit=HOPPER, per_sm=1)[0] == 0
    for per_sm in (2, 3):          # several blocks per SM share its 228 KB (1 KB reserved each)
        for M, K in ((1, 4096), (1, 14336), (4, 4096)):
            xh, stages, smem = fp8_bulk.plan(M, K, limit=HOPPER, per_sm=per_sm)
            assert per_sm * (smem + 1024) <= fp8_bulk.SM_SMEM and smem == kernel_smem(M, K, xh, stages)


def _fp8_linear(O=200, K=640, act=2):
    from qtool.kernels.random_weights import random_linear
    recipe = {1: "fp8", 2: "fp8-rowwise", 3: "fp8-block"}[act]
    return random_linear(recipe, O, K, torch.Generator().manual_seed(O + K), "cpu")


def test_tiled_weights_take_only_tiled_paths(monkeypatch):
    monkeypatch.setattr(fp8_bulk, "smem_limit", lambda: HOPPER)
    monkeypatch.setattr(ops, "_path_ok", lambda name: True)       # as if every self-check passed
    kl = _fp8_linear()
    kt = fp8_bulk.to_tiled(kl)
    assert kt.tiled and not kl.tiled and kt.w.numel() == 208 * 640      # 13 tiles of 16 rows
    assert not kt.gemv_ok and not kt.half_ok and kl.gemv_ok
    assert ops.decode_path(kt, 1) == "mma4" and ops.decode_path(kt, 8) == "mma4"   # gemv_mma4p (default, v13)
    monkeypatch.setattr(fp8_bulk, "enabled", lambda: True)        # QTOOL_BULK=1 on sm_90+
    assert ops.decode_path(kt, 1) == "bulk" and ops.decode_path(kt, 8) == "bulk"
    assert ops.decode_path(kt, 9) == "blas"               # prefill / batched: cuBLASLt on row-major codes (gemm.py)
    x = torch.randn(1, 640)
    for path in ("mma", "half"):
        with pytest.raises(ValueError, match="row-major"):
            ops.linear(x, kt, path=path)
    with pytest.raises(ValueError, match="mma-tiled"):
        fp8_bulk.launch_bulk({}, kl, torch.empty(1, 200), 1)
    # static fp8 without an input scale cannot be quantized to codes: stays off the mma paths
    ks = fp8_bulk.to_tiled(KLinear(1, 64, 128, torch.zeros(64, 128, dtype=torch.uint8), sc=torch.ones(1),
                                   sbo=64, sbi=128, act=1))
    assert ops.decode_path(ks, 1) == "gemm"


def test_fp8_layers_tiled_by_default(monkeypatch):
    """adopt_layout tiles fp8 layers for gemv_mma4p unless QTOOL_TILED=0 (bulk off), leaves other formats row-major,
    and a tiled gate|up layer still takes the silu epilogue (gemv_mma4ps) with its rows interleaved."""
    from dataclasses import replace
    from qtool.kernels.random_weights import random_linear
    monkeypatch.setattr(ops, "_path_ok", lambda name: True)
    g = torch.Generator().manual_seed(9)
    gu = random_linear("fp8", 2 * 192, 512, g, "cpu")
    down = replace(random_linear("fp8", 512, 192, g, "cpu"), in_scale=torch.ones(1))
    assert ops.adopt_layout(gu).tiled and ops.adopt_layout(down).tiled
    assert not ops.adopt_layout(random_linear("w4a16-awq", 64, 256, g, "cpu")).tiled
    kt, dt = ops.adopt_layout(gu), ops.adopt_layout(down)
    assert ops.silu_fusable(kt, dt)
    kil = ops.interleave_gate_up(kt)
    assert kil.tiled and kil.il == 192 and ops.decode_path(kil, 1) == "mma4"
    monkeypatch.setenv("QTOOL_TILED", "0")
    assert not ops.adopt_layout(gu).tiled


def test_row_grids_cover_the_row():
    local = [None, _fp8_linear(act=1), _fp8_linear(act=3)]
    whole = [_fp8_linear(act=2)]
    for n in (176, 576, 4096, 14336):
        for kl in local + whole:
            for per_block in (512, 2048):
                grid, block = ops._row_grid(3, n, kl, "bulk", per_block)
                assert grid[0] == 3
                if any(kl is w for w in whole):       # row-wide amax: one block holds the whole row, 16 elements per thread
                    assert len(grid) == 1 and block[0] * 16 >= n and block[0] % 32 == 0
                else:
                    covered = grid[1] * block[0] * 16
                    assert block[0] * 16 == per_block and covered >= n > covered - per_block
    # the f16 path needs the row's maximum (hs scale): never split
    assert len(ops._row_grid(1, 4096, _fp8_linear(act=1), "half")[0]) == 1


def test_prefill_path_choice(monkeypatch):
    """M > 8: cuBLAS through torch ("blas", gemm.py) for every format whose rows are 8-element aligned (fp8 x fp8
    per-tensor / per-token through _scaled_mm, the rest dequantized to bf16); K % 8 != 0 and fp8 / int4 scale
    blocks off 8 keep the f32 gemm; M <= 8 keeps the GEMV paths (bf16: M = 1 only)."""
    from dataclasses import replace
    from qtool.kernels import gemm
    from qtool.kernels.random_weights import RECIPES, random_linear
    monkeypatch.setattr(ops, "_path_ok", lambda name: True)       # as if every self-check passed
    monkeypatch.setattr(fp8_bulk, "smem_limit", lambda: HOPPER)
    g = torch.Generator().manual_seed(0)
    for recipe in RECIPES:
        kl = random_linear(recipe, 96, 256, g, "cpu")
        assert ops.decode_path(kl, 64) == "blas" and ops.decode_path(kl, 9) == "blas", recipe
        assert (ops.decode_path(kl, 8) == "blas") == (recipe == "bf16"), recipe     # bf16: cuBLAS from 2 rows
        assert ops.decode_path(kl, 1) != "blas", recipe
        assert gemm._scaled_ok(kl) == (recipe in ("fp8", "fp8-rowwise")), recipe
        if kl.fmt == 1:
            assert ops.decode_path(fp8_bulk.to_tiled(kl), 64) == "blas", recipe + " tiled"
    assert ops.decode_path(random_linear("bf16", 96, 260, g, "cpu"), 64) != "blas"   # K % 8 != 0
    odd = random_linear("fp8-block", 96, 256, g, "cpu")
    assert ops.decode_path(replace(odd, sbi=36, sld=8), 64) != "blas"            # scale blocks off 8
    assert not gemm._scaled_ok(random_linear("fp8", 90, 256, g, "cpu"))          # O % 16 != 0: dequant + bf16
    assert ops.decode_path(random_linear("fp8", 96, 256, g, "cpu"), 1) == "mma4"


def test_l2_warming_spec_and_ranges():
    """QTOOL_L2PF parsing (parts, fractions, mode, off) and the prefetch ranges: the first fraction of every row,
    rounded down to 128-byte lines, or the whole tensor as one range."""
    from qtool.kernels import l2_warm
    assert l2_warm.parse("o:1,gu:0.25") == ({"o": 1.0, "gu": 0.25}, 0, 0)
    assert l2_warm.parse("down:0.5/mode:1/blocks:16") == ({"down": 0.5}, 1, 16)
    assert l2_warm.parse("0") == ({}, 0, 0) and not l2_warm.Warmer("0") and not l2_warm.Warmer("")
    assert l2_warm.Warmer("o:1") and not l2_warm.Warmer(l2_warm.DEFAULT_SPEC)   # opt-in (measured no gain)
    with pytest.raises(ValueError, match="unknown part"):
        l2_warm.parse("qkv:1")
    w = torch.zeros(300, 4096, dtype=torch.uint8)
    assert l2_warm._range(w, 300, 1.0) == (0, 1, 300 * 4096)
    assert l2_warm._range(w, 300, 0.25) == (4096, 300, 1024)
    assert l2_warm._range(w, 300, 0.3) == (4096, 300, 1152)         # 1228.8 bytes -> 9 lines
    kl = _fp8_linear(O=200, K=640)                                   # 13 tiles of 16 rows once mma-tiled
    assert l2_warm._rows(kl) == 200 and l2_warm._rows(fp8_bulk.to_tiled(kl)) == 13
    assert l2_warm._range(fp8_bulk.to_tiled(kl).w, 13, 0.5) == (16 * 640, 13, 5120)   # each tile's first 320 k
    assert l2_warm._range(w, 300, 0.001) == (4096, 300, 128)        # at least one line
    nv = torch.zeros(64, 2048, dtype=torch.uint8)                    # nvfp4 rows: K / 2 bytes
    assert l2_warm._range(nv, 64, 0.5) == (2048, 64, 1024)
