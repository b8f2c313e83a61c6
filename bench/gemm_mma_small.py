#!/usr/bin/env python3
"""A prototype batched-decode fp8 linear (bench/kernels/gemm_mma_small.cuh: gemv_mma4p with 2, 4 or 8 n-tiles of 8
batch rows, the weights read once for all M rows) checked and timed against the product's path at M = 16, 32, 64
and against float64, in one run.

Contract: ``python3 bench/gemm_mma_small.py [--rows 16 32 64] [--json out.json]`` on one GPU. For each
Llama-3.1-8B linear (qkv 6144x4096, o 4096x4096, gate|up 28672x4096, down 4096x14336), a random fp8 layer as
CudaBackend holds it (mma-tiled plus the kept row-major copy, per-tensor weight and activation scales) and x f32
[M, K]: the activation codes from the product's act_quant (``ops.act_quant(codes=True)``), then
- float64: x̂ (codes x scale) @ W^T (codes x scale) in float64;
- product: ``ops.linear(x, kl)`` (act_quant + cuBLASLt fp8 at M > 8), checked against float64 at its stated 2e-3;
- prototype: gemm_mma_small<NT> (the smallest NT with 8 NT >= M) on the same codes, S = 1, 2, 4, 8 K slices (the fastest kept), checked
  against float64 at 1e-5 (exact e4m3 products, float32 sums) — a WRONG row is never timed;
- each timed as a CUDA graph (scripts/bench_decode.graph_time), the weight bytes / time against the same-run copy
  bandwidth. The prototype's time excludes act_quant (the product's includes it: one more small kernel).
Goes into kernels_cuda/ only if it is correct and clearly faster than the product's path here (issue 16 target 2:
run 52 put the fp8 GEMMs at 5.9 of 12.6 ms of a batch-32 step, ~1.4 TB/s).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import bench_decode as bd  # noqa: E402
from bench_prefill_batch import LLAMA_LINEARS, layer  # noqa: E402

from qtool.kernels import gemm, loader, ops, pdl  # noqa: E402
from qtool.kernels.launch import i32, ptr  # noqa: E402
from qtool.kernels.split import kslices  # noqa: E402

DEV = "cuda"
NTS = (2, 4, 8)


def source() -> str:
    """The prototype's CUDA source: the product's common.cuh and mma_frag.cuh, linear.cu's e4m3 mma, the .cuh."""
    seen: set = set()
    src = loader.preprocess(loader.kernel_dir() / "mma_frag.cuh", seen)
    src += '\nQT_MMA_16X8(mma_e4m3, "m16n8k32.row.col.f32.e4m3.e4m3.f32")\n'
    return src + (ROOT / "bench" / "kernels" / "gemm_mma_small.cuh").read_text().replace("#pragma once", "")


def module():
    import cupy
    mod = cupy.RawModule(code=source(), options=loader.OPTIONS,
                         name_expressions=[f"gemm_mma_small<{nt}>" for nt in NTS])
    mod.compile()
    return mod


def float64_reference(q: dict, kl) -> torch.Tensor:
    """x̂ @ W^T in float64 from the e4m3 codes and their scales (per-row activation, per-row or -tensor weight)."""
    xq = q["xq"].view(torch.float8_e4m3fn).double() * q["xs"][:, :1].double()
    w = gemm.row_major(kl).view(torch.float8_e4m3fn).double()
    sc = kl.sc.double().reshape(-1)
    w = w * (sc.reshape(-1, 1) if sc.numel() == w.shape[0] else sc.reshape(1, 1))
    y = xq @ w.t()
    return y + kl.bias.double() if kl.bias is not None else y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    bw = bd.copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
    mod = module()
    for nt in NTS:
        print(f"gemm_mma_small<{nt}>: {mod.get_function(f'gemm_mma_small<{nt}>').num_regs} registers")
    stream = torch.cuda.current_stream().cuda_stream
    print("| linear | M | product us (path) | prototype us (S) | product / copy | prototype / copy | prototype vs "
          "product | rel err vs float64: product, prototype |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name, (O, K) in LLAMA_LINEARS.items():
        kl = layer("fp8", O, K)
        assert kl.tiled and kl.sbi_log2 < 0, "the prototype reads mma-tiled codes with per-row / per-tensor scales"
        for M in a.rows:
            nt = next((n for n in NTS if 8 * n >= M), None)         # the smallest instance covering M rows
            if nt is None:
                continue
            x = torch.randn(M, K, device=DEV)
            q = ops.act_quant(x, kl, codes=True)
            want = float64_reference(q, kl)
            y_prod = ops.linear(x, kl)
            err_prod = float((y_prod.double() - want).norm() / want.norm())
            f = mod.get_function(f"gemm_mma_small<{nt}>")
            y = torch.empty(M, O, device=DEV)
            best = None
            for S_want in (1, 2, 4, 8):
                S, kslice = kslices(K, S_want, 256)
                args = (ptr(q["xq"]), ptr(q["xs"]), ptr(kl.w), ptr(kl.sc), ptr(kl.bias), ptr(y), i32(O), i32(M),
                        i32(O), i32(K), i32(kl.sld), i32(kl.sbo), i32(kslice))
                smem = S * nt * 512 if S > 1 else 0
                run = lambda: pdl.launch(f, (math.ceil(O / 16),), (32 * S,), stream, args, smem)  # noqa: E731
                y.fill_(float("nan"))
                run()
                torch.cuda.synchronize()
                err = float((y.double() - want).norm() / want.norm())
                if not err < 1e-5:
                    print(f"| {name} | {M} | WRONG at S = {S}: rel err {err:.2e} |", flush=True)
                    continue
                t = bd.graph_time(run)
                if best is None or t < best[0]:
                    best = (t, S, err)
            t_prod = bd.graph_time(lambda: ops.linear(x, kl))
            if best is None:
                rows.append(dict(linear=name, M=M, wrong=True))
                continue
            t, S, err = best
            r = dict(linear=name, M=M, product_us=t_prod * 1e6, path=ops.decode_path(kl, M), prototype_us=t * 1e6,
                     S=S, product_bw=O * K / t_prod / bw, prototype_bw=O * K / t / bw, err_product=err_prod,
                     err_prototype=err)
            rows.append(r)
            print(f"| {name} {O}x{K} | {M} | {r['product_us']:.1f} ({r['path']}) | {r['prototype_us']:.1f} ({S}) | "
                  f"{r['product_bw']:.2f} | {r['prototype_bw']:.2f} | {t_prod / t:.2f}x | {err_prod:.1e}, {err:.1e} |",
                  flush=True)
        del kl
        torch.cuda.empty_cache()
    if a.json:
        a.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
