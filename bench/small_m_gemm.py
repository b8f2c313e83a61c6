#!/usr/bin/env python3
"""The batched-decode linears (M = 8..64 rows) against the weight-read limit, and cuBLASLt's fp8 GEMM in both
operand orders, in one run.

Contract: ``python3 bench/small_m_gemm.py [--rows 8 16 32 64] [--json out.json]`` on one GPU. For each Llama-3.1-8B
linear (qkv 6144x4096, o 4096x4096, gate|up 28672x4096, down 4096x14336) and each M, each timed as a CUDA graph of
several calls (scripts/bench_decode.graph_time):
- qtool: ``ops.linear`` on a random fp8 layer as CudaBackend holds it (mma-tiled with the kept row-major copy),
  f32 in and out, activation quantization included (what a batched decode step runs);
- cuBLASLt fp8, the product's order: ``torch._scaled_mm(x8 [M, K], W8^T)`` (per-tensor scales, bf16 out);
- cuBLASLt fp8, swapped: ``torch._scaled_mm(W8 [O, K], x8^T)`` (y^T: the weight as the M side, the batch as N);
- cuBLAS bf16 ``torch.matmul(x, W^T)`` on the bf16 weight (twice the bytes).
Each with the weight bytes / time against the same-run copy bandwidth. Run 52's profile put the fp8 GEMMs at
~5.9 ms of a 12.6 ms batch-32 decode step (8 GB of fp8 weights: ~1.4 TB/s, under half the copy bandwidth); this
says whether the other operand order, or the batch size, is what leaves the rest (issue 16 target 2, issue 17).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_decode as bd  # noqa: E402
from bench_prefill_batch import LLAMA_LINEARS, layer  # noqa: E402

from qtool.kernels import gemm, ops  # noqa: E402

DEV = "cuda"


def _timed(fn):
    """graph_time of fn, or None where cuBLASLt refuses the shape (fp8 operands need dims divisible by 16)."""
    try:
        fn()
    except RuntimeError:
        return None
    return bd.graph_time(fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    bw = bd.copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s ({torch.cuda.get_device_name()})")
    print("| linear | M | qtool path | qtool us | cuBLASLt fp8 us | swapped fp8 us | bf16 matmul us | "
          "weight read / copy bw: qtool, fp8, swapped |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    one = torch.ones((), device=DEV)
    for name, (O, K) in LLAMA_LINEARS.items():
        kl = layer("fp8", O, K)
        w8 = gemm.row_major(kl).view(torch.float8_e4m3fn)                      # [O, K]
        wb = (torch.randn(O, K, device=DEV) * 0.05).to(torch.bfloat16)
        for M in a.rows:
            x = torch.randn(M, K, device=DEV)
            x8 = (x * 8).to(torch.float8_e4m3fn)
            xb = x.to(torch.bfloat16)
            t_q = bd.graph_time(lambda: ops.linear(x, kl))
            t_f = _timed(lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
            t_s = _timed(lambda: torch._scaled_mm(w8, x8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
            t_b = bd.graph_time(lambda: torch.matmul(xb, wb.t()))
            nb = O * K
            us = [None if t is None else t * 1e6 for t in (t_q, t_f, t_s, t_b)]
            ratio = [None if t is None else nb / t / bw for t in (t_q, t_f, t_s)]
            r = dict(linear=name, M=M, path=ops.decode_path(kl, M), qtool_us=us[0], fp8_us=us[1], swapped_us=us[2],
                     bf16_us=us[3], ratio_qtool=ratio[0], ratio_fp8=ratio[1], ratio_swapped=ratio[2])
            rows.append(r)
            f1 = lambda v: "-" if v is None else f"{v:.1f}"       # noqa: E731
            f2 = lambda v: "-" if v is None else f"{v:.2f}"       # noqa: E731
            print(f"| {name} {O}x{K} | {M} | {r['path']} | {' | '.join(f1(u) for u in us)} | "
                  f"{', '.join(f2(v) for v in ratio)} |", flush=True)
            del x, x8, xb
        del kl, w8, wb
        torch.cuda.empty_cache()
    if a.json:
        a.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows},
                                     indent=1))


if __name__ == "__main__":
    main()
