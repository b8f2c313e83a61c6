"""The CPU weight decode used at start-up is bit-identical to the plain torch decode (`weight.float() * scale`).

decode_fp8 folds a per-tensor scale into the 256-entry table, and a per-row scale too where the rows form few runs
of equal scale (a fused q|k|v of per-tensor parts), else multiplies per-row scales in place; the reference is
torch's own fp8 cast followed by the float32 multiply (what the decode was defined as), compared bit for bit, NaN
codes included, with and without a caller's ``out`` buffer. The reference backend decodes every linear into one
buffer: each weight equals that reference, and the tied lm_head is the embedding's float32 table.
"""
from __future__ import annotations

import pytest
import torch

from packers import modelopt_ckpt  # noqa: F401 - fixture (ModelOpt exports of the tiny llama)
from qtool.formats.decode import decode_weight
from qtool.formats.fp8 import decode_fp8, decode_fp8_block, fp8_to_float


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale_shape", ["scalar", "one", "row", "runs", "signed_zero_nan_runs"])
def test_decode_fp8_bit_identical_to_torch(dtype, scale_shape):
    g = torch.Generator().manual_seed(7)
    codes = torch.cat([torch.arange(256, dtype=torch.uint8),
                       torch.randint(0, 256, (96 * 64 - 256,), generator=g, dtype=torch.uint8)]).reshape(96, 64)
    w = codes.view(dtype)
    runs = torch.tensor([0.0123, 3.7e-3, 0.5]).repeat_interleave(torch.tensor([40, 30, 26]))    # fused per-tensor parts
    odd = torch.tensor([0.0, -0.0, float("nan"), 2.0, -0.0, 0.0]).repeat_interleave(16)
    scale = {"scalar": torch.tensor(0.0123), "one": torch.tensor([3.7e-3]),
             "row": torch.rand(96, generator=g) * 0.02 + 1e-4, "runs": runs, "signed_zero_nan_runs": odd}[scale_shape]
    ref = w.float() * (scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1))
    got = decode_fp8(w, scale)
    assert _bits_equal(got, ref)
    assert _bits_equal(decode_weight("fp8", {"weight": w, "weight_scale": scale}), ref)
    out = torch.full((96, 64), 7.0)
    assert decode_weight("fp8", {"weight": w, "weight_scale": scale}, out=out) is out and _bits_equal(out, ref)
    assert _bits_equal(fp8_to_float(w), w.float())
    assert torch.equal(codes.view(dtype).view(torch.uint8), codes)      # the input is not touched


def test_decode_out_buffer_for_every_decoder_and_rejects_wrong_shapes():
    """Formats whose decoder has no ``out`` are decoded and copied into it; a wrong buffer is refused."""
    from qtool.formats.fp4 import encode_nvfp4_weight
    g = torch.Generator().manual_seed(11)
    x = torch.randn(32, 64, generator=g)
    q, sb, s2 = encode_nvfp4_weight(x)
    t = {"weight": q, "weight_scale": sb, "weight_scale_2": s2}
    ref = decode_weight("nvfp4", t)
    out = torch.empty(32, 64)
    assert decode_weight("nvfp4", t, out=out) is out and _bits_equal(out, ref)
    w = torch.randint(0, 256, (32, 64), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    with pytest.raises(ValueError):
        decode_fp8(w, torch.tensor(1.0), out=torch.empty(64, 32))
    with pytest.raises(ValueError):
        decode_fp8(w, torch.tensor(1.0), out=torch.empty(64, 64)[:, :32].t())       # not contiguous


def test_decode_fp8_block_and_bf16_unchanged():
    g = torch.Generator().manual_seed(3)
    w = torch.randint(0, 256, (256, 384), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    s = torch.rand(2, 3, generator=g) + 0.01
    ref = w.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert _bits_equal(decode_fp8_block(w, s), ref)
    b = torch.randn(8, 16, generator=g).to(torch.bfloat16)
    assert _bits_equal(decode_weight("bf16", {"weight": b}), b.float())
    f = torch.randn(4, 4, generator=g)
    assert decode_fp8(f, torch.tensor(2.0)).data_ptr() != f.data_ptr()       # float input: a new tensor


def test_tied_lm_head_shares_the_embedding_table(tmp_path):
    from tiny_models import make_tiny_model
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.loader import load_model_weights
    w = load_model_weights(str(make_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True)), progress=False)
    assert w.lm_head.tensors["weight"] is w.embed
    be = TorchRefBackend()
    be.prepare(w)
    assert be._w[id(w.lm_head)] is be.embed_table
    assert _bits_equal(be.embed_table, w.embed.float())


@pytest.mark.parametrize("case", ["fp8_kvfp8", "fp8_rowwise"])
def test_reference_backend_weights_equal_torch_decode(modelopt_ckpt, case):
    """Every linear the backend holds (ModelOpt's fp8 export: fused q|k|v and gate|up with per-part or per-row
    scales, o, down, the bf16 lm_head) is bit for bit ``weight.float() * scale``, each in its own region of the
    shared buffer."""
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.loader import load_model_weights
    w = load_model_weights(str(modelopt_ckpt(case)), progress=False)
    be = TorchRefBackend()
    be.prepare(w)
    spans = []
    for lw in [w.lm_head] + [x for L in w.layers for x in (L.qkv, L.o, L.gate_up, L.down)]:
        t = lw.tensors
        if lw.format in ("fp8", "fp8-rowwise"):
            s = t["weight_scale"].float()
            ref = t["weight"].float() * (s.reshape(()) if s.numel() == 1 else s.reshape(-1, 1))
        else:
            ref = t["weight"].float()
        got = be._w[id(lw)]
        assert lw.parts is None and _bits_equal(got, ref), lw.note
        spans.append((got.data_ptr(), got.data_ptr() + got.numel() * 4))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))       # no two weights share memory
    assert _bits_equal(be.embed_table, w.embed.float())


def test_e2m1_decode_equals_table_indexing():
    from qtool.formats.fp4 import E2M1_VALUES, e2m1_decode
    g = torch.Generator().manual_seed(5)
    codes = torch.cat([torch.arange(16, dtype=torch.uint8),
                       torch.randint(0, 16, (70000,), generator=g, dtype=torch.uint8)]).reshape(-1, 8)
    ref = torch.tensor(E2M1_VALUES, dtype=torch.float32)[codes.long()]
    assert _bits_equal(e2m1_decode(codes), ref)
