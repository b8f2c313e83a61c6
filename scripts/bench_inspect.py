#!/usr/bin/env python
"""Time `qtool inspect` (headers only) on big-tensor-count checkpoints; prints a table.

Contract: builds, in a temporary folder, (1) a 4-shard NVFP4 ModelOpt-layout checkpoint with the
tensor count of a 32-layer Llama (8B-like names, small dimensions; header reading scales with the
number of tensors, not their size), (2) the same with Llama-3.1-8B's real dimensions (sparse
files: the data is never written), (3) a SmolLM2-135M-shaped bf16 folder; and times any
checkpoint folders given with --ckpt (e.g. a `qtool quantize` SmolLM2 export). For each it
reports the in-process time (open_checkpoint + describe + soundness + sizes + report, median of
5) and the wall time of a `qtool inspect --json` subprocess (median of 3, Python start included).
Usage: python scripts/bench_inspect.py [--ckpt PATH ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BITS = {"BF16": 16, "F32": 32, "F8_E4M3": 8, "U8": 8}


def write_sparse_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A valid safetensors file whose data region is a hole (sparse): only the header is written."""
    header, off = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = 1
        for d in shape:
            n *= d
        nbytes = n * BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)


def llama_tensors(layers, hidden, inter, heads, kv_heads, head_dim, vocab, fmt, tied=False):
    def linear(name, out, inp):
        if fmt == "bf16":
            return {f"{name}.weight": ("BF16", (out, inp))}
        return {f"{name}.weight": ("U8", (out, inp // 2)), f"{name}.weight_scale": ("F8_E4M3", (out, inp // 16)),
                f"{name}.weight_scale_2": ("F32", ()), f"{name}.input_scale": ("F32", ())}
    t = {"model.embed_tokens.weight": ("BF16", (vocab, hidden)), "model.norm.weight": ("BF16", (hidden,))}
    if not tied:
        t["lm_head.weight"] = ("BF16", (vocab, hidden))
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = ("BF16", (hidden,))
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", (hidden,))
        for n, o, k in (("self_attn.q_proj", heads * head_dim, hidden), ("self_attn.k_proj", kv_heads * head_dim, hidden),
                        ("self_attn.v_proj", kv_heads * head_dim, hidden), ("self_attn.o_proj", hidden, heads * head_dim),
                        ("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden), ("mlp.down_proj", hidden, inter)):
            t.update(linear(f"{p}.{n}", o, k))
        if fmt != "bf16":
            t[f"{p}.self_attn.k_proj.k_scale"] = ("F32", ())
            t[f"{p}.self_attn.v_proj.v_scale"] = ("F32", ())
    return t


def build(folder: Path, dims: dict, fmt: str, shards: int) -> Path:
    folder.mkdir(parents=True)
    tensors = llama_tensors(fmt=fmt, **dims)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        write_sparse_safetensors(folder / fname, part)
        weight_map.update({n: fname for n in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dims["hidden"],
           "intermediate_size": dims["inter"], "num_hidden_layers": dims["layers"],
           "num_attention_heads": dims["heads"], "num_key_value_heads": dims["kv_heads"], "head_dim": dims["head_dim"],
           "vocab_size": dims["vocab"], "tie_word_embeddings": dims.get("tied", False), "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg))
    if fmt != "bf16":
        (folder / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.47.0"},
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                             "exclude_modules": ["lm_head", "model.embed_tokens"]}}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return folder


def time_in_process(path: Path, repeat: int = 5) -> tuple[float, dict]:
    from qtool.checkpoint import report, soundness
    from qtool.checkpoint.files import open_checkpoint
    from qtool.checkpoint.scheme import describe
    from qtool.checkpoint.sizes import sizes
    times, rep = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        files = open_checkpoint(str(path), strict=False)
        scheme = describe(files, strict=False)
        problems, notes = soundness.check(files, scheme)
        rep = report.build(files, scheme, sizes(files, scheme), problems, notes)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rep


def time_cli(path: Path | None, repeat: int = 3) -> float:
    """Median wall time of `qtool inspect PATH --json` (of `qtool --version` when path is None)."""
    times = []
    cmd = ["inspect", str(path), "--json"] if path else ["--version"]
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qtool", *cmd], capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", action="append", default=[], help="also time this checkpoint folder")
    args = ap.parse_args()
    tiny = dict(layers=32, hidden=256, inter=512, heads=4, kv_heads=2, head_dim=64, vocab=384)
    l8b = dict(layers=32, hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)
    smol = dict(layers=30, hidden=576, inter=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("32-layer NVFP4, tiny dims, 4 shards", build(Path(tmp) / "a", tiny, "nvfp4", 4)),
                 ("32-layer NVFP4, Llama-3.1-8B dims, 4 shards", build(Path(tmp) / "b", l8b, "nvfp4", 4)),
                 ("SmolLM2-135M-shaped bf16, 1 file", build(Path(tmp) / "c", smol, "bf16", 1))]
        cases += [(f"{Path(p).name} (given)", Path(p)) for p in args.ckpt]
        for label, path in cases:
            t_in, rep = time_in_process(path)
            t_cli = time_cli(path)
            rows.append((label, rep["files"]["tensors"], len(rep["files"]["shards"]), rep["sizes"]["bytes_on_disk"],
                         t_in, t_cli, len(rep["problems"])))
    print(f"CLI start-up alone (qtool --version): {time_cli(None):.2f}s")
    print(f"{'checkpoint':48} {'tensors':>7} {'shards':>6} {'bytes':>14} {'in-process':>11} {'CLI wall':>9} {'problems':>8}")
    for label, n, sh, b, t_in, t_cli, pr in rows:
        print(f"{label:48} {n:7d} {sh:6d} {b:14,d} {t_in * 1000:9.1f}ms {t_cli:8.2f}s {pr:8d}")


if __name__ == "__main__":
    main()
