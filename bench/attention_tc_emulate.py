#!/usr/bin/env python3
"""CPU check of bench/kernels/attn_tc.cuh's index logic, before any GPU time: one block of attn_tc_paged emulated
lane by lane (the mma.sync m16n8k16 fragment layout of mma_frag.cuh's header; staged rows with the kernel's padded
stride; its tile and k-step loops, zeroed tail rows, running softmax), in float64 with exact operands, against a
direct softmax attention of the same split. Checks addressing (exact operands, to 1e-12), then the operand
splits' precision (f16 hi + lo or bf16 hi + mid + lo, as split_pair rounds them; to 2e-6).

Contract: ``python3 bench/attention_tc_emulate.py`` prints the relative error per case and exits 1 above 1e-12.
"""
from __future__ import annotations

import sys

import numpy as np

CMAX = 128
LANES = np.arange(32)
G_OF, T_OF = LANES // 4, LANES % 4
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)


def e4m3_value(c: np.ndarray) -> np.ndarray:
    c = c.astype(np.int64)
    e, m, s = (c >> 3) & 15, c & 7, np.where(c & 0x80, -1.0, 1.0)
    v = np.where(e == 0, m / 512.0, (1 + m / 8.0) * np.exp2(e - 7.0))
    return s * v


def bf16(x):
    """x rounded to bfloat16 (nearest even), as float64."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000).astype(np.uint32)
    return u.view(np.float32).astype(np.float64)


def parts(kf: str, x):
    """The value the mma sees for float32 x split as the kernel's split_pair does: f16 hi + lo, or bf16 hi + mid +
    lo (each part rounded to nearest; residuals in float32)."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    if kf == "bf16":
        hi = bf16(x)
        r = (x - hi).astype(np.float32).astype(np.float64)
        mid = bf16(r)
        lo = bf16((r - mid).astype(np.float32))
        return hi + mid + lo
    hi = x.astype(np.float16).astype(np.float64)
    lo = (x - hi).astype(np.float32).astype(np.float16).astype(np.float64)
    return hi + lo


def mma(C, a, b):
    """C [32, 4] += A x B with A given by lane fragments a[lane] = (a0 pair, a1, a2, a3) as [32, 4, 2] and B by
    b[lane] = (b0 pair, b1 pair) as [32, 2, 2] (mma_frag.cuh's layout)."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for ln in range(32):
        g, t = ln // 4, ln % 4
        A[g, 2 * t:2 * t + 2] = a[ln, 0]
        A[g + 8, 2 * t:2 * t + 2] = a[ln, 1]
        A[g, 2 * t + 8:2 * t + 10] = a[ln, 2]
        A[g + 8, 2 * t + 8:2 * t + 10] = a[ln, 3]
        B[2 * t:2 * t + 2, g] = b[ln, 0]
        B[2 * t + 8:2 * t + 10, g] = b[ln, 1]
    Cm = A @ B
    for ln in range(32):
        g, t = ln // 4, ln % 4
        C[ln] += (Cm[g, 2 * t], Cm[g, 2 * t + 1], Cm[g + 8, 2 * t], Cm[g + 8, 2 * t + 1])


def emulate(kf: str, q: np.ndarray, K: dict, V: dict, G: int, c0: int, c1: int, sm_scale: float, kscale: float,
            vscale: float, split: bool = False):
    """One block: q [G, D] float64; K / V: the split's staged rows as the kernel's decode sees them (codes per
    format). Returns (part [G, D] unnormalised, m [G], l [G]) as the kernel writes them."""
    D = q.shape[1]
    KS, DT = D // 16, D // 32
    kse = {"bf16": 1.0, "fp8": kscale, "nvfp4": kscale / 6}[kf]
    vse = {"bf16": 1.0, "fp8": vscale, "nvfp4": vscale / 6}[kf] / 16384.0
    acc = np.zeros((4, 32, DT, 4))                                         # [warp, lane, dtile, 4]
    sm_m, sm_l = np.full(8, -np.inf), np.zeros(8)

    def kval(j, d, which):                                                  # decoded staged element (scale-free)
        rowsrc = K if which == "k" else V
        if j >= rowsrc["np"]:
            return 0.0                                                      # zeroed tail rows
        r = rowsrc["off"] + j                                               # staged row j = position s0 + j
        if kf == "bf16":
            return rowsrc["vals"][r, d]
        if kf == "fp8":
            return e4m3_value(rowsrc["codes"][r, d])
        byte = rowsrc["codes"][r, d // 2]
        nib = (byte >> (4 * (d & 1))) & 15
        v = E2M1[nib & 7] * (-1 if nib & 8 else 1)
        return v * e4m3_value(rowsrc["scales"][r, d // 16])

    # per head: q times 2^e (max near 2^14) and the scores' factor 2^-e * sm_scale * kse (sm_q, sm_qf)
    e = np.array([14 - int(np.floor(np.log2(np.abs(q[h]).max()))) for h in range(G)])
    sm_q = q * np.exp2(e)[:, None]
    sm_qf = np.exp2(-e) * sm_scale * kse
    # the lane's query pairs (head g), as qa0 / qa2
    qf = np.zeros((32, KS, 2, 2))
    for ln in range(32):
        g, t = ln // 4, ln % 4
        h = min(g, G - 1)
        f = 1.0 if g < G else 0.0
        for s in range(KS):
            d = 16 * s + 2 * t
            qf[ln, s, 0] = sm_q[h, d] * f, sm_q[h, d + 1] * f
            qf[ln, s, 1] = sm_q[h, d + 8] * f, sm_q[h, d + 9] * f
    if split:
        qf = parts(kf, qf)
    for s0 in range(c0, c1, CMAX):
        np_ = min(CMAX, c1 - s0)
        np16 = (np_ + 15) & ~15
        K["np"] = V["np"] = np_
        K["off"] = V["off"] = s0 - c0
        sm_s = np.zeros((8, CMAX))
        for warp in range(4):
            tile = warp
            while tile * 8 < np_:
                sc = np.zeros((32, 4))
                for s in range(KS):
                    a = np.zeros((32, 4, 2))
                    b = np.zeros((32, 2, 2))
                    for ln in range(32):
                        g, t = ln // 4, ln % 4
                        j = tile * 8 + g
                        d = 16 * s + 2 * t
                        a[ln, 0], a[ln, 2] = qf[ln, s, 0], qf[ln, s, 1]
                        b[ln, 0] = kval(j, d, "k"), kval(j, d + 1, "k")
                        b[ln, 1] = kval(j, d + 8, "k"), kval(j, d + 9, "k")
                    mma(sc, a, b)
                for ln in range(32):
                    g, t = ln // 4, ln % 4
                    jj = tile * 8 + 2 * t
                    if g < G:
                        if jj < np_:
                            sm_s[g, jj] = sc[ln, 0] * sm_qf[g]
                        if jj + 1 < np_:
                            sm_s[g, jj + 1] = sc[ln, 1] * sm_qf[g]
                tile += 4
        sm_c = np.zeros(8)
        for h in range(G):
            mx = max(sm_s[h, :np_].max(), sm_m[h])
            e = np.zeros(CMAX)
            e[:np_] = np.exp(sm_s[h, :np_] - mx)
            sm_s[h, :np16] = e[:np16]
            c = np.exp(sm_m[h] - mx)
            sm_l[h] = sm_l[h] * c + e[:np_].sum()
            sm_m[h] = mx
            sm_c[h] = c
        for warp in range(4):
            for ln in range(32):
                g = ln // 4
                c = sm_c[g] if g < G else 0.0
                acc[warp, ln, :, 0] *= c
                acc[warp, ln, :, 1] *= c
            for p0 in range(0, np16, 16):
                a = np.zeros((32, 4, 2))
                for ln in range(32):
                    g, t = ln // 4, ln % 4
                    h, f = min(g, G - 1), (16384.0 if g < G else 0.0)
                    a[ln, 0] = sm_s[h, p0 + 2 * t] * f, sm_s[h, p0 + 2 * t + 1] * f
                    a[ln, 2] = sm_s[h, p0 + 2 * t + 8] * f, sm_s[h, p0 + 2 * t + 9] * f
                if split:
                    a = parts(kf, a)
                for i in range(DT):
                    b = np.zeros((32, 2, 2))
                    for ln in range(32):
                        g, t = ln // 4, ln % 4
                        r0, d = p0 + 2 * t, (D // 4) * warp + 8 * i + g
                        b[ln, 0] = kval(r0, d, "v"), kval(r0 + 1, d, "v")
                        b[ln, 1] = kval(r0 + 8, d, "v"), kval(r0 + 9, d, "v")
                    C = acc[warp, :, i]
                    mma(C, a, b)
                    acc[warp, :, i] = C
    part = np.zeros((G, D))
    for warp in range(4):
        for ln in range(32):
            g, t = ln // 4, ln % 4
            if g < G:
                for i in range(DT):
                    d = (D // 4) * warp + 8 * i + 2 * t
                    part[g, d] = acc[warp, ln, i, 0] * vse
                    part[g, d + 1] = acc[warp, ln, i, 1] * vse
    return part, sm_m[:G], sm_l[:G]


def case(kf: str, G: int, n: int, sub: tuple[int, int], seed: int, D: int = 128, split: bool = False) -> float:
    rng = np.random.default_rng(seed)
    c0, c1 = sub
    q = rng.standard_normal((G, D))
    kscale, vscale, sm_scale = 0.05, 0.04, 1 / np.sqrt(D)
    K, V, Kd, Vd = {}, {}, None, None
    if kf == "bf16":
        K["vals"], V["vals"] = rng.standard_normal((n, D)), rng.standard_normal((n, D))
        Kd, Vd = K["vals"], V["vals"]
    elif kf == "fp8":
        K["codes"] = rng.integers(0, 0x7e, (n, D)) | (rng.integers(0, 2, (n, D)) << 7)
        V["codes"] = rng.integers(0, 0x7e, (n, D)) | (rng.integers(0, 2, (n, D)) << 7)
        Kd, Vd = e4m3_value(K["codes"]) * kscale, e4m3_value(V["codes"]) * vscale
    else:
        for X in (K, V):
            X["codes"] = rng.integers(0, 256, (n, D // 2))
            X["scales"] = rng.integers(0, 0x7e, (n, D // 16))

        def dec(X, scale):
            nib = np.stack([X["codes"] & 15, X["codes"] >> 4], -1).reshape(n, D)
            v = E2M1[nib & 7] * np.where(nib & 8, -1, 1)
            return v * np.repeat(e4m3_value(X["scales"]), 16, axis=1) * scale / 6
        Kd, Vd = dec(K, kscale), dec(V, vscale)
    # the emulated block sees the split's rows 0..c1-c0 (staging copies rows s0.. of the split)
    Ks = {k: v[c0:c1] for k, v in K.items()}
    Vs = {k: v[c0:c1] for k, v in V.items()}
    part, m, l = emulate(kf, q, Ks, Vs, G, 0, c1 - c0, sm_scale, kscale, vscale, split)
    s = (q @ Kd[c0:c1].T) * sm_scale
    mm = s.max(-1, keepdims=True)
    e = np.exp(s - mm)
    want_part = e @ Vd[c0:c1]
    got = part / l[:, None]
    want = want_part / e.sum(-1, keepdims=True)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def main() -> int:
    bad = 0
    for kf in ("bf16", "fp8", "nvfp4"):
        for G, n, sub, D in ((4, 300, (0, 300), 128), (8, 200, (37, 170), 128), (3, 140, (0, 140), 64),
                             (4, 40, (0, 5), 128), (8, 150, (3, 150), 256), (3, 260, (0, 260), 64)):
            err = case(kf, G, n, sub, seed=G * 7 + n, D=D)
            ok = err < 1e-12
            bad += not ok
            print(f"{kf:6s} D={D} G={G} rows {sub}: rel err {err:.2e} {'ok' if ok else 'WRONG'}", flush=True)
    # precision of the operand splits (f16 hi + lo, bf16 hi + mid + lo), products exact, sums in float64
    for kf in ("bf16", "fp8", "nvfp4"):
        for G, n, sub, D in ((4, 600, (0, 600), 128), (8, 300, (10, 300), 64)):
            err = case(kf, G, n, sub, seed=G * 11 + n, D=D, split=True)
            ok = err < 2e-6
            bad += not ok
            print(f"{kf:6s} D={D} G={G} rows {sub}, split operands: rel err {err:.2e} {'ok' if ok else 'TOO LARGE'}",
                  flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
