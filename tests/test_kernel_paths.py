"""CPU checks of the CUDA backend's host-side choices (qtool/kernels/ops.py): fp8 layers on the fp8 x fp8 decode
path are mma-tiled and then take only the paths that read that layout, prefill takes the tensor-core GEMM exactly
where its operands are exact or split, the fused row kernels' grids cover every element, and no environment
variable chooses a kernel. The kernels themselves run in tests/gpu."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from qtool.kernels import ops
from qtool.kernels.weights import KLinear, to_tiled


def _fp8_linear(O=200, K=640, act=2):
    from qtool.kernels.random_weights import random_linear
    recipe = {1: "fp8", 2: "fp8-rowwise", 3: "fp8-block"}[act]
    return random_linear(recipe, O, K, torch.Generator().manual_seed(O + K), "cpu")


def test_tiled_weights_take_only_tiled_paths():
    kl = _fp8_linear()
    kt = ops.adopt_layout(kl)
    assert kt.tiled and not kl.tiled and kt.w.numel() == 208 * 640      # 13 tiles of 16 rows
    assert not kt.gemv_ok and not kt.half_ok and kl.gemv_ok
    assert ops.decode_path(kt, 1) == "mma4" and ops.decode_path(kt, 8) == "mma4"   # gemv_mma4p
    assert ops.decode_path(kt, 9) == "blas"               # prefill / batched: cuBLASLt on row-major codes (gemm.py)
    assert ops.decode_path(kl, 1) == "f32"                           # row-major fp8 (not laid out): gemv
    x = torch.randn(1, 640)
    with pytest.raises(ValueError, match="row-major"):
        ops.linear(x, kt, path="half")
    with pytest.raises(ValueError, match="mma-tiled"):
        ops._launch_mma4({}, kl, torch.empty(1, 200), 1)
    # static fp8 without an input scale cannot be quantized to codes: stays off the mma path and row-major
    ks = KLinear(1, 64, 128, torch.zeros(64, 128, dtype=torch.uint8), sc=torch.ones(1), sbo=64, sbi=128, act=1)
    assert not ops.adopt_layout(ks).tiled and ops.decode_path(to_tiled(ks), 1) == "gemm"


def test_fp8_layers_tiled():
    """adopt_layout tiles fp8 layers for gemv_mma4p, leaves other formats row-major, and a tiled gate|up layer
    takes the silu epilogue (gemv_mma4ps) with its rows interleaved."""
    from dataclasses import replace
    from qtool.kernels.random_weights import random_linear
    g = torch.Generator().manual_seed(9)
    gu = random_linear("fp8", 2 * 192, 512, g, "cpu")
    down = replace(random_linear("fp8", 512, 192, g, "cpu"), in_scale=torch.ones(1))
    assert ops.adopt_layout(gu).tiled and ops.adopt_layout(down).tiled
    assert not ops.adopt_layout(random_linear("w4a16-awq", 64, 256, g, "cpu")).tiled
    kt, dt = ops.adopt_layout(gu), ops.adopt_layout(down)
    assert ops.silu_fusable(kt, dt)
    kil = ops.interleave_gate_up(kt)
    assert kil.tiled and kil.il == 192 and ops.decode_path(kil, 1) == "mma4"
    assert not ops.silu_fusable(gu, down)                        # row-major: no mma4 path, no epilogue


def test_row_grids_cover_the_row():
    local = [None, _fp8_linear(act=1), _fp8_linear(act=3)]
    whole = [_fp8_linear(act=2)]
    for n in (176, 576, 4096, 14336):
        for kl in local + whole:
            for per_block in (512, 2048):
                grid, block = ops._row_grid(3, n, kl, "mma4", per_block)
                assert grid[0] == 3
                if any(kl is w for w in whole):       # row-wide amax: one block holds the whole row, 16 elements per thread
                    assert len(grid) == 1 and block[0] * 16 >= n and block[0] % 32 == 0
                else:
                    covered = grid[1] * block[0] * 16
                    assert block[0] * 16 == per_block and covered >= n > covered - per_block
    # the f16 path needs the row's maximum (hs scale): never split
    assert len(ops._row_grid(1, 4096, _fp8_linear(act=1), "half")[0]) == 1


def test_prefill_path_choice():
    """M > 8: cuBLAS through torch ("blas", gemm.py) for every format whose rows are 8-element aligned (fp8 x fp8
    per-tensor / per-token through _scaled_mm, the rest dequantized to bf16); K % 8 != 0 and fp8 / int4 scale
    blocks off 8 keep the f32 gemm; M <= 8 keeps the GEMV paths (bf16: M = 1 only)."""
    from dataclasses import replace
    from qtool.kernels import gemm
    from qtool.kernels.random_weights import RECIPES, random_linear
    g = torch.Generator().manual_seed(0)
    for recipe in RECIPES:
        kl = random_linear(recipe, 96, 256, g, "cpu")
        assert ops.decode_path(kl, 64) == "blas" and ops.decode_path(kl, 9) == "blas", recipe
        assert (ops.decode_path(kl, 8) == "blas") == (recipe == "bf16"), recipe     # bf16: cuBLAS from 2 rows
        assert ops.decode_path(kl, 1) != "blas", recipe
        assert gemm._scaled_ok(kl) == (recipe in ("fp8", "fp8-rowwise")), recipe
        if kl.fmt == 1:
            assert ops.decode_path(to_tiled(kl), 64) == "blas", recipe + " tiled"
    assert ops.decode_path(random_linear("bf16", 96, 260, g, "cpu"), 64) != "blas"   # K % 8 != 0
    odd = random_linear("fp8-block", 96, 256, g, "cpu")
    assert ops.decode_path(replace(odd, sbi=36, sld=8), 64) != "blas"            # scale blocks off 8
    assert not gemm._scaled_ok(random_linear("fp8", 90, 256, g, "cpu"))          # O % 16 != 0: dequant + bf16
    assert ops.decode_path(ops.adopt_layout(random_linear("fp8", 96, 256, g, "cpu")), 1) == "mma4"


def test_no_environment_switch_chooses_a_kernel():
    """The kernel plan reads no environment: no os.environ / getenv in qtool/kernels/, the CUDA backend and the
    model code, and no QTOOL_* name in the kernel sources."""
    root = Path(ops.__file__).resolve().parents[2]
    files = list((root / "qtool" / "kernels").glob("*.py")) + [root / "qtool/runtime/backends/cuda.py"]
    files += list((root / "qtool/runtime/families").glob("*.py")) + [root / "qtool/runtime/model.py"]
    for f in files:
        assert not re.search(r"os\.environ|getenv", f.read_text()), f
    for f in (root / "kernels_cuda").iterdir():
        assert "QTOOL_" not in f.read_text() and "QT_PROBE" not in f.read_text(), f


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4"])
def test_paged_cache_layout(fmt):
    """ops.PagedKVCache: per layer a block pool [num_blocks, Hkv, block_size, ...] in the contiguous cache's
    per-row layout (the kernels' row = (block * Hkv + h) * block_size + slot), an all-zero int32 block table
    [max_batch, max_blocks_per_seq] the kernels read through paging(), and attn_partial_paged's split count."""
    c = ops.PagedKVCache(fmt, 40, 16, 9, 5, 2, 3, 64, "cpu", [1.0, 1.0], [1.0, 1.0])
    plain = ops.KVCache(fmt, 9, 80, 2, 3, 64, "cpu", [1.0, 1.0], [1.0, 1.0])
    k, ks = c.k[1]
    assert k.shape[:3] == (40, 3, 16) and k.shape[3:] == plain.k[1][0].shape[3:]
    assert (ks is None) == (fmt != "nvfp4") and (ks is None or ks.shape == (40, 3, 16, 4))
    assert c.block_tables.shape == (9, 5) and c.block_tables.dtype == torch.int32 and not c.block_tables.any()
    assert c.row_len() == 16 and plain.row_len() == 80
    # attn_partial_paged's splits: ~1024 blocks per launch, at most 64, at most one per 32 positions
    assert ops._paged_splits(1, 8, 4096) == 64 and ops._paged_splits(64, 8, 4096) == 2
    assert ops._paged_splits(33, 8, 2000) == 4 and ops._paged_splits(1, 8, 80) == 3 and ops._paged_splits(512, 8, 9) == 1
    bt, ld, bs = c.paging()
    assert int(bt) == c.block_tables.data_ptr() and int(ld) == 5 and int(bs) == 16
    assert [int(a) for a in plain.paging()] == [0, 0, 0]
    assert c.nbytes() == plain.nbytes() * 40 * 16 // (9 * 80)
    with pytest.raises(ValueError, match="int32"):
        c.block_tables = c.block_tables.long()
        c.paging()
