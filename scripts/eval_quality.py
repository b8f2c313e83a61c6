#!/usr/bin/env python
"""docs/quality.md from fresh checkpoints: `qtool quantize` per recipe, then one `qtool eval` against bf16.

Contract: builds each recipe's checkpoint from the built-in bf16 SmolLM2-135M with `python -m qtool quantize`
into a new temporary folder (nothing reused), then runs ONE `python -m qtool eval CKPT... --baseline smollm2-135m
--noise-floor N --json` over all of them on the reference backend (same windows for every recipe, bf16 scored once),
and writes docs/quality.md: per recipe perplexity and ratio to bf16 with 95 % intervals, top-1 agreement, mean KL,
beside bf16's noise floor, with an empty CUDA column that `scripts/eval_gpu.sh` results fill on the device.
`--render EVAL.json [--quantize-json DIR]` renders the table from a `qtool eval --json` result already made the
same way (e.g. when the runs were split over several processes), stating so in the page.
Run: python scripts/eval_quality.py [--tokens 8192] [--window 512] [--calib-size 32] [--recipes fp8,nvfp4]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = {   # name -> qtool quantize arguments
    "fp8": ["--quant", "fp8"],
    "fp8-fp8kv": ["--quant", "fp8", "--kv-cache-quant", "fp8"],
    "fp8-nvfp4kv": ["--quant", "fp8", "--kv-cache-quant", "nvfp4"],
    "w4a16-awq": ["--quant", "w4a16-awq", "--awq-block-size", "64"],
    "w4a16-awq-clip": ["--quant", "w4a16-awq", "--awq-block-size", "64", "--algorithm", "awq_clip"],
    "w4a16-awq-full": ["--quant", "w4a16-awq", "--awq-block-size", "64", "--algorithm", "awq_full"],
    "nvfp4": ["--quant", "nvfp4"],
}
TARGETS = {"fp8": 1.01, "fp8-fp8kv": 1.01, "w4a16-awq": 1.15, "w4a16-awq-clip": 1.15, "w4a16-awq-full": 1.15,
           "nvfp4": 1.20}


def ci(d: dict, fmt: str) -> str:
    return f"{d['value']:{fmt}} [{d['ci95'][0]:{fmt}}, {d['ci95'][1]:{fmt}}]"


def render(r: dict, how: str) -> str:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    b, t, f = r["baseline"], r["text"], r.get("noise_floor")
    lines = [
        "# Quality of qtool's recipes on SmolLM2-135M-Instruct",
        "",
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d} at commit `{commit}` with `qtool eval` ({how}), on the "
        "PyTorch reference backend (float32 on CPU, each checkpoint's own KV-cache format). Source: the built-in bf16 "
        "SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF, docs/calibration.md).",
        "",
        f"* Text: {t['source']}, {t['tokens_scored']:,} scored tokens in {t['windows']} windows of {t['window']} "
        "(held out from calibration, docs/eval.md).",
        f"* Intervals: {r['interval']}; the ratio, agreement and KL are paired over the same windows.",
        (f"* Noise floor of the bf16 reference ({f['runs']} runs with embeddings × (1 + 2⁻²⁰·randn), worst of "
         f"{len(f['pairs'])} self-pairs): ratio {f['worst']['ppl_ratio']:.5f}, top-1 agreement "
         f"{f['worst']['top1_agreement']:.4f}, mean KL {f['worst']['mean_kl']:.2e}." if f else
         "* Noise floor: not measured in this run (see the table above)."),
        "* Differences between recipes smaller than their intervals are noise.",
        "",
        "| recipe | KV cache | perplexity [95 %] | ratio to bf16 [95 %] | top-1 agreement | mean KL | target (upper end of the interval) | CUDA backend ratio [95 %] |",
        "|---|---|---:|---:|---:|---:|---|---|",
        f"| bf16 | bf16 | {ci(b['perplexity'], '.3f')} | 1 | 1 | 0 | | *device run pending* |",
    ]
    for m in r["results"]:
        name = Path(m["ref"]).name
        g = m["gap"]
        target = TARGETS.get(name)
        verdict = ""
        if target:
            hi = g["ppl_ratio"]["ci95"][1]
            verdict = f"≤ {target:.2f}: {'met' if hi <= target else 'missed'} ({hi:.4f})"
        lines.append(f"| {name} | {m['kv_cache']} | {ci(m['perplexity'], '.3f')} | {ci(g['ppl_ratio'], '.4f')} | "
                     f"{ci(g['top1_agreement'], '.3f')} | {g['mean_kl']['value']:.4f} | {verdict} | *device run pending* |")
    lines += ["", "The CUDA column is filled from `scripts/eval_gpu.sh` on the device (CUDA backend against the reference "
              "on each checkpoint, inside the reference's noise floor).", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--noise-floor", type=int, default=2)
    ap.add_argument("--render", type=Path, nargs="+", help="render from these `qtool eval --json` results (one table each) instead of running")
    ap.add_argument("--how", default=None, help="with --render: how the checkpoints and the result were made")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "quality.md")
    a = ap.parse_args()
    if a.render:
        pages = [render(json.loads(p.read_text()), a.how or f"from {p.name}") for p in a.render]
        a.out.write_text(pages[0] + "".join("\n" + pg.split("\n", 2)[2] for pg in pages[1:]))
        print(f"wrote {a.out}")
        return 0
    names = [n.strip() for n in a.recipes.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="qtool-quality-") as tmp:
        cks = []
        for n in names:
            out = Path(tmp) / n
            cmd = [sys.executable, "-m", "qtool", "quantize", *RECIPES[n], "-o", str(out), "--calib-size",
                   str(a.calib_size), "--calib-seq-len", str(a.calib_seq_len), "--force", "--json"]
            print("+", " ".join(cmd), flush=True)
            if subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL).returncode == 0:
                cks.append(str(out))
        cmd = [sys.executable, "-m", "qtool", "eval", *cks, "--baseline", "smollm2-135m", "--backend", "torch",
               "--noise-floor", str(a.noise_floor), "--max-tokens", str(a.tokens), "--window", str(a.window), "--json"]
        print("+", " ".join(cmd), flush=True)
        p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        if p.returncode:
            return p.returncode
        how = (f"one `qtool eval` over fresh checkpoints: calibration {a.calib_size} × {a.calib_seq_len} tokens "
               "of the embedded corpus")
        a.out.write_text(render(json.loads(p.stdout), how))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
