"""Recipe data (recipes/recipes.toml) → a ModelOpt 0.47 `mtq.quantize` config.

Contract: `build_config(recipe, kv_recipe, block_size)` (registry Recipes; kv_recipe None = no KV-cache
quantization) deep-copies the recipe's `modelopt_config`
constant, applies its `algorithm` (GPTQ), the INT4 block size (`--awq-block-size`), the FP8
activation quantizer of w4a8-gptq, and merges the KV recipe with
`mtq.update_quant_cfg_with_kv_cache_quant` (0.47: appends to the ordered list). Imports modelopt
only inside the function.
"""
from __future__ import annotations

import copy

from qtool.formats.registry import Recipe

# ModelOpt's GPTQ (`GPTQCalibConfig`, 0.44+): Hessian-based, layer by layer.
GPTQ_ALGORITHM = {"method": "gptq", "perc_damp": 0.01, "block_size": 128}
FP8_PER_TENSOR = {"num_bits": (4, 3), "axis": None}


def _set_int4_block(cfg: dict, block: int) -> None:
    """Set the INT4 block size of every weight quantizer entry (plain or sequential)."""
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") != "*weight_quantizer" or "cfg" not in entry:
            continue
        stages = entry["cfg"] if isinstance(entry["cfg"], list) else [entry["cfg"]]
        for st in stages:
            if st.get("num_bits") == 4 and isinstance(st.get("block_sizes"), dict):
                st["block_sizes"] = {**st["block_sizes"], -1: block}


def build_config(recipe: Recipe, kv_recipe: Recipe | None, block_size: int | None = None) -> dict:
    import modelopt.torch.quantization as mtq

    spec = recipe.spec
    cfg = copy.deepcopy(getattr(mtq, spec["modelopt_config"]))
    if spec.get("block_size_option") and block_size:
        _set_int4_block(cfg, block_size)
    if spec.get("algorithm") == "gptq":
        algo = dict(GPTQ_ALGORITHM)
        if block_size and block_size > algo["block_size"]:
            algo["block_size"] = block_size        # GPTQ's update block must be a multiple of the group
        cfg["algorithm"] = algo
    if spec.get("fp8_activations"):
        cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer", "cfg": dict(FP8_PER_TENSOR)})
    if kv_recipe is not None:
        kv_cfg = getattr(mtq, kv_recipe.spec["modelopt_config"])
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, kv_cfg["quant_cfg"])
    return cfg


def describe_algorithm(cfg: dict) -> str:
    algo = cfg.get("algorithm")
    return algo.get("method", str(algo)) if isinstance(algo, dict) else str(algo)
