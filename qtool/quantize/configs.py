"""Recipe data (recipes/recipes.toml) → a ModelOpt 0.47 `mtq.quantize` config.

Contract: `build_config(recipe, kv_recipe, block_size, algorithm)` (registry Recipes; kv_recipe None = no
KV-cache quantization) deep-copies the recipe's `modelopt_config` constant (or the one recipes/algorithms.toml
names for that algorithm and recipe), sets the `--algorithm` entry from recipes/algorithms.toml
(`check_algorithm` refuses one that does not apply, exit 2), applies the recipe's own `algorithm` (GPTQ), the INT4 block size (`--awq-block-size`), the FP8
activation quantizer of w4a8-gptq, and merges the KV recipe with
`mtq.update_quant_cfg_with_kv_cache_quant` (0.47: appends to the ordered list). Imports modelopt
only inside the function.
"""
from __future__ import annotations

import copy

from qtool.errors import UsageError
from qtool.formats.registry import Recipe, load_toml

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


def algorithms() -> dict:
    """recipes/algorithms.toml: {name: {title, modelopt, recipes, config?}} in file order."""
    return load_toml("algorithms.toml")


def check_algorithm(quant: str, algorithm: str | None) -> None:
    """UsageError (exit 2) unless --algorithm applies to the recipe; Failure (exit 1) when it needs CUDA here."""
    if algorithm is None:
        return
    table = algorithms()
    if algorithm not in table:
        raise UsageError(f"unknown --algorithm {algorithm!r}", hint="choose one of: " + ", ".join(table))
    if quant not in table[algorithm]["recipes"]:
        fits = [a for a, t in table.items() if quant in t["recipes"]]
        raise UsageError(f"--algorithm {algorithm} does not apply to --quant {quant}",
                         hint=f"for {quant}: " + (", ".join(fits) if fits else "no --algorithm choice (its own default)"))
    if quant in table[algorithm].get("cuda", []):
        from qtool.quantize.plan import cuda_available
        if not cuda_available():
            from qtool.errors import Failure
            raise Failure(f"--algorithm {algorithm} with {quant} needs CUDA: ModelOpt 0.47 calibrates it on a GPU only "
                          "(no CUDA device here)", hint="run it on a machine with an NVIDIA GPU")


def build_config(recipe: Recipe, kv_recipe: Recipe | None, block_size: int | None = None,
                 algorithm: str | None = None) -> dict:
    import modelopt.torch.quantization as mtq

    spec = recipe.spec
    algo = algorithms()[algorithm] if algorithm else None
    base = (algo or {}).get("config", {}).get(recipe.name, spec["modelopt_config"])
    cfg = copy.deepcopy(getattr(mtq, base))
    if algo is not None:
        cfg["algorithm"] = copy.deepcopy(algo["modelopt"])
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
