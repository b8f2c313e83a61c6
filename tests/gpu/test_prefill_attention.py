"""Prefill attention on the CUDA backend (qtool/kernels/prefill_attention.py: K/V gathered and decoded to float32,
torch's fused float32 SDPA with a bottom-right causal mask; T = 1 stays on attn_partial) against the reference backend's attention
over the same stored codes (tests/prefill_cases.py), through ``CudaBackend.attention``, the method the model's
prefill reaches.

Cases: every KV format (bf16, fp8, nvfp4), contiguous and paged (scrambled block table), GQA ratio 1 (4 heads,
d 64) and 4 (8 query / 2 KV heads, d 128); T = 1, 3, .., 17 for two rows at the same start (after a prefix of
0..22 positions); a 600-token chunk after a 300-token prefix (chunked prefill); rows at different starts and a
row padded at position 0 (the explicit-mask path); and the paged cache as rope_kv_write fills it.
Bound (docs/numerics.md, "Prefill attention"): relative error <= 1e-4 over the output and per query row
(q, K/V and the output rounded to bf16; measured ~3e-3 on CPU).
"""
from __future__ import annotations

import pytest
import torch

from prefill_cases import PrefillCase, rel_err, tf32_allowed

pytestmark = pytest.mark.gpu
DEV = "cuda"
SHAPES = [(4, 4, 64), (8, 2, 128)]


def _check(case: PrefillCase):
    from qtool.kernels import prefill_attention
    from qtool.runtime.backends.cuda import CudaBackend
    be = CudaBackend(DEV)
    pos = case.positions.to(DEV)
    q = case.q.to(DEV)
    assert prefill_attention.applies(q, pos, case.cache) == (pos.shape[1] > 1)
    with torch.inference_mode():                          # as the engine runs it
        got = be.attention(q, case.cache, 0, pos)
    want = case.reference()
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = rel_err(got, want)
    rows = ((got.double().cpu() - want.double()).norm(dim=1) / want.double().norm(dim=1)).max().item()
    assert err < 1e-4 and rows < 1e-4, f"relative error {err:.2e}, worst row {rows:.2e}"


@pytest.mark.parametrize("kv", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
@pytest.mark.parametrize("T", list(range(1, 18, 2)))
def test_prefill_odd_T(kv, paged, shape, T):
    prefix = (7 * T) % 23
    pos = torch.arange(prefix, prefix + T).repeat(2, 1)
    _check(PrefillCase(kv, *shape, paged, pos, DEV, seed=T + 3 * len(kv) + paged))


@pytest.mark.parametrize("kv", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_chunk_after_prefix(kv, paged, shape):
    """Chunked prefill: 600 queries at positions 300..899 over 900 cached positions."""
    _check(PrefillCase(kv, *shape, paged, torch.arange(300, 900)[None], DEV, seed=11 + len(kv)))


@pytest.mark.parametrize("kv", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("rows", ["starts", "padded"])
def test_mixed_rows(kv, paged, rows):
    """Rows at different starts (one attention call per row) and a row whose padding sits at position 0 (explicit
    boolean mask)."""
    if rows == "starts":
        pos = torch.stack([torch.arange(40, 53), torch.arange(0, 13), torch.arange(17, 30)])
    else:
        pos = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [2, 3, 4, 5, 0, 0, 0]])
    _check(PrefillCase(kv, *SHAPES[1], paged, pos, DEV, seed=5 + len(kv)))


@pytest.mark.parametrize("kv", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("B", [1, 3])
def test_cache_written_by_rope_kv_write(kv, B):
    """The paged cache as rope_kv_write fills it (tests/gpu/test_paged.py's Case: scrambled block table, every row
    prefilled over T0 positions) read by CudaBackend's prefill attention, against the reference backend's
    rope_and_store + attention on the same inputs (the two caches differ only at rounding boundaries)."""
    from test_paged import SHAPES as PAGED_SHAPES, Case
    from qtool.kernels import ops
    from qtool.runtime.backends.cuda import CudaBackend
    case = Case(kv, B, *PAGED_SHAPES[0], seed=41 + B + len(kv))
    (q, k, v), (qd, kd, vd) = case.qkv(B * case.T0)
    pos = torch.arange(case.T0).repeat(B, 1)
    ref_out = case.ref.attention(case.ref.rope_and_store(q, k, v, pos, case.rcache, 0), case.rcache, 0, pos)
    cache = case.caches[0]
    with torch.inference_mode():
        qr = ops.rope_and_store(qd, kd, vd, pos.to(DEV), cache, 0, case.cos, case.sin, case.T0)
        out = CudaBackend(DEV).attention(qr, cache, 0, pos.to(DEV))
    assert rel_err(out, ref_out) < 1e-4, f"relative error {rel_err(out, ref_out):.2e}"


@pytest.mark.parametrize("api", ["legacy", "new"])
def test_float32_with_tf32_allowed(api):
    """A process that allowed TF32 (either torch API) still gets attention within the float32 bound (the fused
    kernel computes 3xTF32 whatever the setting; a matmul fallback would run without TF32), and keeps its
    setting."""
    with tf32_allowed(api):
        _check(PrefillCase("fp8", *SHAPES[1], True, torch.arange(300, 900)[None], DEV, seed=23))
