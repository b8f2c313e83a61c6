#!/usr/bin/env python3
"""Prototype: paged decode attention with QK^T and PV on the tensor cores (bench/kernels/attn_tc.cuh), checked
against the product's attn_partial_paged and float64, and timed against it in one run (bench only; issue 16
target 4 measured the CUDA-core kernel bound by per-element work, run 57).

Contract: ``python3 bench/attention_tc.py [--json out.json]`` on one GPU. For each case (Llama-3.1-8B attention:
32 q / 8 KV heads of 128; paged cache with shuffled blocks of 16; KV bf16 / fp8 / nvfp4; batch 1 at ctx 8192 and
32768, batch 32 and 64 at ctx 1024): the product's launch is captured from ``ops._attn_partial`` (grid and
arguments), the prototype runs with the same arguments into the same buffers, and the merged outputs are compared
(relative error, expected ~1e-6: float32-accurate split operands) with the product's and with a float64 softmax over
the decoded cache (batch-1 cases without RoPE; two cases run the decode path with RoPE and the new K / V row fused); both are timed over 20 launches (median of 5 blocks). GB/s counts the K/V bytes the
rows attend to; the copy bandwidth of the same run is the reference.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from attention_variants import capture, merged, timed_cold  # noqa: E402
from bench_attention import HKV, HQ, D, copy_bandwidth, make_cache  # noqa: E402
import bench_decode as bd  # noqa: E402
from qtool.kernels import loader, pdl  # noqa: E402

DEV = "cuda"
CASES = [("bf16", 1, 8192, False), ("fp8", 1, 8192, False), ("nvfp4", 1, 8192, False), ("bf16", 1, 32768, False),
         ("fp8", 1, 32768, False), ("nvfp4", 1, 32768, False), ("bf16", 32, 1024, False), ("fp8", 32, 1024, False),
         ("nvfp4", 32, 1024, False), ("fp8", 64, 1024, False), ("fp8", 32, 1024, True), ("nvfp4", 1, 8192, True),
         ("fp8", 1, 101, False), ("nvfp4", 8, 300, False)]      # short rows: empty splits, partial tiles
CODES = {"bf16": 0, "fp8": 1, "nvfp4": 2}


def source() -> str:
    """The prototype's CUDA source: the product's attention.cu (without its own instantiations), mma_frag.cuh and
    bench/kernels/attn_tc.cuh (which instantiates attn_tc_paged for every head dim and KV format)."""
    seen: set = set()
    src = loader.preprocess(loader.kernel_dir() / "attention.cu", seen)
    src = re.sub(r"^QT_ATTN_(KF|PAGED)\(.*$", "", src, flags=re.M)   # the product's instantiations: not needed here
    src += loader.preprocess(loader.kernel_dir() / "mma_frag.cuh", seen)
    return src + (ROOT / "bench" / "kernels" / "attn_tc.cuh").read_text().replace("#pragma once", "")


def module():
    import cupy
    exprs = [f"attn_tc_paged<{d}, {k}>" for d in (64, 128, 256) for k in range(3)]
    mod = cupy.RawModule(code=source(), options=loader.OPTIONS, name_expressions=exprs)
    mod.compile()
    return mod


def float64_reference(q, cache, ctx):
    """[Hq, D] float64 attention of batch row 0's query over its first ctx positions (decoded cache)."""
    from qtool.kernels import prefill_attention
    k = prefill_attention._decoded(cache, "k", 0, 0, 1, ctx)[0].double()      # [Hkv, L, d]
    v = prefill_attention._decoded(cache, "v", 0, 0, 1, ctx)[0].double()
    G = HQ // HKV
    qq = q[0].double().view(HKV, G, D)
    s = torch.einsum("hgd,hld->hgl", qq, k) / math.sqrt(D)
    return torch.einsum("hgl,hld->hgd", s.softmax(-1), v).reshape(HQ, D).cpu()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    mod = module()
    for k in range(3):
        f = mod.get_function(f"attn_tc_paged<{D}, {k}>")
        print(f"attn_tc_paged<{D}, {k}>: {f.num_regs} registers")
    stream = torch.cuda.current_stream().cuda_stream
    rows = []
    print("| kv | batch | context | fused RoPE | product us | tc us | product / copy | tc / copy | tc vs product | "
          "rel err vs product | vs float64 (product, tc) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kv, B, ctx, fused in CASES:
        cache = make_cache("paged", kv, B, ctx + 64)
        bd.fill_cache(cache, full_range=True)
        q = torch.randn(B, HQ, D, device=DEV)
        g = torch.Generator().manual_seed(ctx + B)
        lens = torch.full((B,), ctx) - torch.randint(0, min(41, ctx // 4), (B,), generator=g) * (B > 1)
        pos = (lens - 1).view(B, 1).to(DEV)      # ragged rows (batch > 1): partial tiles and sub-chunks
        rope = None
        if fused:                     # decode with RoPE and the new K / V row written by the kernel
            kv_rows = torch.randn(B, 2 * HKV, D, device=DEV)
            ang = torch.rand(ctx + 64, D // 2, device=DEV) * 6.28
            rope = (kv_rows[:, :HKV], kv_rows[:, HKV:], ang.cos().contiguous(), ang.sin().contiguous())
        seen, part, ml = capture(q, pos, cache, rope)
        want = merged(part, ml)
        kc, ks = cache.k[0]
        codes = kc.shape[-1] * kc.element_size()
        sb = ks.shape[-1] if ks is not None else 0
        nbytes = 2 * int(lens.sum()) * HKV * (codes + sb)
        prod = loader.function("attention", seen["name"])
        t_prod = timed_cold(lambda: pdl.launch(prod, seen["grid"], seen["block"], stream, seen["args"], seen["smem"]))
        f = mod.get_function(f"attn_tc_paged<{D}, {CODES[kv]}>")
        smem = 2 * 128 * (codes + 16) + 2 * 128 * sb
        f.max_dynamic_shared_size_bytes = smem
        part.zero_()
        ml.fill_(float("nan"))                    # every split's statistics must come from the prototype
        run = lambda: pdl.launch(f, seen["grid"], seen["block"], stream, seen["args"], smem)  # noqa: E731
        run()
        torch.cuda.synchronize()
        got = merged(part, ml)
        err = float((got - want).norm() / want.norm())
        f64 = ""
        if B == 1 and not fused:
            ref = float64_reference(q, cache, int(lens[0]))
            f64 = (f"{float((want[0].cpu() - ref).norm() / ref.norm()):.1e}, "
                   f"{float((got[0].cpu() - ref).norm() / ref.norm()):.1e}")
        t_tc = timed_cold(run)
        rows.append(dict(kv=kv, batch=B, ctx=ctx, fused=fused, product_us=t_prod * 1e6, tc_us=t_tc * 1e6,
                         product_ratio=nbytes / t_prod / bw, tc_ratio=nbytes / t_tc / bw, rel_err=err, float64=f64))
        print(f"| {kv} | {B} | {ctx} | {fused} | {t_prod * 1e6:.1f} | {t_tc * 1e6:.1f} | {nbytes / t_prod / bw:.2f} | "
              f"{nbytes / t_tc / bw:.2f} | {t_prod / t_tc:.2f}x | {err:.1e} | {f64} |", flush=True)
        del cache
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_gb_s=bw / 1e9, rows=rows), indent=1))


if __name__ == "__main__":
    main()
