"""The CPU weight decode used at start-up is bit-identical to the plain torch decode (`weight.float() * scale`).

decode_fp8 folds a per-tensor scale into the 256-entry table and multiplies per-row scales in place; the
reference is torch's own fp8 cast followed by the float32 multiply (what the decode was defined as), compared
bit for bit, NaN codes included. The tied lm_head of the reference backend is the embedding's float32 table.
"""
from __future__ import annotations

import pytest
import torch

from qtool.formats.decode import decode_weight
from qtool.formats.fp8 import decode_fp8, decode_fp8_block, fp8_to_float


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale_shape", ["scalar", "one", "row"])
def test_decode_fp8_bit_identical_to_torch(dtype, scale_shape):
    g = torch.Generator().manual_seed(7)
    codes = torch.cat([torch.arange(256, dtype=torch.uint8),
                       torch.randint(0, 256, (96 * 64 - 256,), generator=g, dtype=torch.uint8)]).reshape(96, 64)
    w = codes.view(dtype)
    scale = {"scalar": torch.tensor(0.0123), "one": torch.tensor([3.7e-3]),
             "row": torch.rand(96, generator=g) * 0.02 + 1e-4}[scale_shape]
    ref = w.float() * (scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1))
    got = decode_fp8(w, scale)
    assert _bits_equal(got, ref)
    assert _bits_equal(decode_weight("fp8", {"weight": w, "weight_scale": scale}), ref)
    assert _bits_equal(fp8_to_float(w), w.float())
    assert torch.equal(codes.view(dtype).view(torch.uint8), codes)      # the input is not touched


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


def test_e2m1_decode_equals_table_indexing():
    from qtool.formats.fp4 import E2M1_VALUES, e2m1_decode
    g = torch.Generator().manual_seed(5)
    codes = torch.cat([torch.arange(16, dtype=torch.uint8),
                       torch.randint(0, 16, (70000,), generator=g, dtype=torch.uint8)]).reshape(-1, 8)
    ref = torch.tensor(E2M1_VALUES, dtype=torch.float32)[codes.long()]
    assert _bits_equal(e2m1_decode(codes), ref)
