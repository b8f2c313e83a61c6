#!/usr/bin/env python3
"""Diagnostic: where the last decoder layer's time goes inside the PDL pipeline, from %globaltimer stamps.

Contract: `python3 scripts/probe_timeline.py [--ctx N]` (GPU). Compiles the kernels with -DQT_PROBE added to QTOOL_NVRTC_DEFINES (each
QT_STAMP(i) of kernels_cuda/common.cuh stores thread 0's %globaltimer per block), builds bench_decode.py's
Llama-3.1-8B fp8 decoder, replays its captured decode graph, and prints, for the kernels of the last layer whose
stamps no later launch overwrote (rope_kv_write, attn_partial, attn_combine_heads, the post-attention
rmsnorm_quant, gate_up's gemv_mma4s, down's gemv_mma4), the first / last block entry, wait release (after
griddepcontrol.wait) and end, in us from the first stamp. Numbers only; nothing is checked.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# (module, kernel, [(stamp index, label), ...]); labels: entry / wait / phase / end
PROBES = [
    ("rope_kv", "rope_kv_write", [(9, "entry"), (10, "wait"), (11, "end")]),
    ("attention", "attn_partial", [(0, "entry"), (1, "wait"), (2, "scores"), (3, "softmax"), (4, "end")]),
    ("attention", "attn_combine_heads", [(5, "entry"), (6, "wait"), (7, "loads"), (8, "end")]),
    ("act_quant", "rmsnorm_quant (post-attn)", [(0, "entry"), (1, "wait"), (2, "end")]),
    ("linear", "gemv_mma4s (gate_up)", [(3, "entry"), (4, "wait"), (5, "k-loop done")]),
    ("linear", "gemv_mma4 (down)", [(0, "entry"), (1, "wait"), (2, "k-loop done")]),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    import cupy

    import os

    from qtool.kernels import loader
    os.environ["QTOOL_NVRTC_DEFINES"] = os.environ.get("QTOOL_NVRTC_DEFINES", "") + " -DQT_PROBE"
    import bench_decode as bd
    dec, loop, nxt = bd._decode_loop("llama3.1-8b", "fp8", "bf16", args.ctx)
    for _ in range(5):
        nxt()
    torch.cuda.synchronize()
    arrays = {}
    for mod in {p[0] for p in PROBES}:
        ptr = loader.module(mod).get_global("qt_probe")
        arrays[mod] = cupy.ndarray((16, 4096), dtype=cupy.uint64, memptr=ptr)
        arrays[mod].fill(0)
    torch.cuda.synchronize()
    nxt()
    torch.cuda.synchronize()
    rows, t0 = [], None
    for mod, name, stamps in PROBES:
        a = cupy.asnumpy(arrays[mod])
        for i, label in stamps:
            v = a[i][a[i] > 0]
            if v.size:
                rows.append((name, label, int(v.min()), int(v.max()), v.size))
                t0 = int(v.min()) if t0 is None else min(t0, int(v.min()))
    print(f"\nlast layer, ctx {args.ctx}: us from the first stamp (blocks = blocks that stamped)")
    print("| kernel | stamp | first us | last us | blocks |")
    print("|---|---|---|---|---|")
    for name, label, lo, hi, n in sorted(rows, key=lambda r: r[2]):
        print(f"| {name} | {label} | {(lo - t0) / 1e3:.2f} | {(hi - t0) / 1e3:.2f} | {n} |")


if __name__ == "__main__":
    main()
