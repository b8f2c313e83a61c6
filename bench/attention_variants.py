#!/usr/bin/env python3
"""Variants of the paged decode attention kernel (attn_partial_paged), timed against the product's in one run, to
choose its sub-chunk length and occupancy from measurements (bench only: nothing here is in the package).

Contract: ``python3 bench/attention_variants.py [--json out.json]`` on one GPU. Each variant is
kernels_cuda/attention.cu compiled here with two substitutions: the sub-chunk length staged in shared memory
(``#define CMAX``: 128 in the product, 64) and the paged kernel's minimum resident blocks per SM
(``__launch_bounds__(128, MB)``: 1 in the product; 2-3 make ptxas fit the registers for more warps per SM). For
each case (Llama-3.1-8B attention, 32 q / 8 KV heads of 128, paged cache with shuffled blocks of 16): the product's
launch is captured from ``ops.attention`` (grid, arguments), every variant is launched with the same arguments
(its own shared-memory size), its partial sums and softmax statistics are checked against the product's (the
merged result must agree to 1e-5: a variant with another CMAX merges the sub-chunks in another order), and each is
timed over 20 launches with the L2 flushed before each (median of 5 blocks). GB/s counts the K/V bytes the rows attend to; the copy bandwidth of
the same run is the reference.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_attention import HKV, HQ, D, copy_bandwidth, make_cache, row_bytes  # noqa: E402
import bench_decode as bd  # noqa: E402  (bench_attention put scripts/ on the path)
from qtool.kernels import loader, ops, pdl  # noqa: E402

DEV = "cuda"
VARIANTS = [(128, 1), (128, 2), (128, 3), (64, 1), (64, 2), (64, 3)]     # (CMAX, min blocks per SM)
CASES = [("bf16", 32, 1024), ("fp8", 32, 1024), ("nvfp4", 32, 1024), ("bf16", 64, 1024), ("fp8", 64, 1024),
         ("fp8", 1, 32768), ("nvfp4", 1, 32768)]


def variant_module(cmax: int, mb: int, exprs: list[str]):
    import cupy
    src = loader.preprocess(loader.kernel_dir() / "attention.cu")
    src, n1 = re.subn(r"#define CMAX 128\b", f"#define CMAX {cmax}", src)
    src, n2 = re.subn(r"__launch_bounds__\(128, 1\) attn_partial_paged", f"__launch_bounds__(128, {mb}) attn_partial_paged",
                      src)
    assert n1 == 1 and n2 == 1, (n1, n2)
    keep = {f"QT_ATTN_PAGED({e.split('<')[1].split(',')[0]}, " for e in exprs}     # only the head dims timed here
    src = "\n".join(ln for ln in src.splitlines()
                    if not ln.startswith(("QT_ATTN_KF(", "QT_ATTN_PAGED(")) or ln.startswith(tuple(keep)))
    mod = cupy.RawModule(code=src, options=loader.OPTIONS, name_expressions=exprs)
    mod.compile()
    return mod


def capture(q, pos, cache, rope=None):
    """The product's attn_partial_paged launch inside ops.attention: (name, grid, block, args, smem, part, ml);
    rope = (k, v, cos, sin): the decode path with RoPE and the new K / V row fused."""
    seen = {}
    real = ops.launch

    def spy(file, name, grid, block, args, smem=0):
        if name.startswith("attn_partial_paged"):
            seen.update(name=name, grid=grid, block=block, args=args, smem=smem)
        return real(file, name, grid, block, args, smem)
    ops.launch = spy
    try:
        part, ml = ops._attn_partial(q, pos, cache, 0, 1, rope)
    finally:
        ops.launch = real
    return seen, part, ml


def merged(part, ml):
    """softmax-weighted merge of the splits: [N, Hq, D] (float64)."""
    m, l = ml[..., 0].double(), ml[..., 1].double()
    M = m.max(-1, keepdim=True).values
    w = torch.exp(m - M).nan_to_num(0.0)
    return (part.double() * w[..., None]).sum(-2) / (l * w).sum(-1)[..., None]


def timed_cold(fn, n: int = 20) -> float:
    """Seconds per call of fn with the L2 flushed before each call (a 256 MB memset, timed alone and subtracted):
    decode reads the cache from HBM, not from an L2 that a back-to-back loop keeps warm."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)

    def both():
        flush.zero_()
        fn()
    return max(0.0, bd.time_graph(both, 5, n) - bd.time_graph(flush.zero_, 5, n))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    exprs = [f"attn_partial_paged<{D}, {ops.ATTN_PU[D]}, {ops._attn_gm(D, HQ // HKV)}, {kf}>" for kf in range(3)]
    mods = {v: variant_module(*v, exprs) for v in VARIANTS}
    for v, mod in mods.items():
        f = mod.get_function(exprs[1])
        print(f"variant CMAX {v[0]} min blocks {v[1]}: {f.num_regs} registers, {f.shared_size_bytes} B static smem")
    stream = torch.cuda.current_stream().cuda_stream
    rows = []
    print("| kv | batch | context | CMAX | min blocks | us | GB/s | / copy | vs product |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kv, B, ctx in CASES:
        cache = make_cache("paged", kv, B, ctx + 64)
        bd.fill_cache(cache)
        q = torch.randn(B, HQ, D, device=DEV)
        pos = torch.full((B, 1), ctx - 1, device=DEV)
        seen, part, ml = capture(q, pos, cache)
        want = merged(part, ml)
        row = row_bytes(cache)
        nbytes = 2 * B * ctx * HKV * row
        base = None
        for (cmax, mb), mod in mods.items():
            f = mod.get_function(seen["name"])
            smem = 2 * cmax * row
            f.max_dynamic_shared_size_bytes = smem
            part.zero_()
            run = lambda: pdl.launch(f, seen["grid"], seen["block"], stream, seen["args"], smem)  # noqa: E731
            run()
            torch.cuda.synchronize()
            err = float(((merged(part, ml) - want).norm() / want.norm()))
            t = timed_cold(run)
            base = base or t
            rows.append(dict(kv=kv, batch=B, ctx=ctx, cmax=cmax, min_blocks=mb, us=t * 1e6, gb_s=nbytes / t / 1e9,
                             ratio=nbytes / t / bw, vs_product=base / t, rel_err=err))
            print(f"| {kv} | {B} | {ctx} | {cmax} | {mb} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | "
                  f"{nbytes / t / bw:.2f} | {base / t:.2f}x | " + ("" if err < 1e-5 else f"WRONG: rel err {err:.1e}"),
                  flush=True)
        del cache
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_gb_s=bw / 1e9, rows=rows), indent=1))


if __name__ == "__main__":
    main()
