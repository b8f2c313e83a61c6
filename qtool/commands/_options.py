"""Option types shared by commands, built from the recipe data (so --help lists the real choices).

Contract: `WeightRecipe` / `KvRecipe` are Enums whose values are the CLI names in
recipes/recipes.toml (`KvRecipe` adds 'none', which `kv_value` turns into None); `KvDtype` the KV-cache storage
formats of recipes/formats.toml plus 'auto'; `target_arch` (qtool.support.gpus) resolves --gpu.
"""
from __future__ import annotations

from enum import Enum

from qtool.formats import registry
from qtool.support.gpus import target_arch  # noqa: F401 - re-exported for commands

WeightRecipe = Enum("WeightRecipe", {n.replace("-", "_"): n for n in registry.recipe_names("weights")}, type=str)
KvRecipe = Enum("KvRecipe", {"none": "none", **{n: n for n in registry.recipe_names("kv")}}, type=str)
KvDtype = Enum("KvDtype", {"auto": "auto", **{n: n for n in registry.kv_format_codes()}}, type=str)   # --kv-cache-dtype

EXIT_CODES_HELP = "Exit codes: 0 done, 1 failed, 2 usage error, 3 refused by a support matrix."

GPU_HELP = ("Target GPU: sm120, sm100, sm90, sm89, sm86, sm80, an architecture (hopper, ada, ampere) "
            "or a product (h100, h200, b200, l40s, a100, rtx-4090, rtx-5090).")


def value(v):
    """Enum member or plain string → plain string (None stays None)."""
    return None if v is None else getattr(v, "value", v)


def kv_value(v) -> str | None:
    """--kv-cache-quant → the KV recipe name, None for 'none' (no KV-cache quantization)."""
    v = value(v)
    return None if v == "none" else v
