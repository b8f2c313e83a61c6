"""Where checkpoints load (recipes/consumers.toml): the data, `quantize --for` refusals before loading,
the `matrix` / `inspect` "loads in" rows, and the transformers-4.57 config keys.

Expectations are written here from shared/reference/consumer-loaders.md ("What follows for an export that
loads everywhere") and transformers 4.57's rules (cited at each), not read back from the data file.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool.cli import app
from packers import modelopt_ckpt  # noqa: F401 - fixture
from qtool.support import consumers, data

runner = CliRunner()

# consumer-loaders.md, "What follows": FP8 family and NVFP4 → ModelOpt layout for both; W4A16 AWQ → ModelOpt
# layout for TensorRT-LLM, AutoAWQ gemm for vLLM; W4A16 GPTQ → GPTQ v1, group 64 or 128 for both; W4A8 AWQ →
# TensorRT-LLM only; W4A8 GPTQ → neither. MXFP4: ModelOpt's 'mxfp4' is in neither QuantAlgo nor vLLM's
# QUANT_ALGOS (checkpoint-formats.md §7, §8). qtool's reader takes every layout it writes.
EXPECTED = {   # recipe: (TensorRT-LLM layout, vLLM layout) (None: cannot load)
    "fp8": ("modelopt", "modelopt"), "fp8-rowwise": ("modelopt", "modelopt"), "fp8-block": ("modelopt", "modelopt"),
    "nvfp4": ("modelopt", "modelopt"), "mxfp4": (None, None), "w4a16-awq": ("modelopt", "autoawq-gemm"),
    "w4a8-awq": ("modelopt", None), "w4a16-gptq": ("gptq-v1", "gptq-v1"), "w4a8-gptq": (None, None),
}

SMOLLM2_SHAPE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                 "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192}


def test_every_recipe_has_a_cited_entry_per_consumer():
    c = consumers.contracts()
    for kind in ("weights", "kv"):
        for name in data.recipes()[kind]:
            for t in consumers.TARGETS:
                e = c[kind][name][t]
                assert e["source"], (kind, name, t)
                assert set(e["layouts"]) <= set(c["layouts"]), (kind, name, t)
                assert e["layouts"] or e.get("reason"), f"{kind} {name} {t}: refused without a reason"
    for t in consumers.TARGETS:
        assert c["consumers"][t]["version"] and c["consumers"][t]["reads_first"]


@pytest.mark.parametrize("recipe", list(EXPECTED))
@pytest.mark.parametrize("target", ["trtllm", "vllm"])
def test_layout_per_recipe_and_target_follows_the_loaders(recipe, target):
    want = EXPECTED[recipe][0 if target == "trtllm" else 1]
    group = 128 if recipe.startswith("w4") else None
    ch = consumers.choose(recipe, None, (target,), group)
    if want is None:
        assert ch.refused and ch.layout is None
        assert consumers.title(target) in ch.refused and "qtool" in ch.hint.split("what loads it:")[1]
    else:
        assert ch.refused is None and ch.layout == want


def test_default_target_loads_everywhere_where_a_layout_does():
    assert consumers.choose("w4a16-gptq", None, None, 128).loads_in == list(consumers.TARGETS)
    assert consumers.choose("fp8", "nvfp4").loads_in == list(consumers.TARGETS)
    ch = consumers.choose("w4a16-awq", None, None, 128)     # no single layout: the best one, and said so
    assert ch.layout == "modelopt" and ch.loads_in == ["trtllm", "qtool"] and "vLLM" in ch.note


def test_gptq_group_sizes_marlin_and_trtllm():
    # Marlin: -1, 32, 64, 128 (vllm utils/marlin_utils.py); TensorRT-LLM: 64 or 128
    assert consumers.group_sizes("w4a16-gptq", "gptq-v1", ["vllm"]) == [32, 64, 128]
    assert consumers.group_sizes("w4a16-gptq", "gptq-v1", ["trtllm", "vllm"]) == [64, 128]
    ch = consumers.choose("w4a16-gptq", None, ("vllm",), 16)
    assert ch.refused and "32" in ch.hint
    assert consumers.choose("w4a16-gptq", None, ("qtool",), 16).layout == "gptq-v1"


def test_kv_cache_recipes_only_in_the_modelopt_layout():
    ch = consumers.choose("w4a16-gptq", "fp8", None, 128)
    assert ch.refused and "KV cache" in ch.refused


# ----------------------------------------------------------------------------- CLI, before loading

def fake_model(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"not a safetensors file")   # loading it would fail differently
    return path


def invoke(*args):
    r = runner.invoke(app, ["quantize", *args])
    assert "Traceback" not in (r.stdout + (r.stderr or ""))
    return r


def errors(r) -> list[str]:
    return [ln for ln in (r.stderr or r.stdout).splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("args,needle,hint", [
    (["--quant", "w4a16-gptq", "--awq-block-size", "32"], "only with group size 64, 128", "--awq-block-size 64"),
    (["--quant", "w4a16-gptq", "--for", "trtllm", "--awq-block-size", "32"], "group size 64, 128", "--awq-block-size 64"),
    (["--quant", "w4a16-awq", "--for", "vllm", "--awq-block-size", "16"], "group size 32, 64, 128", "--awq-block-size 32"),
    (["--quant", "w4a8-awq", "--for", "vllm", "--awq-block-size", "64"], "vLLM cannot load w4a8-awq", "--for trtllm,qtool"),
    (["--quant", "w4a8-gptq", "--for", "all", "--awq-block-size", "64", "--force"], "cannot load w4a8-gptq",
     "--for qtool"),
    (["--quant", "mxfp4", "--for", "trtllm", "--force"], "TensorRT-LLM cannot load mxfp4", "--for qtool"),
    (["--quant", "w4a16-gptq", "--kv-cache-quant", "fp8", "--awq-block-size", "64"], "KV cache", "without --kv-cache-quant"),
])
def test_for_refusals_exit_3_before_loading(tmp_path, args, needle, hint):
    src = fake_model(tmp_path / "smol", SMOLLM2_SHAPE)
    out = tmp_path / "out"
    r = invoke("--model", str(src), "-o", str(out), "--gpu", "sm90", *args)
    assert r.exit_code == 3, r.stdout + (r.stderr or "")
    assert len(errors(r)) == 1 and needle in errors(r)[0], errors(r)
    assert hint in (r.stderr or r.stdout)
    assert not out.exists()


def test_block_size_hint_offers_only_sizes_the_targets_load(tmp_path):
    """SmolLM2's 576: 16, 32 and 64 divide it, but TensorRT-LLM and vLLM load GPTQ at 64 (or 128) only."""
    src = fake_model(tmp_path / "smol", SMOLLM2_SHAPE)
    r = invoke("--model", str(src), "-o", str(tmp_path / "o"), "--gpu", "sm90", "--quant", "w4a16-gptq")
    assert r.exit_code == 2
    line = errors(r)[0]
    assert "block sizes that work: 64 " in line and "16" not in line.split("work:")[1]
    r = invoke("--model", str(src), "-o", str(tmp_path / "o"), "--gpu", "sm90", "--quant", "w4a16-gptq", "--for", "qtool")
    assert "16, 32, 64" in errors(r)[0]


def test_unknown_target_is_a_usage_error(tmp_path):
    src = fake_model(tmp_path / "smol", SMOLLM2_SHAPE)
    r = invoke("--model", str(src), "-o", str(tmp_path / "o"), "--quant", "fp8", "--for", "sglang")
    assert r.exit_code == 2 and "sglang" in errors(r)[0]


# ----------------------------------------------------------------------------- matrix / inspect rows

def test_matrix_json_loads_in_rows():
    r = runner.invoke(app, ["matrix", "--json"])
    doc = json.loads(r.stdout)["loads_in"]
    for recipe, (trt, vll) in EXPECTED.items():
        assert (trt in doc[recipe]["trtllm"]["layouts"]) if trt else doc[recipe]["trtllm"]["layouts"] == []
        assert (vll in doc[recipe]["vllm"]["layouts"]) if vll else doc[recipe]["vllm"]["layouts"] == []
        assert doc[recipe]["qtool"]["layouts"]
    q = json.loads(runner.invoke(app, ["matrix", "--quant", "w4a16-awq", "--json"]).stdout)
    assert q["loads_in"]["loads_in"] == ["trtllm", "qtool"]


def test_matrix_table_shows_loads_in():
    r = runner.invoke(app, ["matrix"], env={"COLUMNS": "200"})
    assert "Loads in" in r.stdout and "autoawq-gemm" in r.stdout


def test_inspect_loads_in_for_a_bf16_checkpoint(tiny_models):
    r = runner.invoke(app, ["inspect", str(tiny_models("llama3")), "--json"])
    doc = json.loads(r.stdout)
    assert {t: c["loads"] for t, c in doc["loads_in"].items()} == {"trtllm": True, "vllm": True, "qtool": True}
    notes = " ".join(doc["loads_in"]["trtllm"]["notes"])
    # made by transformers 5 (rope_parameters only, TokenizersBackend): what a 4.57 reader gets wrong
    assert "rope_theta" in notes and "TokenizersBackend" in notes
    assert doc["loads_in"]["vllm"]["notes"] == []


# ----------------------------------------------------------------------------- transformers 4.57 rules

def read_like_transformers_457(config: dict) -> dict:
    """transformers 4.57.1 LlamaConfig.__init__ (models/llama/configuration_llama.py): rope_theta=10000.0 and
    rope_scaling=None by default, read from the top level; `rope_parameters` is not a 4.57 argument (kept as an
    unknown attribute, unused). PretrainedConfig keeps `torch_dtype` (4.56 added `dtype` as its new name)."""
    return {"rope_theta": config.get("rope_theta", 10000.0), "rope_scaling": config.get("rope_scaling"),
            "torch_dtype": config.get("torch_dtype", config.get("dtype"))}


def tokenizer_class_resolves_in_457(name: str | None) -> bool:
    """transformers 4.57.1 models/auto/tokenization_auto.py tokenizer_class_from_name: 'PreTrainedTokenizerFast',
    a class named in TOKENIZER_MAPPING_NAMES (all `XxxTokenizer` / `XxxTokenizerFast`), or an attribute of the
    transformers module; 4.57 has no `TokenizersBackend` (a transformers-5 class)."""
    return name is None or name == "PreTrainedTokenizerFast" or name.endswith(("Tokenizer", "TokenizerFast"))


@pytest.mark.parametrize("family,theta,rope_type", [("llama", 10000.0, None), ("llama3", 500000.0, "llama3"),
                                                    ("qwen3", 1000000.0, None)])
def test_config_compat_reads_the_same_in_457_and_5(tmp_path, family, theta, rope_type):
    import shutil

    import transformers

    from qtool.support import config_compat
    from tiny_models import make_tiny_model
    overrides = {"rope_theta": theta} if family == "qwen3" else {}
    src = make_tiny_model(family, tmp_path / "src", **overrides)
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = json.loads((out / "config.json").read_text())
    assert "rope_theta" not in before and "rope_parameters" in before       # what transformers 5 writes
    assert not tokenizer_class_resolves_in_457(json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"])
    changed = config_compat.apply(out)
    assert changed
    after = json.loads((out / "config.json").read_text())
    old = read_like_transformers_457(after)
    assert old["rope_theta"] == theta and old["torch_dtype"] == "bfloat16"
    assert (old["rope_scaling"] or {}).get("rope_type") == rope_type
    if rope_type:
        assert old["rope_scaling"]["factor"] == before["rope_parameters"]["factor"]
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_class_resolves_in_457(tok["tokenizer_class"])
    assert config_compat.problems_for_457(after) == [] and config_compat.tokenizer_problem_for_457(tok) is None
    # transformers 5 reads the rewritten files exactly as the originals
    a, b = transformers.AutoConfig.from_pretrained(src), transformers.AutoConfig.from_pretrained(out)
    assert a.rope_parameters == b.rope_parameters and a.dtype == b.dtype
    ta, tb = transformers.AutoTokenizer.from_pretrained(src), transformers.AutoTokenizer.from_pretrained(out)
    text = "The capital of France is Paris. <|im_end|>"
    assert ta(text)["input_ids"] == tb(text)["input_ids"]
    assert tb.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        ta.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_vllm_nvfp4_kv_head_dim_64_is_told():
    """vllm/v1/attention/backends/flashinfer.py (~683-685, vLLM 0.33): head_size 64 refused on sm80/90/120."""
    ch = consumers.choose("fp8", "nvfp4", None, None, head_dim=64)
    assert ch.loads_in == list(consumers.TARGETS)
    assert any("FlashInfer" in n and "head_dim 64" in n for n in ch.cells["vllm"].notes)
    assert not consumers.choose("fp8", "nvfp4", None, None, head_dim=128).cells["vllm"].notes
    assert not ch.cells["trtllm"].notes
    from qtool.quantize.targets import summary
    assert "note: vLLM:" in summary(ch.as_dict()) and "--kv-cache-dtype bfloat16" in summary(ch.as_dict())


def test_inspect_loads_in_for_a_modelopt_format_without_recipe(modelopt_ckpt):
    """W4A16_NVFP4 (ModelOpt 0.46+): in vLLM's QUANT_ALGOS (modelopt.py, vLLM 0.33.0), no QuantAlgo member of
    the TensorRT-LLM snapshot (mode.py); W4A16_AWQ the other way round."""
    doc = json.loads(runner.invoke(app, ["inspect", str(modelopt_ckpt("w4a16_nvfp4")), "--json"]).stdout)
    got = {t: c["loads"] for t, c in doc["loads_in"].items()}
    assert got == {"trtllm": False, "vllm": True, "qtool": True}, doc["loads_in"]
    doc = json.loads(runner.invoke(app, ["inspect", str(modelopt_ckpt("int4_awq")), "--json"]).stdout)
    got = {t: c["loads"] for t, c in doc["loads_in"].items()}
    assert got == {"trtllm": True, "vllm": False, "qtool": True}, doc["loads_in"]
    assert "autoawq-gemm" in doc["loads_in"]["vllm"]["reason"]
