"""ModelOpt's fake-quantized model against qtool's reference backend on the checkpoint ModelOpt exported.

For each recipe ModelOpt can fake-quantize on a CPU (FP8 family, FP8 KV, INT4 AWQ / GPTQ): calibrate a tiny llama with qtool's own ModelOpt config
(`qtool.quantize.configs.build_config`) and calibration batches, export it (`qtool.quantize.export`), then score
the same windows of held-out text with (a) ModelOpt's fake-quantized model in the state its export writes out
(`exported_fake_quant`: after the export's re-smoothing of the linears that share an input; transformers
forward, float32) and
(b) qtool's float32 reference backend on the exported checkpoint, plus the bf16 source (transformers). The two
implementations of one quantization must agree in perplexity: ratio qtool/ModelOpt within 1 % with its 95 %
interval inside [0.98, 1.02]; and be closer to each other than the quantization is to bf16 (KL(ModelOpt ‖ qtool)
< KL(bf16 ‖ ModelOpt)). Top-1 agreement is printed, not asserted: a tiny random model's flat distributions and
FP8 activations make argmax flips cheap (qtool against itself, embeddings x (1 + 2^-20 randn): 0.92-0.97).
Measured numbers and the known systematic differences: docs/numerics.md ("qtool's reference against ModelOpt's
fake quantization").
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from qtool.eval import stats

CASES = [("fp8", None, None), ("fp8-rowwise", None, None), ("fp8-block", None, None), ("fp8", "fp8", None),
         ("w4a16-awq", None, None), ("w4a16-awq", None, "awq_full"), ("w4a8-awq", None, None),
         ("w4a16-gptq", None, None)]       # what ModelOpt 0.47 fake-quantizes on a CPU; the rest: tests/gpu/


class _HF:
    """A transformers model behind the interface qtool.eval.score runs (forward with all_logits)."""

    def __init__(self, model, device: str = "cpu"):
        self.model, self.backend = model, SimpleNamespace(device=device)

    def new_cache(self, *args):
        return None

    def forward(self, ids, positions, cache, all_logits=True):
        return self.model(input_ids=ids).logits.float()


def _loaded(model, name):
    from qtool.eval.score import Loaded
    return Loaded(name, name, "", "hf", "bf16", model, None, name)


@pytest.mark.parametrize("quant,kv,algorithm", CASES)
def test_modelopt_fake_quant_matches_reference(tiny_models, tmp_path, quant, kv, algorithm):
    compare(tiny_models("llama"), tmp_path, quant, kv, algorithm)


def exported_fake_quant(model):
    """A copy of the calibrated ``model`` in the state ModelOpt's HF export writes out, still fake-quantized: the
    export first runs ``requantize_resmooth_fused_llm_layers``, which gives the linears that share an input (q|k|v,
    gate|up) one input scale and, for AWQ, one ``pre_quant_scale`` (folded into the RMSNorm before them) and
    re-quantizes their weights with it. The checkpoint therefore holds that model, not the calibrated one (docs/
    numerics.md, "qtool's reference against ModelOpt's fake quantization", item 5)."""
    import torch
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    m = copy.deepcopy(model)
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(m)
    return m


def compare(src, tmp_path, quant: str, kv: str | None = None, algorithm: str | None = None,
            block_size: int | None = None, bound: float = 0.01):
    """Calibrate ``src`` with qtool's ModelOpt config for (quant, kv, algorithm) on the machine's device, export
    it, and assert qtool's reference on the export agrees with ModelOpt's fake quantization: perplexity ratio
    within ``bound`` with its 95 % interval inside [1 - 2 bound, 1 + 2 bound], and KL(ModelOpt || qtool) below the
    quantization's own KL(bf16 || ModelOpt). Returns the printed line."""
    import torch
    from transformers import AutoModelForCausalLM
    from qtool.calibration import calibration_batches, calibration_texts
    from qtool.eval import DEFAULT_TEXT
    from qtool.formats.registry import recipe
    from qtool.eval import score as sc
    from qtool.quantize import configs, export, ptq
    from qtool.quantize.progress import Stages

    model, tok = ptq.load_model(src)
    dev = str(ptq.input_device(model))
    cfg = configs.build_config(recipe("weights", quant), recipe("kv", kv) if kv else None, block_size, algorithm)
    batches = calibration_batches(tok, calibration_texts(None, 16)[0], 64, 4)
    with Stages(False) as stages:
        ptq.calibrate(model, cfg, batches, stages, quant)
    out = tmp_path / quant
    out.mkdir()
    calibrated = copy.deepcopy(model).float().eval()  # ModelOpt's export changes the model it exports
    fake = exported_fake_quant(model).float().eval()
    export.export_checkpoint(model, tok, src, out)

    qt = sc.load_model(str(out), "torch", progress=False)
    ids = sc.tokenize(qt.tokenizer, DEFAULT_TEXT.read_text(encoding="utf-8"))
    wins = sc.windows(ids, 128, 2048)
    bf16 = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(dev).eval()
    runs = [sc.Run("modelopt", _loaded(_HF(fake, dev), "modelopt")), sc.Run("qtool", qt),
            sc.Run("bf16", _loaded(_HF(bf16, dev), "bf16")), sc.Run("calibrated", _loaded(_HF(calibrated, dev), "cal"))]
    per_run, per_pair = sc.score(runs, [("qtool", "modelopt"), ("modelopt", "bf16"), ("modelopt", "calibrated")], wins)
    same = stats.paired(per_run["qtool"], per_run["modelopt"], per_pair[("qtool", "modelopt")])
    quant_gap = stats.paired(per_run["modelopt"], per_run["bf16"], per_pair[("modelopt", "bf16")])
    resmooth = stats.paired(per_run["modelopt"], per_run["calibrated"], per_pair[("modelopt", "calibrated")])
    ppl_mo, ppl_qt = stats.perplexity(per_run["modelopt"]), stats.perplexity(per_run["qtool"])
    line = (f"{quant} kv={kv} algorithm={algorithm} on {dev}: ModelOpt {ppl_mo['value']:.3f} {ppl_mo['ci95']}, "
            f"qtool {ppl_qt['value']:.3f} {ppl_qt['ci95']}, ratio {same['ppl_ratio']}, KL "
            f"{same['mean_kl']['value']:.2e} vs quantization KL {quant_gap['mean_kl']['value']:.2e}, agreement "
            f"{same['top1_agreement']['value']:.4f}; ModelOpt's export re-smoothing alone: ratio "
            f"{resmooth['ppl_ratio']['value']:.4f}, KL {resmooth['mean_kl']['value']:.2e}")
    print(line)
    lo, hi = same["ppl_ratio"]["ci95"]
    assert abs(same["ppl_ratio"]["value"] - 1) < bound and 1 - 2 * bound < lo <= hi < 1 + 2 * bound, line
    assert same["mean_kl"]["value"] < quant_gap["mean_kl"]["value"], line
    return line
