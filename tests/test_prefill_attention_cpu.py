"""qtool/kernels/prefill_attention.py on CPU tensors (its gather, paging, masks and GQA grouping are device-free):
against the reference backend's attention over the same stored codes, for every KV format, contiguous and
paged, bottom-right causal rows (with and without a prefix), rows with different starts, and padded rows at
position 0 (the explicit-mask path). Bound: relative error <= 1e-4 over the output and per query row (float32
q, K/V and output; docs/numerics.md, "Prefill attention"). The GPU test (tests/gpu/test_prefill_attention.py)
runs such cases through CudaBackend on the device (torch's fused float32 SDPA)."""
from __future__ import annotations

import pytest
import torch

from prefill_cases import PrefillCase, rel_err, tf32_allowed


def _positions(kind: str) -> torch.Tensor:
    if kind == "fresh":                                   # a prompt batch: every row at 0..T-1
        return torch.arange(9).repeat(2, 1)
    if kind == "chunk":                                   # chunked prefill: 21 positions after a 37-token prefix
        return torch.arange(37, 58)[None]
    if kind == "starts":                                  # rows at different starts
        return torch.stack([torch.arange(5, 12), torch.arange(0, 7)])
    if kind == "runs":                                    # the engine's batched prefill: runs of rows sharing a start
        return torch.stack([torch.arange(0, 9), torch.arange(0, 9), torch.arange(13, 22), torch.arange(13, 22),
                            torch.arange(0, 9)])
    # padded: row 1 ends at 4 and its padding sits at position 0 (the engine's dummy slot)
    return torch.tensor([[3, 4, 5, 6, 7, 8], [2, 3, 4, 0, 0, 0]])


@pytest.mark.parametrize("kv", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("kind", ["fresh", "chunk", "starts", "runs", "padded"])
@pytest.mark.parametrize("shape", [(4, 4, 64), (8, 2, 128)], ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_prefill_attention_cpu(kv, paged, kind, shape):
    from qtool.kernels import prefill_attention
    pos = _positions(kind)
    case = PrefillCase(kv, *shape, paged, pos, "cpu", seed=len(kv) + 7 * paged + len(kind))
    assert prefill_attention.applies(case.q, pos, case.cache)
    with torch.inference_mode():                          # as the engine runs it (no version counters)
        got = prefill_attention.attention(case.q, pos, case.cache, 0)
    want = case.reference()
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = rel_err(got, want)
    rows = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
    assert err < 1e-4 and rows < 1e-4, f"relative error {err:.2e}, worst row {rows:.2e}"


def test_one_call_per_run_of_rows_sharing_a_start(monkeypatch):
    """Adjacent rows at the same consecutive positions take one attention call; a row at other positions its own."""
    from qtool.kernels import prefill_attention
    calls = []
    real = prefill_attention._sdpa
    monkeypatch.setattr(prefill_attention, "_sdpa", lambda qb, *a: calls.append(qb.shape[0]) or real(qb, *a))
    pos = _positions("runs")
    case = PrefillCase("bf16", 4, 4, 64, True, pos, "cpu", seed=9)
    with torch.inference_mode():
        got = prefill_attention.attention(case.q, pos, case.cache, 0)
    assert calls == [2, 2, 1] and rel_err(got, case.reference()) < 1e-4


@pytest.mark.parametrize("api", ["legacy", "new"])
def test_float32_even_when_tf32_is_allowed(monkeypatch, api):
    """SDPA runs with TF32 off (float32 FMAs where it falls back to matmuls, the reference's numerics) although the
    process allowed it, through
    either of torch's APIs (the legacy ``allow_tf32``, or ``fp32_precision``, after which reading ``allow_tf32``
    raises), and the process's setting is back afterwards, unmixed."""
    from qtool.kernels import prefill_attention
    m = torch.backends.cuda.matmul
    import torch.nn.functional as F
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: seen.append(m.fp32_precision) or real(*a, **k))
    pos = _positions("fresh")           # is_causal (a CausalBias mask dispatches through the patched function)
    case = PrefillCase("bf16", 8, 2, 64, True, pos, "cpu", seed=2)
    with tf32_allowed(api), torch.inference_mode():
        got = prefill_attention.attention(case.q, pos, case.cache, 0)
        if api == "legacy":
            assert m.allow_tf32 is True and torch.get_float32_matmul_precision() == "high"
    assert seen and set(seen) == {"ieee"}
    assert rel_err(got, case.reference()) < 1e-4


@pytest.mark.parametrize("kind", ["runs", "padded"])
def test_rows_split_by_the_kv_budget(monkeypatch, kind):
    """A run of rows whose repeated float32 K / V would exceed KV_ELEMENTS is decoded and attended in pieces (here of one and
    of two rows), with the reference's result."""
    from qtool.kernels import prefill_attention
    pos = _positions(kind)
    case = PrefillCase("nvfp4", 8, 2, 64, True, pos, "cpu", seed=7)
    shortest = int(pos.max(dim=1).values.min()) + 1       # the shortest run's K / V length
    calls = []
    real = prefill_attention._sdpa
    monkeypatch.setattr(prefill_attention, "_sdpa", lambda qb, *a: calls.append(qb.shape[0]) or real(qb, *a))
    for rows in (1, 2):
        calls.clear()
        monkeypatch.setattr(prefill_attention, "KV_ELEMENTS", rows * 8 * shortest * 64)     # K repeated to 8 heads
        with torch.inference_mode():
            got = prefill_attention.attention(case.q, pos, case.cache, 0)
        assert max(calls) <= rows and sum(calls) == pos.shape[0] and (kind != "runs" or max(calls) == rows)
        assert rel_err(got, case.reference()) < 1e-4, rows


def test_decode_rows_not_taken():
    """One query per row (decode) stays on attn_partial: applies() is False."""
    from qtool.kernels import prefill_attention
    case = PrefillCase("bf16", 4, 4, 64, False, torch.tensor([[5], [3]]), "cpu")
    assert not prefill_attention.applies(case.q, case.positions, case.cache)


def test_cuda_backend_routes_prefill():
    """CudaBackend.attention hands T > 1 rows to prefill_attention (run here on CPU tensors: the route needs no
    kernel launch), with the reference's result."""
    from qtool.runtime.backends.cuda import CudaBackend
    pos = torch.arange(37, 58)[None]
    case = PrefillCase("fp8", 8, 2, 128, True, pos, "cpu", seed=3)
    got = CudaBackend("cpu").attention(case.q, case.cache, 0, pos)
    assert rel_err(got, case.reference()) < 1e-4


def test_positions_read_per_forward():
    """Layer 0 reads the positions again even for the same tensor object changed in place (a new forward); later
    layers reuse that read."""
    from qtool.kernels import prefill_attention
    pos = torch.arange(20, 29)[None].clone()
    case = PrefillCase("bf16", 4, 4, 64, False, torch.arange(20, 29)[None], "cpu", seed=4)
    with torch.inference_mode():
        first = prefill_attention.attention(case.q, pos, case.cache, 0)
        pos.sub_(20)                                      # queries now at 0..8: another result
        again = prefill_attention.attention(case.q, pos, case.cache, 0)
    case.positions = pos
    assert rel_err(again, case.reference()) < 1e-4 and rel_err(first, again) > 0.05
