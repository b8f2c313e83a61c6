#!/usr/bin/env python3
"""Prefill attention as batched float32 GEMMs (scores materialised, masked, softmax, times V), the variant that
was qtool's from 2026-12-08 (commit 90a86ec) until measured analysis put it behind torch's fused float32 SDPA, timed
against the product's path (qtool.kernels.prefill_attention._sdpa) in one run.

Contract: ``python3 bench/prefill_attention_gemm.py [--lengths 512 2048] [--device cuda] [--json out.json]``: one
layer of the Llama-3.1-8B shape (32 query heads over 8 KV heads, head_dim 128), a prompt of T tokens at positions
0..T-1 (causal), random float32 q / K / V; both variants against float64 attention (relative error) and their time
per layer and for 32 layers (CUDA graphs are not used: both run eagerly, as prefill does). Prediction written before
any GPU run (docs/performance.md): at T = 2048 the GEMM variant computes ~1.65 TFLOP of scores and products for 32
layers (two query tiles, causal tiles truncated) and moves ~3.2 GB of scores per layer through its unfused passes,
~55-70 ms against the fused kernel's at most ~36 ms (run 52: RoPE, KV write, gather and SDPA together 36.2 ms).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qtool.kernels import prefill_attention  # noqa: E402

SCORE_ELEMENTS = 1 << 26     # scores held at once per call (256 MB of float32): queries are tiled to stay under it


def gemm_attend(qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """qb [R, Hq, T, d] float32 over k / v [R, Hkv, L, d] float32; causal bottom-right (queries at L-T..L-1) when
    mask is None, else mask [R, 1, T, L] bool. The G = Hq / Hkv query heads of a KV head are stacked as G*T rows
    over that head's K/V (no K/V repeat), scores = Q K^T and out = softmax(scores) V as batched float32 GEMMs
    (cuBLAS SGEMM on a GPU with TF32 switched off around them: float32 FMAs, as the reference), the queries tiled so
    a tile's scores stay
    under SCORE_ELEMENTS (at least one query row per tile). Causal tiles stop at their last query's position: keys
    past it would only be masked, so a prompt of T tokens in n tiles computes (n + 1) / 2n of the full scores."""
    R, Hq, T, D = qb.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D)
    qg = qb.reshape(R, Hkv, G, T, D)
    kt = k.transpose(2, 3)                                                   # [R, Hkv, d, L]
    out = torch.empty(R, Hkv, G, T, D, dtype=torch.float32, device=qb.device)
    tile = max(1, min(T, SCORE_ELEMENTS // max(1, R * Hq * L)))
    j = torch.arange(L, device=qb.device)
    with prefill_attention._ieee_matmuls():              # float32 FMAs even if the process allowed TF32
        _tiles(qg, kt, v, mask, out, scale, T, L, tile, j)
    return out.view(R, Hq, T, D)


def _tiles(qg, kt, v, mask, out, scale, T, L, tile, j) -> None:
    """gemm_attend's query tiles: scores, mask, softmax and times V per tile, into out [R, Hkv, G, T, d]."""
    R, Hkv, G, _, D = qg.shape
    for t0 in range(0, T, tile):
        t1 = min(T, t0 + tile)
        Lt = L if mask is not None else L - T + t1       # causal: the tile's last query sees keys 0..L-T+t1-1 only
        qt = qg[:, :, :, t0:t1].reshape(R, Hkv, G * (t1 - t0), D)
        s = torch.matmul(qt, kt[..., :Lt]).mul_(scale).view(R, Hkv, G, t1 - t0, Lt)
        if mask is None:
            visible = j[None, :Lt] <= (L - T + torch.arange(t0, t1, device=j.device))[:, None]    # [tq, Lt]
            s.masked_fill_(~visible, float("-inf"))
        else:
            s.masked_fill_(~mask[:, :, None, t0:t1], float("-inf"))
        p = torch.softmax(s, dim=-1).view(R, Hkv, G * (t1 - t0), Lt)
        out[:, :, :, t0:t1] = torch.matmul(p, v[:, :, :Lt]).view(R, Hkv, G, t1 - t0, D)


def float64_attention(qb, k, v):
    """Causal attention in float64, K/V repeated per query head: [R, Hq, T, d]."""
    G = qb.shape[1] // k.shape[1]
    q64, k64, v64 = qb.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    T, L = q64.shape[2], k64.shape[2]
    s = q64 @ k64.transpose(2, 3) / math.sqrt(q64.shape[-1])
    s.masked_fill_(torch.arange(L)[None, :].to(s.device) > (L - T + torch.arange(T).to(s.device))[:, None], float("-inf"))
    return s.softmax(-1) @ v64


def timed(fn, device, reps=5) -> float:
    out = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--heads", type=int, nargs=3, default=[32, 8, 128], metavar=("HQ", "HKV", "D"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    HQ, HKV, D = a.heads
    rows = []
    print(f"| T | fused SDPA (product) ms / layer | GEMM variant ms / layer | x {a.layers} layers: SDPA / GEMM ms | "
          "rel. error vs float64: SDPA / GEMM |")
    print("|---|---|---|---|---|")
    for T in a.lengths:
        g = torch.Generator(device="cpu").manual_seed(T)
        qb = torch.randn(1, HQ, T, D, generator=g).to(a.device)
        k = torch.randn(1, HKV, T, D, generator=g).to(a.device)
        v = torch.randn(1, HKV, T, D, generator=g).to(a.device)
        want = float64_attention(qb, k, v)
        got_s = prefill_attention._sdpa(qb, k, v, None)
        got_g = gemm_attend(qb, k, v, None)
        err = [float((x.double() - want).norm() / want.norm()) for x in (got_s, got_g)]
        ts = timed(lambda: prefill_attention._sdpa(qb, k, v, None), a.device)
        tg = timed(lambda: gemm_attend(qb, k, v, None), a.device)
        rows.append(dict(T=T, sdpa_ms=ts * 1e3, gemm_ms=tg * 1e3, err_sdpa=err[0], err_gemm=err[1]))
        print(f"| {T} | {ts * 1e3:.3f} | {tg * 1e3:.3f} | {ts * 1e3 * a.layers:.1f} / {tg * 1e3 * a.layers:.1f} | "
              f"{err[0]:.1e} / {err[1]:.1e} |", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                                      "heads": a.heads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
