#!/usr/bin/env python3
"""Rounding error of the KV-cache formats on a model's real K and V, for the NVFP4-KV row of docs/quality.md.

Contract: ``python bench/kv_rounding.py MODEL_FOLDER [--tokens 1024]`` runs the bf16 model (transformers, float32
on CPU) over the first TOKENS tokens of qtool's held-out evaluation text, takes every layer's cached K (after RoPE)
and V, and prints as JSON the relative RMS error ‖q(x) − x‖ / ‖x‖ of
- fp8: E4M3 with one per-tensor scale amax / 448 per layer and K/V (FP8_KV_CFG, max calibration);
- nvfp4: E2M1 with an E4M3 scale per 16 head-dim elements and a global scale amax / (6 · 448) per layer and K/V
  (NVFP4_KV_CFG, ModelOpt's NVFP4QTensor arithmetic),
averaged over layers, for K and V, plus the same for the model's decoder-layer linear weights, so the noise NVFP4
KV adds can be set beside the noise of NVFP4 and FP8 weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=1024)
    a = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fake_weights import LINEAR, round_trip

    from qtool.eval.evaluate import read_text
    tok = AutoTokenizer.from_pretrained(str(a.model))
    model = AutoModelForCausalLM.from_pretrained(str(a.model), dtype=torch.float32).eval()
    ids = tok(read_text(None)[0], return_tensors="pt").input_ids[:, : a.tokens]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values

    def rel(q, x):
        return float((q - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt())

    out = {"tokens": int(ids.shape[1]), "kv": {}, "weights": {}}
    for name in ("k", "v"):
        for fmt in ("fp8", "nvfp4"):
            errs = []
            for layer in cache.layers:
                x = (layer.keys if name == "k" else layer.values).float()
                flat = x.reshape(-1, x.shape[-1])
                errs.append(rel(round_trip(flat, fmt, 16), flat))
            out["kv"][f"{name}/{fmt}"] = sum(errs) / len(errs)
    for fmt in ("fp8", "nvfp4"):
        errs = [rel(round_trip(p.data.float(), fmt, 16), p.data.float())
                for n, p in model.named_parameters() if LINEAR.search(n)]
        out["weights"][fmt] = sum(errs) / len(errs)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
