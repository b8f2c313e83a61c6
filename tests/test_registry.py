"""The format registry (qtool/formats/registry.py) against references outside its own data files.

References: the kernels' own format constants (`#define FMT_*` in kernels_cuda/linear.cu, `#define KV_*` in
kernels_cuda/kv_cache.cuh, the scheme list in kernels_cuda/act_quant.cu's header); the quant_algo strings ModelOpt
0.47 writes and TensorRT-LLM's aliases for them (shared/reference/checkpoint-formats.md: `fp8_pb_wo` ->
`FP8_BLOCK_SCALES`, `NVFP4_AWQ` from the NVFP4 AWQ presets, `W4A16_NVFP4` weight-only with no qtool recipe); the
functions of qtool/formats/ the data names; DeepSeek block-scale shapes worked by hand. Also: every name the data uses in one table exists in the table it refers to.
"""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

from qtool.formats import registry

REPO = Path(__file__).resolve().parent.parent


def _defines(path: Path, prefix: str) -> dict[str, int]:
    text = path.read_text(encoding="utf-8")
    return {m.group(1): int(m.group(2)) for m in re.finditer(rf"^#define {prefix}(\w+) (\d+)\s*$", text, re.M)}


def test_kernel_codes_are_the_kernels_defines():
    fmt = _defines(REPO / "kernels_cuda" / "linear.cu", "FMT_")
    kernel_name = {"bf16": "BF16", "fp8": "FP8", "fp8-rowwise": "FP8", "fp8-block": "FP8", "nvfp4": "NVFP4",
                   "mxfp4": "MXFP4", "int4-awq": "INT4", "gptq": "INT4", "autoawq": "INT4"}
    assert {f: w.kernel for f, w in registry.weight_formats().items()} == {f: fmt[k] for f, k in kernel_name.items()}
    kv = _defines(REPO / "kernels_cuda" / "kv_cache.cuh", "KV_")
    assert registry.kv_format_codes() == {"bf16": kv["BF16"], "fp8": kv["FP8"], "nvfp4": kv["NVFP4"]}


def test_activation_codes_are_act_quant_schemes():
    """act_quant.cu has no defines for its schemes: its header lists them ("scheme: 0 none (pqs only), 1 fp8
    per-tensor static, ..."); each registry activation's code is the number that header gives its scheme."""
    text = (REPO / "kernels_cuda" / "act_quant.cu").read_text(encoding="utf-8")
    header = " ".join(line.lstrip("/ ") for line in text.split("// scheme:", 1)[1].split("\n")[:2])
    described = {"none": "none", "fp8": "fp8 per-tensor static", "fp8-token": "fp8 per token",
                 "fp8-block": "fp8 per token x 128-channel group", "nvfp4": "nvfp4", "mxfp4": "mxfp4"}
    assert set(registry.activation_codes()) == set(described)
    for name, code in registry.activation_codes().items():
        assert re.search(rf"(^|, ){code} {re.escape(described[name])}(,| \(|$)", header), (name, code, header)


@pytest.mark.parametrize("algo,recipe", [
    ("FP8", "fp8"), ("FP8_PER_CHANNEL_PER_TOKEN", "fp8-rowwise"), ("fp8_pb_wo", "fp8-block"),
    ("FP8_BLOCK_SCALES", "fp8-block"), ("NVFP4", "nvfp4"), ("NVFP4_AWQ", "nvfp4"), ("mxfp4", "mxfp4"),
    ("W4A16_AWQ", "w4a16-awq"), ("W4A8_AWQ", "w4a8-awq"), ("W4A16_NVFP4", None), ("W4A8_NVFP4_FP8", None),
    ("W4A8_MXFP4_FP8", None), ("INT8_SQ", None)])
def test_quant_algo_to_recipe(algo, recipe):
    assert registry.quant_algo_recipe(algo) == recipe


def test_each_modelopt_recipe_maps_back_from_its_export():
    for name, r in registry.recipes()["weights"].items():
        if r.get("quant_algo"):
            assert registry.quant_algo_recipe(r.get("quant_algo")) == name
    for name, r in registry.recipes()["kv"].items():
        assert registry.kv_algo_recipe(r.get("kv_cache_quant_algo").lower()) == name
    assert registry.kv_algo_recipe(None) is None and registry.kv_algo_recipe("INT8") is None


def test_layers_of_gptq_and_autoawq_checkpoints():
    assert registry.layer_recipe("gptq", "none") == "w4a16-gptq"
    assert registry.layer_recipe("gptq", "fp8") == "w4a8-gptq"
    assert registry.layer_recipe("autoawq", "none") == "w4a16-awq"
    assert registry.layer_recipe("int4-awq", "fp8", True) == "w4a8-awq"
    assert registry.layer_recipe("int4-awq", "fp8", False) is None


def test_names_refer_to_what_exists():
    fmts, acts = registry.weight_formats(), registry.activation_codes()
    for name, r in registry.recipes()["weights"].items():
        assert r.get("formats") and set(r.get("formats")) <= set(fmts), name
        assert r.get("activation") in acts, name
    for name in registry.recipes()["kv"]:
        assert name in registry.kv_format_codes()
    for f in fmts.values():
        assert f.activation in acts and f.activation_with_input_scale in acts, f.name
        module, _, func = f.decode.rpartition(".")
        fn = getattr(importlib.import_module(f"qtool.formats.{module}"), func)
        params = inspect.signature(fn).parameters
        assert len(f.decode_args) <= len(params), f.name
        for arg in f.decode_args:
            if arg.startswith("@"):
                assert arg[1:] in ("group_size", "fp8_weight_stage")
            else:
                assert set(arg.lstrip("?").split("|")) <= set(f.tensors), (f.name, arg)


def test_deepseek_block_shapes_by_hand():
    dims = {"o": 300, "i": 700, "g": 128, "bo": 128, "bi": 128}
    with_inv = registry.expected_tensors("fp8-block", "fp8-block", False, {"weight", "weight_scale_inv"}, dims)
    assert with_inv["weight_scale_inv"][1] == (3, 6) and "weight_scale" not in with_inv
    modelopt = registry.expected_tensors("fp8-block", "fp8-block", False, {"weight", "weight_scale"}, dims)
    assert modelopt["weight_scale"][1] == (3, 1, 6, 1) and modelopt["weight_scale_inv"][2]     # optional
    gptq = registry.expected_tensors("gptq", "none", False, {"qweight"}, {**dims, "g": None})
    assert gptq["qweight"][1] == (87, 300) and gptq["scales"][1] == (None, 300)      # no group: any row count
