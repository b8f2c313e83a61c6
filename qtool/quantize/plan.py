"""Checks that run before any weight is loaded: the model's config, family rows, block sizes, CUDA.

Contract: `peek_config(model)` returns (config dict, where it came from) without loading weights
(a HF folder's config.json; the built-in smollm2-135m's cached config or its known config; a
GGUF's metadata) or None when it cannot be known yet (a hub id). `block_size_problem(config,
block)` returns a one-line message naming the block sizes that would work when an INT4 block
does not divide every linear layer's in_features, else None. `cuda_problem(recipe, kv_recipe)` returns
the one-line reason when the recipe's ModelOpt path needs CUDA and none is available.
"""
from __future__ import annotations

import json
from pathlib import Path

from qtool.formats.registry import Recipe

# SmolLM2-135M-Instruct (HuggingFaceTB), a Llama-architecture model; used before the built-in
# GGUF has been converted (the converted folder's config.json is read when it exists).
SMOLLM2_135M_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "tie_word_embeddings": True,
}
BLOCK_CANDIDATES = (16, 32, 64, 128, 256)


def _builtin_cached_config(name: str) -> dict | None:
    try:
        from qtool import sources
        spec = sources.BUILTIN_MODELS[name]
        gguf = sources.builtin_gguf_path(spec)
        target = sources.cache_dir() / "models" / f"{spec.name}-{spec.package}-{spec.version}-{sources._file_key(gguf)}"
        return json.loads((target / "config.json").read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - any problem: fall back to the known config
        return None


def _gguf_config(path: Path) -> dict | None:
    """model_type and linear dimensions from GGUF metadata (memory-mapped, no tensor is read)."""
    try:
        from gguf import GGUFReader
        r = GGUFReader(str(path))

        def field(key):
            f = r.fields.get(key)
            if f is None:
                return None
            v = f.parts[f.data[0]]
            return bytes(v).decode() if v.dtype.kind == "u" and v.dtype.itemsize == 1 else v.tolist()[0]
        arch = field("general.architecture")
        hidden, heads = field(f"{arch}.embedding_length"), field(f"{arch}.attention.head_count")
        return {"model_type": arch, "architectures": [], "hidden_size": hidden,
                "intermediate_size": field(f"{arch}.feed_forward_length"),
                "num_attention_heads": heads, "head_dim": field(f"{arch}.attention.key_length")
                or (hidden // heads if hidden and heads else None),
                "vocab_size": len(r.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in r.fields else None,
                "max_position_embeddings": field(f"{arch}.context_length")}
    except Exception:  # noqa: BLE001
        return None


def peek_config(model: str) -> tuple[dict | None, str]:
    from qtool import sources
    if model.lower() in sources.BUILTIN_MODELS:
        cfg = _builtin_cached_config(model.lower())
        return (cfg, "the cached conversion's config.json") if cfg else (dict(SMOLLM2_135M_CONFIG), "its known config")
    p = Path(model).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        from qtool.support.families import read_config
        return read_config(p), str(p / "config.json")
    if p.is_file() and p.suffix.lower() == ".gguf":
        cfg = _gguf_config(p)
        return cfg, "GGUF metadata"
    return None, ""


def linear_in_features(cfg: dict) -> dict[str, int]:
    """in_features of the decoder's linear layers, by role (from config.json fields)."""
    from qtool.support.families import text_config
    c = text_config(cfg)
    hidden, inter = c.get("hidden_size"), c.get("intermediate_size")
    heads = c.get("num_attention_heads")
    head_dim = c.get("head_dim") or (hidden // heads if hidden and heads else None)
    out = {}
    if hidden:
        out["q/k/v/gate/up_proj (hidden_size)"] = hidden
    if heads and head_dim:
        out["o_proj (heads x head_dim)"] = heads * head_dim
    if inter:
        out["down_proj (intermediate_size)"] = inter
    if c.get("moe_intermediate_size"):
        out["expert down_proj (moe_intermediate_size)"] = c["moe_intermediate_size"]
    return {k: int(v) for k, v in out.items() if isinstance(v, int) and v > 0}


def block_size_problem(cfg: dict | None, block: int, option: str = "--awq-block-size",
                       allowed: list[int] | None = None) -> str | None:
    """`allowed`: the group sizes the export's consumers accept (recipes/consumers.toml); None = any."""
    if not cfg:
        return None
    dims = linear_in_features(cfg)
    bad = {k: v for k, v in dims.items() if v % block}
    if not bad:
        return None
    cands = [b for b in (allowed or BLOCK_CANDIDATES) if b > 0]
    ok = [b for b in cands if all(v % b == 0 for v in dims.values())]
    what = ", ".join(f"{k} = {v}" for k, v in bad.items())
    return (f"{option} {block} does not divide the in_features of every linear layer ({what}); "
            + (f"block sizes that work: {', '.join(map(str, ok))} (e.g. {option} {max(ok)})" if ok
               else "no block size in " + ", ".join(map(str, cands)) + " works"))


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def cuda_problem(recipe: Recipe, kv_recipe: Recipe | None) -> str | None:
    """The one-line reason this recipe cannot run here (recipes.toml `cpu_calibration`/`cuda_reason`)."""
    for r in (recipe, kv_recipe):
        if r is None:
            continue
        spec, name = r.spec, r.name
        if not spec.get("cpu_calibration", True) and not cuda_available():
            return (f"{name} needs CUDA: " + spec.get("cuda_reason", "ModelOpt's calibration for it has no CPU path")
                    + " (no CUDA device here)")
    return None
