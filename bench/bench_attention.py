#!/usr/bin/env python3
"""Decode attention alone: how fast each cache layout and KV format reads the cache, against the same-run copy
bandwidth (issue 16 targets 2 and 4).

Contract: ``python3 bench/bench_attention.py [--json out.json]`` on one GPU. One layer of Llama-3.1-8B attention
(32 query heads over 8 KV heads of 128) for one decode token per row: ``ops.attention`` (the split kernel plus the
merge), timed as a CUDA graph (median of blocks), for the contiguous cache (``qtool run``) and the paged cache
with blocks of 16 in a shuffled order (the engine: ``qtool serve``, ``run --prompts``), KV bf16 / fp8 / nvfp4,
at (batch, context) = (1, 8192), (1, 32768), (32, 1024), (64, 1024). GB/s counts the cache bytes the rows attend
to (codes and scales); the ratio is to a device-to-device copy of 1 GiB timed in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_decode as bd  # noqa: E402
from qtool.kernels import ops  # noqa: E402

DEV = "cuda"
HQ, HKV, D = 32, 8, 128
SHAPES = ((1, 8192), (1, 32768), (32, 1024), (64, 1024))


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    t = bd.time_graph(lambda: b.copy_(a))
    return 2 * a.numel() / t


def row_bytes(cache) -> int:
    """Bytes of one cached position of one KV head, K or V: codes plus nvfp4 block scales."""
    kc, ks = cache.k[0]
    return kc.shape[-1] * kc.element_size() + (ks.shape[-1] if ks is not None else 0)


def make_cache(layout: str, kv: str, B: int, length: int):
    if layout == "contiguous":
        return ops.KVCache(kv, B, length, 1, HKV, D, DEV, [0.05], [0.05])
    bs, nb = 16, -(-length // 16)
    c = ops.PagedKVCache(kv, B * nb + 1, bs, B, nb, 1, HKV, D, DEV, [0.05], [0.05])
    g = torch.Generator().manual_seed(0)
    c.block_tables.copy_((1 + torch.randperm(B * nb, generator=g)).view(B, nb).to(torch.int32))
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    print("| layout | kv | batch | context | us | GB/s | / copy |")
    print("|---|---|---|---|---|---|---|")
    for layout in ("contiguous", "paged"):
        for kv in ("bf16", "fp8", "nvfp4"):
            for B, ctx in SHAPES:
                cache = make_cache(layout, kv, B, ctx + 64)
                bd.fill_cache(cache)
                q = torch.randn(B, HQ, D, device=DEV)
                pos = torch.full((B, 1), ctx - 1, device=DEV)
                t = bd.graph_time(lambda: ops.attention(q, pos, cache, 0, 1))
                nbytes = 2 * B * ctx * HKV * row_bytes(cache)
                rows.append(dict(layout=layout, kv=kv, batch=B, ctx=ctx, us=t * 1e6, gb_s=nbytes / t / 1e9,
                                 ratio=nbytes / t / bw))
                print(f"| {layout} | {kv} | {B} | {ctx} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | "
                      f"{nbytes / t / bw:.2f} |", flush=True)
                del cache
                torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_gb_s=bw / 1e9, rows=rows), indent=1))


if __name__ == "__main__":
    main()
