#!/usr/bin/env python3
"""What ModelOpt's HF export costs an AWQ-calibrated model: the calibrated fake-quantized model against the one its
export writes out, both scored like `qtool eval` against the bf16 source.

Contract: ``python3 bench/awq_export_gap.py [--model smollm2-135m] [--quant w4a16-awq] [--algorithm awq_lite]
[--awq-block-size 64] [--calib-size 16] [--calib-seq-len 256] [--max-tokens 4096] [--window 256]
[--cpu-nvfp4] [--search]`` calibrates the model with qtool's own ModelOpt config and calibration batches (as `qtool
quantize`), then scores on the default held-out text (same windows as `qtool eval --max-tokens N --window W`):
- bf16: the source (transformers, float32);
- calibrated: ModelOpt's fake-quantized model as calibrated (each linear with its own AWQ `pre_quant_scale`);
- exported: the same after `requantize_resmooth_fused_llm_layers`, the first step of ModelOpt's HF export (the
  linears sharing an input, q|k|v and gate|up, get one averaged `pre_quant_scale`, folded into the RMSNorm before
  them, and their weights are re-quantized with it): the model the checkpoint holds
  (tests/test_modelopt_vs_reference.py checks qtool's reference against it).
- searched (``--search``): before that re-smoothing, each group's shared `pre_quant_scale` is chosen by
  `choose_shared_scales` (the one of {arithmetic mean (ModelOpt's), geometric mean, each member's own} whose
  group output, fake-quantized, is closest to the unquantized group's on calibration activations; with
  ``--alpha-grid`` also AWQ's scale rule applied to the group as one linear, alpha 0..1 by 0.05); the
  re-smoothing then finds the members equal and keeps it.
Prints perplexity with its 95 % interval and the ratio / top-1 agreement / KL to bf16 of both, paired over the
same windows. ``--cpu-nvfp4`` takes bench/quant_variants.py's CPU NVFP4 operator (ModelOpt 0.47 fake-quantizes
NVFP4 on CUDA only). A measurement, not a recipe: the product is unchanged.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from types import SimpleNamespace


class _HF:
    """A transformers model behind the interface qtool.eval.score runs."""

    def __init__(self, model):
        self.model, self.backend = model, SimpleNamespace(device="cpu")

    def new_cache(self, *args):
        return None

    def forward(self, ids, positions, cache, all_logits=True):
        return self.model(input_ids=ids).logits.float()


def _groups(model) -> list[list]:
    """The linears of each decoder layer that share an input and carry an AWQ pre_quant_scale: q|k|v, gate|up."""
    out = []
    for name, mod in model.named_modules():
        for members in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            ms = [getattr(mod, n, None) for n in members]
            if all(m is not None and getattr(getattr(m, "input_quantizer", None), "pre_quant_scale", None) is not None
                   for m in ms):
                out.append(ms)
    return out


def choose_shared_scales(model, batches, rows: int = 2048, alphas=(), block: int = 64) -> list[str]:
    """Give every group of `_groups` the shared pre_quant_scale with the smallest summed relative output error
    (see the module contract); returns one line per group: the choice and the errors."""
    import torch
    from modelopt.torch.export.quant_utils import _update_pre_quant_scale
    groups = _groups(model)
    seen: dict = {}
    hooks = [g[0].register_forward_pre_hook(
        lambda m, args, key=i: seen.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for i, g in enumerate(groups)]
    with torch.no_grad():
        for b in batches:
            model(**{k: v.to(model.device) for k, v in b.items()})
            if sum(x.shape[0] for x in seen.get(0, [])) >= rows:
                break
    for h in hooks:
        h.remove()
    lines = []
    for i, g in enumerate(groups):
        x = torch.cat(seen[i])[:rows]
        own = [m.input_quantizer.pre_quant_scale.float() for m in g]
        ref = [x.float() @ (m.weight.float() * p).t() for m, p in zip(g, own)]     # the unquantized group
        stack = torch.stack(own)
        cands = {"mean": stack.mean(0), "geomean": stack.log().mean(0).exp(),
                 **{f"own{j}": p for j, p in enumerate(own)}}
        if alphas:            # AWQ's own rule on the group as one linear: 1 / (act_mean^a / w_mean^(1-a)), normalised
            w = torch.cat([m.weight.float() * p for m, p in zip(g, own)])           # the group's rows, unscaled
            blk = w.reshape(-1, block)
            w_mean = (blk.abs() / (blk.abs().amax(1, keepdim=True) + 1e-30)).reshape(w.shape).mean(0)
            act_mean = x.float().abs().mean(0)
            for al in alphas:
                sc_ = (act_mean.pow(al) / (w_mean.pow(1 - al) + 1e-30)).clamp(1e-4, 1e4)
                sc_ = sc_ / (sc_.max() * sc_.min()).sqrt()
                cands[f"a{al:.2f}"] = 1 / sc_
        errs = {}
        for name, s in cands.items():
            e = 0.0
            for m, y in zip(g, ref):
                t = copy.deepcopy(m)
                _update_pre_quant_scale(t, s.to(m.input_quantizer.pre_quant_scale.dtype))
                with torch.no_grad():
                    e += float((t(x).float() - y).square().sum() / y.square().sum())
            errs[name] = e
        best = min(errs, key=errs.get)
        s = cands[best].to(g[0].input_quantizer.pre_quant_scale.dtype)
        for m in g:
            _update_pre_quant_scale(m, s)
        lines.append(f"group {i}: {best} ({', '.join(f'{k} {v:.4g}' for k, v in errs.items())})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quant", default="w4a16-awq")
    ap.add_argument("--algorithm", default="awq_lite")
    ap.add_argument("--awq-block-size", type=int, default=64)
    ap.add_argument("--calib-size", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--cpu-nvfp4", action="store_true")
    ap.add_argument("--search", action="store_true", help="also score the searched shared scales")
    ap.add_argument("--alpha-grid", action="store_true",
                    help="with --search, also try AWQ's scale rule on each group as one linear, alpha 0..1 by 0.05")
    a = ap.parse_args()

    import torch
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    from transformers import AutoModelForCausalLM
    from qtool.calibration import calibration_batches, calibration_texts
    from qtool.eval import DEFAULT_TEXT, stats
    from qtool.eval import score as sc
    from qtool.formats.registry import recipe
    from qtool.quantize import configs, ptq
    from qtool.quantize.progress import Stages
    from qtool.sources import resolve_model_source

    if a.cpu_nvfp4:
        sys.path.insert(0, str(Path(__file__).parent))
        import quant_variants
        quant_variants._install([], cpu_nvfp4=True)
    src = resolve_model_source(a.model).path
    model, tok = ptq.load_model(src)
    cfg = configs.build_config(recipe("weights", a.quant), None, a.awq_block_size, a.algorithm)
    texts = calibration_texts(None, a.calib_size)[0]
    batches = calibration_batches(tok, texts, a.calib_seq_len, 4)
    t0 = time.monotonic()
    with Stages(True) as stages:
        ptq.calibrate(model, cfg, batches, stages, a.quant)
    print(f"calibrated {a.quant} {a.algorithm} {a.calib_size} x {a.calib_seq_len} in {time.monotonic() - t0:.0f} s",
          flush=True)
    calibrated = copy.deepcopy(model).float().eval()
    searched = None
    if a.search:
        searched = copy.deepcopy(model)
        t0 = time.monotonic()
        alphas = [i / 20 for i in range(21)] if a.alpha_grid else ()
        for line in choose_shared_scales(searched, batches, alphas=alphas, block=a.awq_block_size):
            print("  " + line)
        print(f"shared scales chosen in {time.monotonic() - t0:.0f} s", flush=True)
        with torch.no_grad():
            requantize_resmooth_fused_llm_layers(searched)
        searched = searched.float().eval()
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(model)
    exported = model.float().eval()
    bf16 = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()

    def loaded(m, name):
        return sc.Loaded(name, name, "", "hf", "bf16", _HF(m), None, name)
    ids = sc.tokenize(tok, DEFAULT_TEXT.read_text(encoding="utf-8"))
    wins = sc.windows(ids, a.window, a.max_tokens)
    runs = [sc.Run("bf16", loaded(bf16, "bf16")), sc.Run("calibrated", loaded(calibrated, "calibrated")),
            sc.Run("exported", loaded(exported, "exported"))]
    pairs = [("calibrated", "bf16"), ("exported", "bf16"), ("exported", "calibrated")]
    if searched is not None:
        runs.append(sc.Run("searched", loaded(searched, "searched")))
        pairs += [("searched", "bf16"), ("searched", "exported")]
    with torch.inference_mode():
        per_run, per_pair = sc.score(runs, pairs, wins)
    n = sum(len(w) - 1 for w in wins)
    print(f"{a.model} {a.quant} {a.algorithm} block {a.awq_block_size}, calibration {a.calib_size} x {a.calib_seq_len}; "
          f"{n} tokens in {len(wins)} windows of {a.window}")
    for name in [r.name for r in runs]:
        p = stats.perplexity(per_run[name])
        print(f"  {name:>10}: perplexity {p['value']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]")
    for x, y in pairs:
        g = stats.paired(per_run[x], per_run[y], per_pair[(x, y)])
        r = g["ppl_ratio"]
        print(f"  {x} / {y}: ratio {r['value']:.4f} [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}], top-1 agreement "
              f"{g['top1_agreement']['value']:.3f}, KL {g['mean_kl']['value']:.4f}")


if __name__ == "__main__":
    main()
