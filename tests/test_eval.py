"""`qtool eval`: perplexity, baseline comparison and noise floor against transformers (an independent forward).

The reference numbers come from Hugging Face transformers running the same checkpoint in float32 on the same
windows, computed here with plain torch; qtool's numbers come from its runtime (qtool.eval → runtime.Model).
"""
from __future__ import annotations

import json
import math
import re

import pytest

from cli_helpers import run_qtool
from tiny_models import make_tiny_model

TEXT = ("Quantization maps floating point weights to fewer bits. The capital of France is Paris. "
        "A small language model predicts the next token from the previous ones, one step at a time. "
        "Water boils at one hundred degrees Celsius at sea level; ice melts at zero degrees. ") * 6


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    other = make_tiny_model("llama", root / "other", seed=7)      # same tokenizer, other weights
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return tiny_models("llama"), other, text


def _hf_windows(path, ids, window):
    """Per-window float32 log-probabilities of the T-1 predicted tokens, from transformers."""
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), window):
            w = ids[i:i + window]
            if len(w) < 2:
                continue
            logits = m(torch.tensor([w])).logits[0, :-1]
            out.append((torch.log_softmax(logits.double(), -1), torch.tensor(w[1:])))
    return out


def test_perplexity_gap_and_floor_match_transformers(setup):
    from transformers import AutoTokenizer
    from qtool.eval.evaluate import EvalRequest, evaluate
    model, other, text = setup
    ids = AutoTokenizer.from_pretrained(str(model))(TEXT, add_special_tokens=False)["input_ids"]
    window, max_tokens = 48, 200
    r = evaluate(EvalRequest(models=[str(other)], text=text, window=window, max_tokens=max_tokens,
                             baseline=str(model), noise_floor=2, show_progress=False))
    ids = ids[:max_tokens]
    hm, hb = _hf_windows(other, ids, window), _hf_windows(model, ids, window)
    n = sum(len(t) for _, t in hm)
    nll_m = -sum(lp.gather(1, t[:, None]).sum().item() for lp, t in hm)
    nll_b = -sum(lp.gather(1, t[:, None]).sum().item() for lp, t in hb)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for (a, _), (b, _) in zip(hm, hb)) / n
    kl = sum((b.exp() * (b - a)).sum().item() for (a, _), (b, _) in zip(hm, hb)) / n

    assert r["text"]["tokens_scored"] == n and r["text"]["windows"] == len(hm)
    res = r["results"][0]
    assert res["perplexity"]["value"] == pytest.approx(math.exp(nll_m / n), rel=2e-3)
    assert r["baseline"]["perplexity"]["value"] == pytest.approx(math.exp(nll_b / n), rel=2e-3)
    gap = res["gap"]
    assert gap["ppl_ratio"]["value"] == pytest.approx(math.exp((nll_m - nll_b) / n), rel=2e-3)
    assert gap["top1_agreement"]["value"] == pytest.approx(agree, abs=2 / n)
    assert gap["mean_kl"]["value"] == pytest.approx(kl, rel=2e-2, abs=1e-4)
    for est in (res["perplexity"], gap["ppl_ratio"], gap["top1_agreement"], gap["mean_kl"]):
        lo, hi = est["ci95"]
        assert lo <= est["value"] <= hi and lo < hi
    # the floor: a bf16 model in float32 barely moves under a 2^-20 input perturbation; different weights do
    f = r["noise_floor"]
    assert f["runs"] == 2 and len(f["pairs"]) == 6                      # baseline, floor1, floor2, floor_sum64
    assert ["floor_sum64", "baseline"] in [q["pair"] for q in f["pairs"]]
    assert f["worst"]["top1_agreement"] > 0.97 and f["worst"]["mean_kl"] < 1e-4
    assert abs(math.log(f["worst"]["ppl_ratio"])) < 1e-3
    assert f["worst"]["mean_kl"] < gap["mean_kl"]["value"]
    assert res["within_floor"]["mean_kl"] is False


def test_model_against_itself_is_exact(setup):
    from qtool.eval.evaluate import EvalRequest, evaluate
    model, _, text = setup
    r = evaluate(EvalRequest(models=[str(model)], text=text, window=32, max_tokens=128, baseline=str(model),
                             show_progress=False))
    gap = r["results"][0]["gap"]
    assert gap["ppl_ratio"]["value"] == 1.0 and gap["ppl_ratio"]["ci95"] == [1.0, 1.0]
    assert gap["top1_agreement"]["value"] == 1.0 and abs(gap["mean_kl"]["value"]) < 1e-9


def test_cli_json_and_text(setup):
    model, other, text = setup
    p = run_qtool("eval", str(model), str(other), "--text", str(text), "--window", "64", "--max-tokens", "128",
                  "--baseline", str(model), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert [x["ref"] for x in r["results"]] == [str(model), str(other)]
    assert r["results"][0]["gap"]["ppl_ratio"]["value"] == 1.0
    p = run_qtool("eval", str(model), "--text", str(text), "--window", "64", "--max-tokens", "128")
    assert p.returncode == 0, p.stderr
    assert re.search(r"perplexity \d+\.\d+ \[\d+\.\d+, \d+\.\d+\]", p.stdout)


def test_cli_usage_errors(setup, tmp_path):
    model, _, _ = setup
    p = run_qtool("eval", str(model), "--text", str(tmp_path / "missing.txt"))
    assert p.returncode == 2 and p.stderr.startswith("error: --text file not found") and "Traceback" not in p.stderr
    p = run_qtool("eval", str(tmp_path / "nope"))
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_default_text_is_held_out_and_large():
    """The default evaluation text shares no 12-word sequence with the calibration corpus, and is big enough."""
    from qtool.calibration import calibration_texts
    from qtool.eval import DEFAULT_TEXT
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    assert len(text) > 150_000

    def shingles(s, n=12):
        w = re.findall(r"\w+", s.lower())
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    calib = set()
    for t in calibration_texts(None, 100000)[0]:
        calib |= shingles(str(t))
    assert len(calib) > 50_000                      # the check sees the whole corpus (pydoc_data included)
    assert not shingles(text) & calib


def test_bootstrap_interval_independent():
    """stats.perplexity's interval against a direct numpy-free recomputation of the same resamples."""
    import random
    from qtool.eval import stats
    wins = [(float(10 + i % 7), 5) for i in range(20)]
    est = stats.perplexity(wins)
    assert est["value"] == pytest.approx(math.exp(sum(w[0] for w in wins) / 100))
    rng = random.Random(stats.SEED)
    vals = []
    for _ in range(stats.BOOTSTRAP):
        idx = [rng.randrange(20) for _ in range(20)]
        vals.append(math.exp(sum(wins[i][0] for i in idx) / (5 * 20)))
    vals.sort()
    assert est["ci95"][0] == pytest.approx(vals[int(0.025 * (len(vals) - 1))])
    assert est["ci95"][1] == pytest.approx(vals[math.ceil(0.975 * (len(vals) - 1))])


def test_quantize_eval_recorded_and_inspected(setup, tmp_path):
    """quantize --eval: qtool.json's record, its source perplexity against transformers, inspect shows it;
    the exported tokenizer.json keeps no calibration truncation (a prompt longer than --calib-seq-len stays whole)."""
    from qtool.eval import DEFAULT_TEXT
    model, _, _ = setup
    out = tmp_path / "q"
    p = run_qtool("quantize", "--model", str(model), "--quant", "fp8", "-o", str(out), "--calib-size", "4",
                  "--calib-seq-len", "16", "--eval", "--eval-tokens", "96", "--json")
    assert p.returncode == 0, p.stderr
    rec = json.loads((out / "qtool.json").read_text())["eval"]
    assert json.loads(p.stdout)["eval"] == rec
    assert rec["tokens"] == 96 - 1 and rec["window"] == 256 and rec["backend"] == "torch"
    tj = json.loads((out / "tokenizer.json").read_text())
    assert tj["truncation"] is None and tj["padding"] is None
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(str(model))(DEFAULT_TEXT.read_text(encoding="utf-8"),
                                                      add_special_tokens=False)["input_ids"][:96]
    (lp, t), = _hf_windows(model, ids, 256)
    assert rec["source_perplexity"]["value"] == pytest.approx(math.exp(-lp.gather(1, t[:, None]).sum().item() / 95),
                                                              rel=2e-3)
    assert 0.9 < rec["gap"]["ppl_ratio"]["value"] < 1.1 and rec["gap"]["top1_agreement"]["value"] > 0.5
    p = run_qtool("inspect", str(out), "--json")
    assert json.loads(p.stdout)["eval"] == rec
    p = run_qtool("inspect", str(out))
    assert "Eval " in p.stdout and "vs source" in p.stdout


def test_quantize_algorithm_choices(setup, tmp_path):
    """--algorithm: recipes/algorithms.toml into ModelOpt's config; refusals before loading (exit 2)."""
    import modelopt.torch.quantization as mtq
    from qtool.formats.registry import recipe
    from qtool.quantize.configs import algorithms, build_config
    w = lambda name: recipe("weights", name)   # noqa: E731
    assert build_config(w("w4a16-awq"), None, 64, "awq_clip")["algorithm"] == {"method": "awq_clip"}
    assert build_config(w("fp8"), None, None, "mse")["algorithm"] == {"method": "mse"}
    nv = build_config(w("nvfp4"), None, None, "awq_full")
    assert nv["algorithm"] == mtq.NVFP4_AWQ_FULL_CFG["algorithm"] and nv["quant_cfg"] == mtq.NVFP4_AWQ_FULL_CFG["quant_cfg"]
    assert build_config(w("fp8"), None)["algorithm"] == mtq.FP8_DEFAULT_CFG["algorithm"]
    assert set(algorithms()) >= {"max", "mse", "awq_lite", "awq_full", "awq_clip"}
    model, _, _ = setup
    p = run_qtool("quantize", "--model", str(model), "--quant", "fp8", "--algorithm", "awq_full", "-o",
                  str(tmp_path / "x"))
    assert p.returncode == 2 and "does not apply to --quant fp8" in p.stderr and not (tmp_path / "x").exists()
    p = run_qtool("quantize", "--model", str(model), "--quant", "fp8", "--algorithm", "nope", "-o", str(tmp_path / "x"))
    assert p.returncode == 2 and "unknown --algorithm" in p.stderr


def test_sum64_linear_is_the_float64_sum_rounded_once(setup):
    """The floor's float64-summed reference: each linear equals x̂ @ W^T computed in float64 (numpy, independent of
    torch's matmul) and rounded once to float32, and differs from the float32 matmul somewhere."""
    import numpy as np
    import torch
    from qtool.eval import score as sc
    model, _, _ = setup
    m = sc.load_model(str(model), "torch", progress=False).model
    be = m.backend
    lw = m.weights.layers[0].gate_up
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, lw.in_features, generator=g)
    w = be._w[id(lw)] if lw.parts is None else None
    if w is None:
        pytest.skip("gate/up stored unfused in this tiny model")
    want = (lw.quantize_input(x).numpy().astype(np.float64) @ w.numpy().astype(np.float64).T).astype(np.float32)
    plain = be.linear(x, lw)
    be.sum64 = True
    try:
        got = be.linear(x, lw)
    finally:
        be.sum64 = False
    assert np.array_equal(got.numpy(), want)
    assert not torch.equal(plain, got)
    from qtool.runtime.backends.torch_ref import _sum64
    assert np.array_equal(_sum64(lw.quantize_input(x), w, rows=7).numpy(), want)     # in blocks of 7 rows
