#!/usr/bin/env python3
"""CPU emulation of bench/kernels/gemm_mma_small.cuh's index logic, lane by lane, against a direct matmul.

Contract: ``emulate(w, x, NT, S)`` runs the kernel's loads, mma calls and stores as the .cuh writes them, for every
block, warp (K slice) and lane, with the weights in qtool's mma-tiled layout (qtool.kernels.weights.mma_tile_fp8)
and the PTX fragment layout of mma.sync m16n8k32 for 8-bit operands (lane = 4 g + t: a0 = A[g][4t..4t+3], a1 =
A[g+8][4t..], a2 = A[g][16+4t..], a3 = A[g+8][16+4t..]; b0 = B[4t..4t+3][g], b1 = B[16+4t..][g]; c0, c1 = C[g][2t,
2t+1], c2, c3 = C[g+8][2t, 2t+1]); operands are small integers standing for e4m3 values and scales are 1, so the
result must equal w @ x^T exactly. ``python3 bench/gemm_mma_small_emulate.py`` runs the cases of
tests/test_bench_scripts.py and prints them.
"""
from __future__ import annotations

import numpy as np


def _mma(d, lanes_a, lanes_b):
    """D [16, 8] += A [16, 32] B [32, 8] from the 32 lanes' fragments (each a tuple of 4-element arrays)."""
    A = np.zeros((16, 32))
    B = np.zeros((32, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        a0, a1, a2, a3 = lanes_a[lane]
        b0, b1 = lanes_b[lane]
        A[g, 4 * t:4 * t + 4], A[g + 8, 4 * t:4 * t + 4] = a0, a1
        A[g, 16 + 4 * t:20 + 4 * t], A[g + 8, 16 + 4 * t:20 + 4 * t] = a2, a3
        B[4 * t:4 * t + 4, g], B[16 + 4 * t:20 + 4 * t, g] = b0, b1
    return d + A @ B


def emulate(w: np.ndarray, x: np.ndarray, NT: int, S: int) -> np.ndarray:
    """y [M, O] as gemm_mma_small<NT> computes it with S K slices (unit scales, no bias)."""
    import torch
    from qtool.kernels.split import kslices
    from qtool.kernels.weights import mma_tile_fp8
    O, K = w.shape
    M = x.shape[0]
    assert M <= 8 * NT and K % 64 == 0
    U = 4 if NT <= 2 else 2
    wq = mma_tile_fp8(torch.from_numpy(w.astype(np.int16))).numpy().reshape(-1)   # the tiled bytes, as values
    S, kslice = kslices(K, S, 256)
    y = np.full((M, O), np.nan)
    for blk in range(-(-O // 16)):
        r0 = blk * 16
        sums = np.zeros((S, NT, 16, 8))                     # each warp's accumulators, as C tiles
        for warp in range(S):
            k0, k1 = warp * kslice, min(K, (warp + 1) * kslice)
            D = [np.zeros((16, 8)) for _ in range(NT)]
            for kb in range(k0, k1, 64 * U):
                regs = []
                for u in range(U):
                    per_lane = []
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        k = kb + 64 * u + 16 * t
                        inn = k < k1
                        base = (r0 >> 4) * (K >> 6) * 1024 + lane * 16 + (k >> 6) * 1024
                        A = wq[base:base + 16] if (r0 + g < O and inn) else np.zeros(16)
                        B = wq[base + 512:base + 528] if (r0 + g + 8 < O and inn) else np.zeros(16)
                        X = [x[8 * j + g, k:k + 16] if (8 * j + g < M and inn) else np.zeros(16) for j in range(NT)]
                        per_lane.append((A, B, X))
                    regs.append(per_lane)
                for u in range(U):
                    for j in range(NT):
                        for h in (0, 8):            # mma_e4m3(d, A.x, B.x, A.y, B.y, X.x, X.y), then .z/.w
                            la = [(A[h:h + 4], B[h:h + 4], A[h + 4:h + 8], B[h + 4:h + 8]) for A, B, _ in regs[u]]
                            lb = [(X[j][h:h + 4], X[j][h + 4:h + 8]) for _, _, X in regs[u]]
                            D[j] = _mma(D[j], la, lb)
            for j in range(NT):
                sums[warp, j] = D[j]
        for lane in range(32):                    # warp 0's fixed-order sum and store_frag
            g, t = lane >> 2, lane & 3
            ra, rb = r0 + g, r0 + g + 8
            for j in range(NT):
                acc = [sum(sums[s, j][row, col] for s in range(S)) for row, col in
                       ((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))]
                m0, m1 = 8 * j + 2 * t, 8 * j + 2 * t + 1
                for (r, m), v in zip(((ra, m0), (ra, m1), (rb, m0), (rb, m1)), acc):
                    if r < O and m < M:
                        y[m, r] = v
    return y


CASES = [(48, 256, 16, 2, 1), (40, 512, 19, 4, 2), (16, 256, 64, 8, 1), (33, 768, 9, 2, 3)]   # O, K, M, NT, S


def main() -> None:
    rng = np.random.default_rng(0)
    for O, K, M, NT, S in CASES:
        w = rng.integers(-7, 8, size=(O, K)).astype(np.float64)
        x = rng.integers(-7, 8, size=(M, K)).astype(np.float64)
        y = emulate(w, x, NT, S)
        print(f"O {O} K {K} M {M} NT {NT} S {S}: max |y - x w^T| = {np.abs(y - x @ w.T).max()}")


if __name__ == "__main__":
    main()
