"""bench/quant_variants.py's CPU NVFP4 fake quant and bench/fake_weights.py's round trips (the measurements of
docs/quality.md) against qtool's own format code (qtool/formats), an independent implementation."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import fake_weights  # noqa: E402
import quant_variants  # noqa: E402

from qtool.formats.activations import nvfp4_fake_quant  # noqa: E402
from qtool.formats.fp4 import decode_nvfp4, encode_nvfp4_weight  # noqa: E402


def _x(shape=(48, 96)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[0], 1, generator=g))


def test_cpu_nvfp4_operator_matches_qtool_activation_quantizer():
    x = _x()
    amax = x.abs().amax() * 1.3                       # a calibrated amax larger than this batch's
    got = quant_variants._nvfp4_fake_quant(x, 16, amax, 4, 2, 8, 4)
    want = nvfp4_fake_quant(x, amax / (6.0 * 448.0))
    assert got.shape == x.shape
    assert torch.equal(got, want)
    assert not torch.equal(got, x)


def test_cpu_nvfp4_operator_refuses_other_formats():
    with pytest.raises(NotImplementedError):
        quant_variants._nvfp4_fake_quant(_x(), 32, None, 4, 2, 8, 8)      # MXFP4 (E8M0 scales)


def test_fake_weights_nvfp4_equals_export_decode():
    w = _x()
    packed, scale, scale2 = encode_nvfp4_weight(w)
    assert torch.equal(fake_weights.round_trip(w, "nvfp4", 16), decode_nvfp4(packed, scale, scale2))


def test_fake_weights_int4_and_fp8_step_sizes():
    w = _x()
    q4 = fake_weights.round_trip(w, "int4", 32)
    blocks, qb = w.reshape(48, -1, 32), q4.reshape(48, -1, 32)
    steps = blocks.abs().amax(-1, keepdim=True) / 7.0
    levels = qb / steps
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 7 + 1e-4
    assert ((qb - blocks).abs() <= steps / 2 + 1e-6).all()
    q8 = fake_weights.round_trip(w, "fp8", 0)
    s = w.abs().amax() / 448.0
    assert torch.equal((q8 / s).to(torch.float8_e4m3fn).float() * s, q8)        # already on the E4M3 grid
    assert float(((q8 - w).norm() / w.norm())) < 0.04
