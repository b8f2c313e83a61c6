"""Model families: one module per architecture, each a decoder-layer implementation over Backend.

Contract: `family_class(config)` returns the decoder class for `config.family` (the HF
model_type: llama, mistral, qwen2, qwen3) or raises Unsupported naming the supported ones. A
decoder class is constructed as `cls(weights, backend)` and exposes
`layer(i, x, residual, positions, cache) -> (x, residual)` (the layer's output before its
residual add, and the residual stream). New families (phi3, gemma3, mixtral) are new modules
registered in `_FAMILIES`.
"""
from __future__ import annotations

import importlib

from qtool.errors import Unsupported

# model_type -> (module, class)
_FAMILIES = {
    "llama": ("llama", "LlamaDecoder"),
    "mistral": ("llama", "LlamaDecoder"),
    "qwen2": ("qwen2", "Qwen2Decoder"),
    "qwen3": ("qwen3", "Qwen3Decoder"),
}


def supported_families() -> list[str]:
    return list(_FAMILIES)


def family_class(config):
    fam = str(config.family).lower()
    if fam not in _FAMILIES:
        raise Unsupported(f"qtool's runtime has no model code for {fam!r}",
                          hint="supported families: " + ", ".join(_FAMILIES))
    module, cls = _FAMILIES[fam]
    return getattr(importlib.import_module(f"qtool.runtime.families.{module}"), cls)
