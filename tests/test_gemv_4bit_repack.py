"""CPU checks of the 4-bit decode GEMV's weight layout (qtool/kernels/gemv_4bit.py; the kernel runs in
tests/gpu/test_gemv_4bit.py): tile_codes / untile_codes round-trip the row-major codes, and a dot product computed
from the tiled bytes the way gemv_4bit.cu feeds mma.sync m16n8k16 (PTX fragment layout: a0 = row g, k 2t, 2t+1;
a1 = row g+8; a2 = row g, k 2t+8, 2t+9; a3 = row g+8; b0 / b1 the same k of column g), with x in act_quant's f16
pair order, equals the plain product of the unpacked codes. Also the host-side choices: which layers get the q4
copy, the decode path, the K-slice plan."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from qtool.kernels import gemv_4bit, ops
from qtool.kernels.random_weights import random_linear

P8 = [0, 4, 1, 5, 2, 6, 3, 7]


def _codes(O, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (O, K // 2), generator=g, dtype=torch.uint8)


def _unpack(w):
    u = torch.empty(w.shape[0], w.shape[1] * 2, dtype=torch.uint8)
    u[:, 0::2], u[:, 1::2] = w & 15, w >> 4
    return u


E2M1 = [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]


@pytest.mark.parametrize("fp4", [False, True])
@pytest.mark.parametrize("O,K", [(16, 64), (40, 192), (100, 576), (33, 1536)])
def test_tile_round_trip(O, K, fp4):
    w = _codes(O, K, O + K)
    t = gemv_4bit.tile_codes(w, O, K, fp4)
    assert t.dtype == torch.uint8 and t.numel() == math.ceil(O / 16) * 16 * K // 2
    assert torch.equal(gemv_4bit.untile_codes(t, O, K, fp4), w)
    if not fp4:   # nibble words: every code appears once, the padded rows hold zeros
        hist = torch.bincount(torch.cat([t & 15, t >> 4]).long(), minlength=16)
        want = torch.bincount(_unpack(w).reshape(-1).long(), minlength=16)
        want[0] += (math.ceil(O / 16) * 16 - O) * K
        assert torch.equal(hist, want)


def _pairs(word, fp4):
    """The 4 register pairs gemv_4bit.cu decodes from int64 words [...]: [..., 4, 2] values. int4: the codes of
    nibbles (j, j + 4) (int4x8_to_h2 gives them minus the zero point); fp4: e2m1x8_to_h2's bit expressions, read as
    f16 and times 2^14 (so the E2M1 values)."""
    if not fp4:
        return torch.stack([torch.stack([(word >> (4 * j)) & 15, (word >> (4 * j + 16)) & 15], -1).double()
                            for j in range(4)], -2)
    EM, SG, M32 = 0x0E000E00, 0x80008000, 0xFFFFFFFF
    h = [(word << 9) & (EM | SG), (word << 6) & (EM | SG), ((word >> 1) & EM) | ((word << 8) & SG),
         ((word >> 4) & EM) | ((word << 7) & SG)]
    out = []
    for v in h:
        v = v & M32
        halves = torch.stack([v & 0xFFFF, (v >> 16) & 0xFFFF], -1).numpy().astype("uint16")
        out.append(torch.from_numpy(halves.view("float16").astype("float64")) * 2.0 ** 14)
    return torch.stack(out, -2)


def _mma_emulated(t, O, K, x, fp4):
    """y [O] = W x computed from the tiled bytes t as gemv_q4 does: per 16-row tile, round, step and lane, the A
    fragment registers decoded from the lane's words (the kernel's pair expressions), the B fragment from xh's
    8 bytes at 64 r + 16 s + 4 t, multiplied slot by slot as mma.sync defines."""
    T, R = math.ceil(O / 16), K // 64
    xh = x.view(-1, 8)[:, P8].reshape(-1)          # act_quant's pair order: xh[8c + p] = x[8c + P8[p]]
    y = torch.zeros(T * 16, dtype=torch.float64)
    b = t.view(T, R, 32, 4, 4).long()              # tile, round, lane, word, byte
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    for lane in range(32):
        g, tt = lane >> 2, lane & 3
        for s in range(4):
            jp, sub = s >> 1, s & 1
            for row_half in (0, 1):                 # a0 / a2 (row g) from word 2 jp, a1 / a3 (row g + 8) from 2 jp + 1
                p = _pairs(words[:, :, lane, 2 * jp + row_half], fp4)       # [T, R, 4, 2]
                lo_pair, hi_pair = p[:, :, 2 * sub], p[:, :, 2 * sub + 1]   # slots (2t, 2t+1), (2t+8, 2t+9)
                slots = [lo_pair[..., 0], lo_pair[..., 1], hi_pair[..., 0], hi_pair[..., 1]]
                for i, val in enumerate(slots):    # x slot i of this lane: xh position 64 r + 16 s + 4 t + i
                    pos = torch.arange(R) * 64 + 16 * s + 4 * tt + i
                    y[torch.arange(T) * 16 + g + 8 * row_half] += (val * xh[pos].double()).sum(1)
    return y[:O]


@pytest.mark.parametrize("fp4", [False, True])
@pytest.mark.parametrize("O,K", [(16, 64), (40, 192), (24, 576)])
def test_fragment_emulation_matches_codes(O, K, fp4):
    w = _codes(O, K, 3 * O + K)
    x = torch.randn(K, generator=torch.Generator().manual_seed(K), dtype=torch.float64)
    y = _mma_emulated(gemv_4bit.tile_codes(w, O, K, fp4), O, K, x, fp4)
    u = _unpack(w).long()
    W = torch.tensor(E2M1, dtype=torch.float64)[u] if fp4 else u.double()
    assert torch.allclose(y, W @ x, rtol=1e-12, atol=1e-9)


def test_supported_and_paths():
    g = torch.Generator().manual_seed(0)
    for recipe in ("nvfp4", "mxfp4", "w4a16-awq", "w4a16-gptq"):
        kl = ops.adopt_layout(random_linear(recipe, 40, 256, g, "cpu"))
        assert kl.q4 is not None and not kl.tiled, recipe
        assert torch.equal(gemv_4bit.untile_codes(kl.q4, 40, 256, fp4=recipe in ("nvfp4", "mxfp4")), kl.w), recipe
        assert ops.decode_path(kl, 1) == "q4" and ops.decode_path(kl, 8) == "q4", recipe
        assert ops.decode_path(kl, 9) == "blas", recipe                # prefill: row-major codes, gemm.py
        assert ops.decode_path(replace(kl, q4=None), 1) == "half", recipe
    awq = random_linear("w4a16-awq", 40, 256, g, "cpu")
    assert not gemv_4bit.supported(random_linear("w4a8-awq", 40, 256, g, "cpu"))   # FP8 stage, fp8 activations
    assert not gemv_4bit.supported(replace(awq, sbi=16, sld=16))                       # groups under 32
    assert not gemv_4bit.supported(replace(awq, sbi=96, sld=2, in_features=192))      # not a power of two
    assert gemv_4bit.supported(replace(awq, sbi=256, sld=1))                          # one scale per row
    assert not gemv_4bit.supported(random_linear("w4a16-awq", 40, 160, g, "cpu"))     # K % 64
    assert not gemv_4bit.supported(random_linear("fp8", 40, 256, g, "cpu"))
    assert gemv_4bit.kernel_name(awq) == "gemv_q4<4, 8, 0>"
    assert gemv_4bit.kernel_name(random_linear("nvfp4", 40, 256, g, "cpu")) == "gemv_q4<2, 16, 0>"


def test_plan(monkeypatch):
    class Props:
        multi_processor_count = 132
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for O, K in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (960, 576), (576, 1536), (16, 64)):
        S, kslice = gemv_4bit.plan(O, K, "gemv_q4<4, 8, 0>")
        assert 1 <= S <= ops.MMA4_MAX_SLICES and kslice % gemv_4bit.STEP_K == 0
        assert (S - 1) * kslice < K <= S * kslice                    # every slice has work, all of K is covered
