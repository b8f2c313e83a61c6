#!/usr/bin/env python3
"""Run `qtool quantize` once per recipe, each in a fresh process, and print a markdown table.

Contract: `quantize_bench.py --model DIR --label NAME --out ROOT [--recipes a,b,…] [--calib-size N]
[--calib-seq-len N] [--awq-block-size N] [--json FILE]` quantizes the model with every recipe of
recipes/recipes.toml (or the given ones; `fp8+kv-fp8` / `fp8+kv-nvfp4` add a KV recipe), always
with --force (so recipes a matrix refuses for this family/GPU still run; the table says which
were forced), records the exit code, wall time and peak memory from qtool.json, deletes each
checkpoint after reading it (unless --keep), and never stops at a failure: a failed recipe is
printed loudly with the tail of its stderr and marked FAILED in the table. Exit code 1 when any
recipe failed. `--make-llama8b DIR` first writes a Llama-3.1-8B-shaped random-weight bf16 model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALL = ["fp8", "fp8-rowwise", "fp8-block", "nvfp4", "mxfp4", "w4a16-awq", "w4a8-awq", "w4a16-gptq", "w4a8-gptq",
       "fp8+kv-fp8", "fp8+kv-nvfp4"]


def make_llama8b(path: Path) -> Path:
    """Llama-3.1-8B shapes (hidden 4096, 14336, 32 layers, 32/8 heads, vocab 128256), random bf16 weights."""
    import torch
    import transformers as tf
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_tokenizer

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg.architectures = ["LlamaForCausalLM"]
    tok = make_tokenizer(path, 384)             # ids < 384 are valid in the 128256-token vocabulary
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        model = tf.LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0)
    model.save_pretrained(path)
    del model
    return path


def run_one(model: str, recipe: str, out: Path, args) -> dict:
    quant, _, kv = recipe.partition("+kv-")
    cmd = [sys.executable, "-m", "qtool", "quantize", "--model", model, "--quant", quant, "-o", str(out),
           "--force", "--json", "--calib-size", str(args.calib_size), "--calib-seq-len", str(args.calib_seq_len),
           "--awq-block-size", str(args.awq_block_size)]
    if kv:
        cmd += ["--kv-cache-quant", kv]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=os.environ.copy())
    wall = time.perf_counter() - t0
    row = {"recipe": recipe, "rc": proc.returncode, "process_wall_s": round(wall, 1)}
    if proc.returncode == 0:
        m = json.loads((out / "qtool.json").read_text())
        row.update(wall_time_s=m["wall_time_s"], rss_mib=m["peak_memory"]["rss_mib"],
                   gpu_mib=m["peak_memory"].get("cuda_max_allocated_mib"), format=m["format"],
                   forced=m["forced"], calib_s=m["calibration"]["seconds"], export_s=m["timings_s"]["export"], cpu_s=m["timings_s"].get("cpu_user_sys"),
                   size_mib=round(sum(p.stat().st_size for p in out.iterdir()) / 2**20, 1), device=m["device"])
    else:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        row["error"] = tail.splitlines()[-1] if tail else f"exit {proc.returncode}"
        print(f"\n!!!!! FAILED: {recipe} (exit {proc.returncode})\n{tail}\n", file=sys.stderr, flush=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def table(label: str, rows: list[dict], args) -> str:
    head = (f"\n**{label}** (calib {args.calib_size} samples × {args.calib_seq_len} tokens, one fresh process per recipe)\n\n"
            "| recipe | result | format | wall s (qtool) | process s | CPU s | calib s | export s | peak RSS MiB | peak GPU MiB | size MiB | forced |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r["rc"] == 0:
            gpu = f"{r['gpu_mib']:.0f}" if r.get("gpu_mib") is not None else "–"
            lines.append(f"| {r['recipe']} | ok | {r['format']} | {r['wall_time_s']:.1f} | {r['process_wall_s']:.1f} | "
                         f"{r.get('cpu_s') or 0:.1f} | {r['calib_s']:.1f} | {r['export_s']:.1f} | {r['rss_mib']:.0f} | {gpu} | {r['size_mib']} | "
                         f"{'yes' if r['forced'] else 'no'} |")
        else:
            err = r.get("error", "").replace("|", "/")[:120]
            lines.append(f"| {r['recipe']} | **FAILED** (exit {r['rc']}): {err} | | | {r['process_wall_s']:.1f} | | | | | | | |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (or smollm2-135m)")
    ap.add_argument("--make-llama8b", type=Path, help="write a Llama-3.1-8B-shaped random model here and use it")
    ap.add_argument("--label", default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qtool-bench"))
    ap.add_argument("--recipes", default=",".join(ALL))
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--awq-block-size", type=int, default=128)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, help="append the rows as JSON lines to this file")
    args = ap.parse_args()
    model = args.model
    if args.make_llama8b:
        t0 = time.perf_counter()
        model = str(make_llama8b(args.make_llama8b))
        print(f"llama-3.1-8b-shaped random model ready in {time.perf_counter() - t0:.0f} s: {model}", file=sys.stderr)
    if not model:
        ap.error("--model or --make-llama8b is required")
    label = args.label or Path(model).name
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for recipe in [r for r in args.recipes.split(",") if r]:
        print(f"== {label}: {recipe}", file=sys.stderr, flush=True)
        row = run_one(model, recipe, args.out / f"{label}-{recipe}".replace("+", "_"), args)
        row["model"] = label
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(label, rows, args), flush=True)
    return 1 if any(r["rc"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
