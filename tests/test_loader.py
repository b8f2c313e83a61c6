"""load_model_weights on tiny checkpoints exported by ModelOpt 0.47 (CPU recipes) and by the test-local
GPTQ / AutoAWQ / DeepSeek packers: every fused or unfused LinearWeights.dequantize() equals the independent
float64 decode of the checkpoint's own tensors (tests/modelopt_decode.py, tests/packers.py) to float32
exactness; fusion is exact (or within the stated requantization error); FP8 holds about half of bf16's bytes.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from qtool.errors import CheckpointError, Unsupported
from qtool.runtime.fusion import fuse
from qtool.runtime.loader import load_model_weights
from qtool.runtime.weights import LinearWeights

import modelopt_decode as MD
import packers

# recipe -> (mtq weight config, mtq KV config, hf quant_algo, expected activation, W4A8 FP8 stage)
RECIPES = {
    "fp8": ("FP8_DEFAULT_CFG", "FP8_KV_CFG", "FP8", "fp8", False),
    "fp8-rowwise": ("FP8_PER_CHANNEL_PER_TOKEN_CFG", None, "FP8_PER_CHANNEL_PER_TOKEN", "fp8-token", False),
    "fp8-block": ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", None, "FP8_PB_WO", "fp8-block", False),
    "nvfp4": ("NVFP4_DEFAULT_CFG", "NVFP4_KV_CFG", "NVFP4", "nvfp4", False),
    "mxfp4": ("MXFP4_DEFAULT_CFG", None, "MXFP4", "mxfp4", False),
    "w4a8-awq": ("W4A8_AWQ_BETA_CFG", None, "W4A8_AWQ", "fp8", True),
}
GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "o": ("self_attn.o_proj",), "down": ("mlp.down_proj",)}


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    cache = {}

    import copy

    import modelopt.torch.quantization as mtq
    # W4A8 AWQ with a coarser awq_lite search (alpha step 0.5): same export format, 2x faster on 2 cores.
    # packers.modelopt_export looks configs up by name on the mtq module, so the variant is registered there.
    fast = copy.deepcopy(mtq.W4A8_AWQ_BETA_CFG)
    fast["algorithm"] = {"method": "awq_lite", "alpha_step": 0.5}
    mtq.QTOOL_TEST_W4A8_AWQ_FAST_CFG = fast

    def get(recipe: str, family: str = "llama"):
        key = (recipe, family)
        if key not in cache:
            cfg, kv, *_ = RECIPES[recipe]
            cfg = "QTOOL_TEST_W4A8_AWQ_FAST_CFG" if cfg == "W4A8_AWQ_BETA_CFG" else cfg
            cache[key] = packers.modelopt_export(tiny_models(family), root / f"{family}-{recipe}", cfg, kv)
        return cache[key]
    return get


def _ref_decode(sd: dict, module: str, algo: str, stage: bool) -> torch.Tensor:
    w = MD.DECODERS[algo](sd, module)
    if stage:   # W4A8 AWQ: FP8 per-tensor stage on the int4 decode (torch's own e4m3 cast)
        s2 = sd[f"{module}.weight_scale_2"].double()
        w = (w.float() / s2.float()).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s2
    return w.float()


def _check_layers(mw, sd: dict, decode):
    for i, layer in enumerate(mw.layers):
        for attr, mods in GROUPS.items():
            lw = getattr(layer, attr)
            got = lw.dequantize()
            ref = torch.cat([decode(sd, f"model.layers.{i}.{m}") for m in mods])
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=2.4e-7, atol=0)      # 2 float32 ulps
        assert torch.equal(layer.input_norm, sd[f"model.layers.{i}.input_layernorm.weight"])
        assert torch.equal(layer.post_attn_norm, sd[f"model.layers.{i}.post_attention_layernorm.weight"])


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_modelopt_exports_load_and_decode(exported, recipe):
    path = exported(recipe)
    _, kv_cfg, algo, activation, stage = RECIPES[recipe]
    sd = MD.load_tensors(path)
    mw = load_model_weights(str(path), progress=False)
    assert mw.config.family == "llama" and mw.config.num_layers == 2
    _check_layers(mw, sd, lambda s, m: _ref_decode(s, m, algo, stage))
    lw = mw.layers[0].qkv
    assert lw.activation == activation and lw.fp8_weight_stage == stage
    assert lw.note.startswith("fused") and lw.parts is None
    assert ("per-row" in lw.note) == (recipe == "fp8")        # only FP8 per-tensor has per-module weight scales
    if activation in ("fp8", "nvfp4"):
        assert torch.equal(lw.input_scale, sd["model.layers.0.self_attn.q_proj.input_scale"])
    assert all(t.device.type == "cpu" for t in lw.tensors.values())        # kept quantized, on the CPU
    assert lw.tensors["weight"].dtype == sd["model.layers.0.self_attn.q_proj.weight"].dtype
    assert mw.kv_format == {"FP8_KV_CFG": "fp8", "NVFP4_KV_CFG": "nvfp4", None: "bf16"}[kv_cfg]
    if kv_cfg:
        for i, layer in enumerate(mw.layers):
            assert layer.k_scale == float(sd[f"model.layers.{i}.self_attn.k_proj.k_scale"])
            assert layer.v_scale == float(sd[f"model.layers.{i}.self_attn.v_proj.v_scale"])
    assert torch.equal(mw.lm_head.dequantize(), sd["lm_head.weight"].float())    # excluded by ModelOpt
    assert recipe.split("-")[0] in mw.scheme_summary or algo.lower() in mw.scheme_summary.lower()


def test_awq_pre_quant_scale_and_input_transform(exported):
    mw = load_model_weights(str(exported("w4a8-awq")), progress=False)
    sd = MD.load_tensors(exported("w4a8-awq"))
    o = mw.layers[0].o
    pqs = sd["model.layers.0.self_attn.o_proj.pre_quant_scale"]
    assert torch.equal(o.pre_quant_scale, pqs)
    x = torch.randn(3, o.in_features)
    xs = x * pqs.float()
    s = sd["model.layers.0.self_attn.o_proj.input_scale"].float()
    ref = (xs / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(o.quantize_input(x), ref)


def test_fp8_holds_about_half_of_bf16(tiny_models, exported):
    bf16 = load_model_weights(str(tiny_models("llama")), progress=False)
    fp8 = load_model_weights(str(exported("fp8")), progress=False)
    ratio = fp8.nbytes() / bf16.nbytes()
    layers = sum(lay.nbytes() for lay in fp8.layers) / sum(lay.nbytes() for lay in bf16.layers)
    assert 0.49 < layers < 0.52          # the quantized decoder layers: 1 byte vs 2 per weight (+ scales, norms)
    assert 0.5 < ratio < 0.62            # tiny model: the bf16 embedding and lm_head weigh relatively more


def test_families_bias_norms_and_tied_embeddings(tiny_models, tmp_path):
    q2 = load_model_weights(str(tiny_models("qwen2")), progress=False)
    sd = MD.load_tensors(tiny_models("qwen2"))
    assert q2.config.qkv_bias and not q2.config.qk_norm
    ref = torch.cat([sd[f"model.layers.1.self_attn.{m}.bias"] for m in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(q2.layers[1].qkv.bias.float(), ref.float())
    q3 = load_model_weights(str(tiny_models("qwen3")), progress=False)
    sd3 = MD.load_tensors(tiny_models("qwen3"))
    assert q3.config.qk_norm and torch.equal(q3.layers[0].k_norm, sd3["model.layers.0.self_attn.k_norm.weight"])
    l3 = load_model_weights(str(tiny_models("llama3")), progress=False)
    assert l3.config.rope_scaling["rope_type"] == "llama3" and l3.config.rope_theta == 500000.0
    from tiny_models import make_tiny_model
    tied = load_model_weights(str(make_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True)),
                              progress=False)
    assert tied.config.tie_word_embeddings and tied.lm_head.tensors["weight"] is tied.embed
    untied_bytes = tied.nbytes() + tied.embed.numel() * 2
    assert tied.nbytes() < untied_bytes


def test_third_party_checkpoints(tiny_models, tmp_path):
    src = tiny_models("llama")
    cases = [("gptq", packers.pack_gptq(src, tmp_path / "gptq", group_size=64).path,
              lambda s, m: packers.decode_gptq(s[m + ".qweight"], s[m + ".qzeros"], s[m + ".scales"],
                                               s[m + ".g_idx"]).float()),
             ("autoawq", packers.pack_autoawq(src, tmp_path / "awq", group_size=64).path,
              lambda s, m: packers.decode_autoawq(s[m + ".qweight"], s[m + ".qzeros"], s[m + ".scales"], 64).float()),
             ("fp8-block", packers.pack_deepseek_fp8(src, tmp_path / "ds").path,
              lambda s, m: packers.decode_deepseek_fp8(s[m + ".weight"], s[m + ".weight_scale_inv"]).float())]
    for fmt, path, decode in cases:
        mw = load_model_weights(str(path), progress=False)
        sd = MD.load_tensors(path)
        assert mw.layers[0].qkv.format == fmt and mw.layers[0].qkv.parts is None
        for i, layer in enumerate(mw.layers):
            for attr, mods in GROUPS.items():
                ref = torch.cat([decode(sd, f"model.layers.{i}.{m}") for m in mods])
                torch.testing.assert_close(getattr(layer, attr).dequantize(), ref, rtol=2.4e-7, atol=0)


# ------------------------------------------------------------------ fusion rules on hand-made parts
def _fp8_part(w: torch.Tensor, scale: float, input_scale: float) -> LinearWeights:
    s = torch.tensor(scale)
    q = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return LinearWeights("fp8", "fp8", w.shape[0], w.shape[1],
                         {"weight": q, "weight_scale": s, "input_scale": torch.tensor(input_scale)})


def test_fp8_fusion_keeps_per_module_scales_exactly():
    torch.manual_seed(0)
    parts = [_fp8_part(torch.randn(n, 64) * a, a * 4 / 448, 0.01 * (1 + k))
             for k, (n, a) in enumerate(((32, 1.0), (16, 0.3), (16, 0.5)))]
    fused = fuse(parts, "q/k/v")
    assert "per-row" in fused.note and "input_scale" in fused.note and fused.activation == "fp8"
    assert fused.tensors["weight_scale"].shape == (64,)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))   # exact
    assert torch.equal(fused.input_scale, torch.tensor(0.03))                          # the max, said in note
    same = fuse([_fp8_part(torch.randn(8, 64), 0.01, 0.02) for _ in range(2)], "gate/up")
    assert same.note == "fused gate/up" and same.tensors["weight_scale"].dim() == 0


def test_requantize_e4m3_code_map_is_exact():
    from qtool.formats import e4m3
    from qtool.runtime.fusion import requantize_e4m3
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    q = codes[torch.randint(0, 256, (4096,))]
    for ratio in (1.0, 0.73, 0.5, 1e-3):
        ref = e4m3(q.float() * ratio).view(torch.uint8)
        assert torch.equal(requantize_e4m3(q, ratio).view(torch.uint8), ref)


def test_nvfp4_fusion_rescales_block_scales(exported):
    sd = MD.load_tensors(exported("nvfp4"))
    mods = [f"model.layers.0.mlp.{m}" for m in ("gate_proj", "up_proj")]
    parts = [LinearWeights("nvfp4", "nvfp4", 512, 256, {r: sd[f"{m}.{r}"].clone() for r in
                                                        ("weight", "weight_scale", "weight_scale_2", "input_scale")},
                           16) for m in mods]
    assert fuse(parts, "gate/up").note == "fused gate/up"       # shared weight_scale_2: plain concatenation
    parts[1].tensors["weight_scale_2"] = parts[1].tensors["weight_scale_2"] * 0.5
    fused = fuse(parts, "gate/up")
    assert "requantized weight_scale to the shared (max) weight_scale_2" in fused.note
    unfused = torch.cat([p.dequantize() for p in parts])
    got = fused.dequantize()
    assert torch.equal(got[:512], unfused[:512])
    rel = ((got[512:] - unfused[512:]).abs() / unfused[512:].abs().clamp(min=1e-12))[unfused[512:] != 0]
    assert rel.max() <= 2 ** -4 + 1e-6                        # one e4m3 rounding of the block scale


def test_unfusable_parts_are_kept_exact():
    torch.manual_seed(1)
    from qtool.formats import encode_int4_awq
    parts = []
    for k in range(2):
        q, s = encode_int4_awq(torch.randn(16, 128), 64)
        parts.append(LinearWeights("int4-awq", "none", 16, 128,
                                   {"weight": q, "weight_scale": s, "pre_quant_scale": torch.rand(128) + k}, 64))
    fused = fuse(parts, "q/k/v")
    assert fused.format == "parts" and "pre_quant_scale" in fused.note
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert fused.nbytes() == sum(p.nbytes() for p in parts)



def test_fusion_follows_the_formats_out_layout():
    """Which tensors fuse along out, on which axis, and the alignment that needs come from recipes/formats.toml's
    shapes: fp8-block scale blocks cover 128 rows (a 64-row part before another cannot share a block: kept as
    parts), int4-awq packs 2 rows per byte along out (6 + 10 rows fuse); fused results decode exactly to the
    parts' decodes stacked."""
    from qtool.formats import encode_int4_awq
    g = torch.Generator().manual_seed(5)

    def block(o):
        w = (torch.rand(o, 256, generator=g) * 8 - 4).to(torch.float8_e4m3fn)
        s = torch.rand(-(-o // 128), 2, generator=g) + 0.5
        return LinearWeights("fp8-block", "fp8-block", o, 256, {"weight": w, "weight_scale_inv": s}, 128)

    ok = [block(128), block(64)]
    fused = fuse(ok, "gate/up")
    assert fused.parts is None and fused.tensors["weight_scale_inv"].shape == (2, 2)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in ok]))
    kept = fuse([block(64), block(128)], "gate/up")
    assert kept.format == "parts" and "multiple of 128" in kept.note
    parts = []
    for o in (6, 10):
        q, s = encode_int4_awq(torch.randn(o, 128, generator=g), 64)
        parts.append(LinearWeights("int4-awq", "none", o, 128, {"weight": q, "weight_scale": s}, 64))
    fused = fuse(parts, "q/k/v")
    assert fused.parts is None and fused.tensors["weight"].shape == (8, 128)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))

# ------------------------------------------------------------------ errors and warnings
def test_missing_kv_scales_default_to_one(exported, tmp_path):
    from safetensors.torch import load_file, save_file
    src = exported("fp8")
    dst = tmp_path / "nokv"
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.endswith(("k_scale", "v_scale"))}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    mw = load_model_weights(str(dst), progress=False)
    assert mw.kv_format == "fp8" and mw.layers[0].k_scale == 1.0 and mw.layers[1].v_scale == 1.0
    assert mw.kv_scale_defaults == [0, 1] and "layer(s) 0-1 of 2" in mw.kv_scale_warning("fp8")


def test_unknown_family_and_bad_checkpoint(tiny_models, tmp_path):
    dst = tmp_path / "gpt2ish"
    shutil.copytree(tiny_models("llama"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Unsupported, match="gpt2"):
        load_model_weights(str(dst), progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models("llama"), broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        load_model_weights(str(broken), progress=False)


def test_hub_id_downloads_or_fails_in_one_line(tiny_models, monkeypatch):
    import huggingface_hub

    from qtool import sources
    from qtool.errors import Failure
    calls = []
    monkeypatch.setattr(sources, "_hub_offline_reason", lambda: None)

    def fake_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tiny_models("llama"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    mw = load_model_weights("someorg/tiny-llama", progress=False)
    assert mw.source == "someorg/tiny-llama" and calls[0][0] == "someorg/tiny-llama"
    assert "*.safetensors" in calls[0][1]

    def offline(repo_id, **kw):
        raise OSError("network unreachable")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(Failure, match="someorg/other"):
        load_model_weights("someorg/other", progress=False)


def test_partly_excluded_group_stays_as_exact_parts(tiny_models, tmp_path):
    """A ModelOpt FP8 export with one q_proj left in bf16: layer 0's q|k|v cannot be fused (bf16 + fp8), so it is
    kept as parts whose decodes still equal the checkpoint's; the other layers fuse normally."""
    import copy

    import modelopt.torch.quantization as mtq
    import transformers as tf
    from modelopt.torch.export import export_hf_checkpoint
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.bfloat16)
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*layers.0.self_attn.q_proj*", "enable": False})
    batch = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    mtq.quantize(model, cfg, lambda m: m(input_ids=batch))
    export_hf_checkpoint(model, export_dir=str(tmp_path / "mixed"))
    mw = load_model_weights(str(tmp_path / "mixed"), progress=False)
    sd = MD.load_tensors(tmp_path / "mixed")
    qkv0 = mw.layers[0].qkv
    assert qkv0.format == "parts" and [p.format for p in qkv0.parts] == ["bf16", "fp8", "fp8"]
    assert any("parts" in n for n in mw.notes)
    ref = torch.cat([sd["model.layers.0.self_attn.q_proj.weight"].float(),
                     MD.fp8(sd, "model.layers.0.self_attn.k_proj").float(),
                     MD.fp8(sd, "model.layers.0.self_attn.v_proj").float()])
    torch.testing.assert_close(qkv0.dequantize(), ref, rtol=2.4e-7, atol=0)
    assert mw.layers[1].qkv.format == "fp8" and mw.layers[1].qkv.parts is None
    assert qkv0.nbytes() == sum(p.nbytes() for p in qkv0.parts)
