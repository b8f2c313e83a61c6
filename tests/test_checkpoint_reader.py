"""Tests of qtool/checkpoint/{files,scheme,sizes}.py against independent references.

References: the safetensors library (tensor names, dtypes, shapes, bytes), real ModelOpt 0.47
exports of a tiny llama (what ModelOpt wrote), checkpoints written by tests/packers.py from the
layouts in shared/reference/checkpoint-formats.md, and the expectations of that reference's
tables (§2.1 quant_algo per config, §3 layouts) typed in here.
"""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from packers import MODELOPT_CASES, modelopt_ckpt, packed_ckpt  # noqa: F401 - fixtures
from qtool.checkpoint.files import open_checkpoint, read_safetensors_header
from qtool.checkpoint.scheme import describe
from qtool.formats.registry import activation_codes, weight_formats
from qtool.checkpoint.sizes import sizes
from qtool.errors import CheckpointError, UsageError

ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3",
            torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64"}

# expectations from checkpoint-formats.md §2.1 / §3:
# case -> (quant_algo, recipe, format, activation, group, fp8 stage, kv format)
EXPECT = {
    "fp8_kvfp8": ("FP8", "fp8", "fp8", "fp8", None, False, "fp8"),
    "fp8_rowwise": ("FP8_PER_CHANNEL_PER_TOKEN", "fp8-rowwise", "fp8-rowwise", "fp8-token", None, False, "bf16"),
    "fp8_block": ("fp8_pb_wo", "fp8-block", "fp8-block", "fp8-block", 128, False, "bf16"),
    "nvfp4_kvnvfp4": ("NVFP4", "nvfp4", "nvfp4", "nvfp4", 16, False, "nvfp4"),
    "mxfp4": ("mxfp4", "mxfp4", "mxfp4", "mxfp4", 32, False, "bf16"),
    "w4a16_nvfp4": ("W4A16_NVFP4", None, "nvfp4", "none", 16, False, "bf16"),
    "w4a8_nvfp4_fp8": ("W4A8_NVFP4_FP8", None, "nvfp4", "fp8", 32, False, "bf16"),
    "w4a8_mxfp4_fp8": ("W4A8_MXFP4_FP8", None, "mxfp4", "fp8", 32, False, "bf16"),
    "int4_awq": ("W4A16_AWQ", "w4a16-awq", "int4-awq", "none", 128, False, "bf16"),
    "w4a8_awq": ("W4A8_AWQ", "w4a8-awq", "int4-awq", "fp8", 128, True, "bf16"),
}
assert set(EXPECT) == set(MODELOPT_CASES)


def _module_weights(folder) -> dict[str, tuple[int, int]]:
    """module -> (out, in) of every 2-D non-embedding weight of the original bf16 model."""
    sd = load_file(str(folder / "model.safetensors"))
    return {n[:-7]: tuple(t.shape) for n, t in sd.items() if n.endswith(".weight") and t.dim() == 2 and "embed" not in n}


# ------------------------------------------------------------------ files.py

def test_header_matches_safetensors_library(modelopt_ckpt):
    path = modelopt_ckpt("nvfp4_kvnvfp4") / "model.safetensors"
    infos = read_safetensors_header(path)
    raw = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        assert set(infos) == names
        for name in names:
            t = f.get_tensor(name)
            i = infos[name]
            assert i.dtype == ST_DTYPE[t.dtype] and i.shape == tuple(t.shape), name
            data = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            assert i.nbytes == len(data) and raw[i.offset:i.offset + i.nbytes] == data, name


def test_sharded_checkpoint_honours_index(tmp_path, tiny_models):
    import transformers as tf
    src = tiny_models("llama")
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="600KB")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, out / f.name)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    files = open_checkpoint(str(out))
    single = open_checkpoint(str(src))
    assert set(files.tensors) == set(single.tensors) == set(index)
    for name, info in files.tensors.items():
        assert info.file.name == index[name]
        assert (info.dtype, info.shape) == (single.tensors[name].dtype, single.tensors[name].shape)
    assert sorted(p.name for p in files.shard_files) == sorted(set(index.values()))
    assert files.bytes_on_disk == sum((out / n).stat().st_size for n in set(index.values()))
    assert files.has_chat_template and "tokenizer.json" in files.tokenizer_files


def test_missing_path_is_usage_error(tmp_path):
    with pytest.raises(UsageError):
        open_checkpoint(str(tmp_path / "nope"))


def test_truncated_file_raises_naming_tensor(tmp_path, tiny_models):
    out = tmp_path / "t"
    shutil.copytree(tiny_models("llama"), out)
    p = out / "model.safetensors"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 10)
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(str(out))
    files = open_checkpoint(str(out), strict=False)
    assert len(files.problems) == 1 and "truncated" in files.problems[0]


def test_corrupt_header_length_raises(tmp_path, tiny_models):
    out = tmp_path / "c"
    shutil.copytree(tiny_models("llama"), out)
    p = out / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[:8] = struct.pack("<Q", 2 ** 40)
    p.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="corrupt"):
        read_safetensors_header(p)


def test_index_naming_missing_shard(tmp_path, tiny_models):
    out = tmp_path / "m"
    shutil.copytree(tiny_models("llama"), out)
    names = list(read_safetensors_header(out / "model.safetensors"))
    wm = {n: "model-00001-of-00002.safetensors" for n in names}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(str(out))


# ------------------------------------------------------------------ scheme.py on ModelOpt exports

@pytest.mark.parametrize("case", sorted(EXPECT))
def test_modelopt_export_described(case, modelopt_ckpt, tiny_models):
    algo, recipe, fmt, act, group, stage, kv = EXPECT[case]
    folder = modelopt_ckpt(case)
    s = describe(open_checkpoint(str(folder)))           # strict: raises on any disagreement
    assert (s.quant_method, s.quant_algo, s.recipe, s.kv_format) == ("modelopt", algo, recipe, kv)
    assert s.producer.startswith("modelopt")
    shapes = _module_weights(tiny_models("llama"))
    assert set(s.linears) == set(shapes)
    for module, spec in s.linears.items():
        assert (spec.out_features, spec.in_features) == shapes[module], module
        assert spec.format in weight_formats() and spec.activation in activation_codes()
        if module == "lm_head":
            assert (spec.format, spec.activation) == ("bf16", "none")
            continue
        assert (spec.format, spec.activation, spec.group_size, spec.fp8_weight_stage) == (fmt, act, group, stage)
        assert spec.tensors.get("weight") == f"{module}.weight"
    assert s.excluded == ["lm_head", "model.embed_tokens"]
    assert "model.embed_tokens.weight" in s.other_tensors and "model.norm.weight" in s.other_tensors
    if kv != "bf16":
        assert s.kv_scales == {i: (f"model.layers.{i}.self_attn.k_proj.k_scale",
                                   f"model.layers.{i}.self_attn.v_proj.v_scale") for i in range(2)}
    else:
        assert s.kv_scales == {}


def test_modelopt_awq_pre_quant_scale_only_where_not_folded(modelopt_ckpt):
    s = describe(open_checkpoint(str(modelopt_ckpt("int4_awq"))))
    with_pqs = {m.rsplit(".", 1)[-1] for m, spec in s.linears.items() if "pre_quant_scale" in spec.tensors}
    assert with_pqs == {"o_proj", "down_proj"}          # §3: q/k/v and gate/up pqs are folded into the norms


def test_mixed_precision(modelopt_ckpt):
    folder = modelopt_ckpt("mixed")
    hq = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "MIXED_PRECISION"
    s = describe(open_checkpoint(str(folder)))
    assert s.recipe is None and s.quant_algo == "MIXED_PRECISION"
    for module, spec in s.linears.items():
        if module in ("lm_head", "model.layers.1.self_attn.o_proj"):
            assert spec.format == "bf16" and module in s.excluded
        elif ".mlp." in module:
            assert (spec.format, spec.activation, spec.group_size) == ("nvfp4", "nvfp4", 16)
        else:
            assert (spec.format, spec.activation) == ("fp8", "fp8")


def test_kv_without_scales(tmp_path, modelopt_ckpt):
    """fp8_cast-style export: kv_cache_quant_algo FP8 but no k/v_scale tensors (§3)."""
    out = tmp_path / "cast"
    shutil.copytree(modelopt_ckpt("fp8_kvfp8"), out)
    sd = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.endswith(("k_scale", "v_scale"))}, str(out / "model.safetensors"))
    s = describe(open_checkpoint(str(out)))
    assert s.kv_format == "fp8" and s.kv_scales == {0: (None, None), 1: (None, None)}


def test_declared_format_contradicted_raises(tmp_path, modelopt_ckpt):
    out = tmp_path / "bad"
    shutil.copytree(modelopt_ckpt("fp8_kvfp8"), out)
    sd = load_file(str(out / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight_scale"] = torch.ones(3)
    del sd["model.layers.1.self_attn.q_proj.input_scale"]
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj.weight_scale"):
        describe(open_checkpoint(str(out)))
    s = describe(open_checkpoint(str(out)), strict=False)
    assert any("model.layers.1.self_attn.q_proj.input_scale: missing" in p for p in s.problems)
    assert len(s.problems) == 2


def test_excluded_module_with_quantized_tensors_raises(tmp_path, modelopt_ckpt):
    out = tmp_path / "excl"
    shutil.copytree(modelopt_ckpt("fp8_kvfp8"), out)
    hq = json.loads((out / "hf_quant_config.json").read_text())
    hq["quantization"]["exclude_modules"].append("model.layers.0.mlp*")
    (out / "hf_quant_config.json").write_text(json.dumps(hq))
    with pytest.raises(CheckpointError, match="leaves it unquantized"):
        describe(open_checkpoint(str(out)))


# ------------------------------------------------------------------ scheme.py on the independent packers

@pytest.mark.parametrize("name,method,recipe,fmt,act", [
    ("gptq", "gptq", "w4a16-gptq", "gptq", "none"),
    ("gptq_w4a8", "gptq", "w4a8-gptq", "gptq", "fp8"),
    ("gptq_qcfg_file", "gptq", "w4a16-gptq", "gptq", "none"),
    ("autoawq", "awq", "w4a16-awq", "autoawq", "none"),
    ("deepseek_fp8", "fp8", "fp8-block", "fp8-block", "fp8-block"),
])
def test_packed_described(name, method, recipe, fmt, act, packed_ckpt, tiny_models):
    info = packed_ckpt(name)
    s = describe(open_checkpoint(str(info.path)))
    assert (s.quant_method, s.recipe, s.kv_format) == (method, recipe, "bf16")
    shapes = _module_weights(tiny_models("llama"))
    assert set(s.linears) == set(shapes)
    for module, spec in s.linears.items():
        assert (spec.out_features, spec.in_features) == shapes[module], module
        if module == "lm_head":
            assert spec.format == "bf16" and s.excluded == ["lm_head"]
        else:
            assert (spec.format, spec.activation, spec.group_size) == (fmt, act, 128)
    roles = set(s.linears["model.layers.0.mlp.down_proj"].tensors)
    assert roles == {"gptq": {"qweight", "qzeros", "scales", "g_idx"} | ({"input_scale"} if act == "fp8" else set()),
                     "autoawq": {"qweight", "qzeros", "scales"},
                     "fp8-block": {"weight", "weight_scale_inv"}}[fmt]


@pytest.mark.parametrize("name", ["gptq", "autoawq", "deepseek_fp8"])
def test_packed_sizes(name, packed_ckpt, tiny_models):
    info = packed_ckpt(name)
    files = open_checkpoint(str(info.path))
    sz = sizes(files, describe(files), context=1000, batch=3)
    assert sz.bits_per_weight_quantized == pytest.approx(info.bits_quantized)
    assert sz.bits_per_weight == pytest.approx(info.bits_all)
    assert sz.quantized_weights == info.quant_weights and sz.linear_weights == info.all_weights
    original = load_file(str(tiny_models("llama") / "model.safetensors"))
    assert sz.parameters == sum(t.numel() for t in original.values())     # unpacked count = the bf16 model's
    assert sz.bytes_on_disk == (info.path / "model.safetensors").stat().st_size
    with safe_open(str(info.path / "model.safetensors"), framework="pt") as f:
        assert sz.tensor_bytes == sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    cfg = json.loads((info.path / "config.json").read_text())
    assert sz.kv_cache_bytes == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 1000 * 3 * 2


@pytest.mark.parametrize("case", ["fp8_kvfp8", "nvfp4_kvnvfp4", "w4a8_awq", "mixed"])
def test_modelopt_config_json_block_alone(case, tmp_path, modelopt_ckpt):
    """Without hf_quant_config.json, config.json's `quant_method: modelopt` block (§2) gives the same layers."""
    out = tmp_path / case
    shutil.copytree(modelopt_ckpt(case), out)
    (out / "hf_quant_config.json").unlink()
    a = describe(open_checkpoint(str(modelopt_ckpt(case))))
    b = describe(open_checkpoint(str(out)))
    assert b.quant_method == "modelopt" and b.quant_algo == a.quant_algo and b.kv_format == a.kv_format
    assert b.linears == a.linears and b.recipe == a.recipe


def test_awq_block_64_without_declared_group(tmp_path, modelopt_ckpt):
    """Group size comes from the weight_scale shape; config.json's modelopt block states none."""
    out = tmp_path / "g64"
    shutil.copytree(modelopt_ckpt("int4_awq"), out)
    (out / "hf_quant_config.json").unlink()
    sd = load_file(str(out / "model.safetensors"))
    for k in [k for k in sd if k.endswith(".weight_scale")]:
        sd[k] = sd[k].repeat_interleave(2, dim=1)          # [out, in/64]
    save_file(sd, str(out / "model.safetensors"))
    s = describe(open_checkpoint(str(out)))
    assert {spec.group_size for m, spec in s.linears.items() if m != "lm_head"} == {64}


def test_deepseek_v3_like_moe_mla_mtp(tmp_path, tiny_models):
    """DeepSeek-V3 naming: MLA projections, routed experts (own sizes), a bf16 router, an MTP layer after the last."""
    from qtool.checkpoint import soundness
    out = tmp_path / "dsv3"
    out.mkdir()
    for f in tiny_models("llama").iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, out / f.name)
    hidden, moe_inter, vocab = 256, 128, 384

    def fp8(o, i):
        return {"weight": torch.zeros(o, i, dtype=torch.float8_e4m3fn),
                "weight_scale_inv": torch.ones(-(-o // 128), -(-i // 128))}
    sd = {"model.embed_tokens.weight": torch.zeros(vocab, hidden, dtype=torch.bfloat16),
          "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
          "lm_head.weight": torch.zeros(vocab, hidden, dtype=torch.bfloat16)}
    for i in range(3):                                     # layers 0-1 + MTP layer 2
        p = f"model.layers.{i}."
        mods = {"self_attn.q_a_proj": (96, hidden), "self_attn.q_b_proj": (512, 96),
                "self_attn.kv_a_proj_with_mqa": (160, hidden), "self_attn.kv_b_proj": (768, 128),
                "self_attn.o_proj": (hidden, 512), "mlp.shared_experts.gate_proj": (moe_inter, hidden)}
        mods.update({f"mlp.experts.{e}.{n}": (moe_inter, hidden) if n != "down_proj" else (hidden, moe_inter)
                     for e in range(2) for n in ("gate_proj", "up_proj", "down_proj")})
        for m, (o, k) in mods.items():
            sd.update({f"{p}{m}.{r}": t for r, t in fp8(o, k).items()})
        sd[p + "mlp.gate.weight"] = torch.zeros(2, hidden, dtype=torch.bfloat16)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    save_file(sd, str(out / "model.safetensors"))
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": hidden,
           "intermediate_size": 1024, "moe_intermediate_size": moe_inter, "num_hidden_layers": 2,
           "num_nextn_predict_layers": 1, "num_attention_heads": 4, "kv_lora_rank": 128, "vocab_size": vocab,
           "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                   "weight_block_size": [128, 128]}}
    (out / "config.json").write_text(json.dumps(cfg))
    files = open_checkpoint(str(out))
    s = describe(files)
    assert s.recipe == "fp8-block" and s.linears["model.layers.0.mlp.gate"].format == "bf16"
    assert "model.layers.0.mlp.gate" in s.excluded
    assert s.linears["model.layers.2.mlp.experts.1.down_proj"].format == "fp8-block"
    assert soundness.check(files, s)[0] == []
