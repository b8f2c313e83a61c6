"""config.json / tokenizer_config.json that transformers 4.5x reads as transformers 5 means them.

Contract: torch-free. transformers 5 writes `rope_parameters` (rope_theta inside) and `dtype`, and names
a fast tokenizer `TokenizersBackend`; transformers 4.57 (pinned by some TensorRT-LLM releases) reads
top-level `rope_theta` (LlamaConfig default 10000.0) and `rope_scaling`, ignores `rope_parameters`,
and its AutoTokenizer cannot resolve the transformers-5 class names (`*Backend`).
`legacy_config(cfg)` returns cfg with the 4.5x keys added beside the 5.x ones (same values; transformers
5 keeps reading `rope_parameters`); `legacy_tokenizer_config(tok, fast)` names `PreTrainedTokenizerFast`
where a fast tokenizer carries a 5-only class name; `apply(folder)` rewrites both files in place and
returns what it changed. `problems_for_457(cfg)` / `tokenizer_problem_for_457(tok)` say what a 4.57
reader would get wrong (the "loads in" notes of `qtool inspect`).
"""
from __future__ import annotations

import json
from pathlib import Path

FAST_BASE = "PreTrainedTokenizerFast"
NESTED = ("text_config", "language_config", "llm_config")


def _rope_legacy(rp: dict) -> tuple[float | None, dict | None]:
    theta = rp.get("rope_theta")
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype == "default":
        return theta, None
    return theta, {k: v for k, v in rp.items() if k != "rope_theta"}


def _legacy_one(cfg: dict) -> dict:
    out = dict(cfg)
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        theta, scaling = _rope_legacy(rp)
        if theta is not None:
            out["rope_theta"] = theta
        out["rope_scaling"] = scaling
        if "partial_rotary_factor" in rp and "partial_rotary_factor" not in cfg:
            out["partial_rotary_factor"] = rp["partial_rotary_factor"]
    if cfg.get("dtype") is not None and cfg.get("torch_dtype") is None:
        out["torch_dtype"] = cfg["dtype"]
    return out


def legacy_config(cfg: dict) -> dict:
    out = _legacy_one(cfg)
    for key in NESTED:
        if isinstance(cfg.get(key), dict):
            out[key] = _legacy_one(cfg[key])
    return out


def resolvable_by_457(name: str | None) -> bool:
    """transformers 4.57 `tokenizer_class_from_name`: PreTrainedTokenizerFast or a `*Tokenizer[Fast]` class;
    the transformers-5 backends (TokenizersBackend, SentencePieceBackend, PythonBackend, …) do not exist there."""
    return name is None or not str(name).endswith("Backend")


def legacy_tokenizer_config(tok: dict, fast: bool) -> dict:
    if fast and not resolvable_by_457(tok.get("tokenizer_class")):
        return {**tok, "tokenizer_class": FAST_BASE}
    return tok


def problems_for_457(cfg: dict) -> list[str]:
    out = []
    for c in [cfg] + [cfg[k] for k in NESTED if isinstance(cfg.get(k), dict)]:
        rp = c.get("rope_parameters")
        if isinstance(rp, dict):
            theta, scaling = _rope_legacy(rp)
            if theta is not None and c.get("rope_theta") != theta:
                out.append(f"config.json has no top-level rope_theta = {theta} (rope_parameters only): "
                           "transformers 4.57 reads rope_theta 10000.0")
            if scaling is not None and not isinstance(c.get("rope_scaling"), dict):
                out.append(f"config.json has no top-level rope_scaling ({scaling.get('rope_type')}): "
                           "transformers 4.57 runs plain RoPE")
        if c.get("dtype") is not None and c.get("torch_dtype") is None:
            out.append("config.json has dtype but no torch_dtype")
    return out


def tokenizer_problem_for_457(tok: dict) -> str | None:
    name = tok.get("tokenizer_class")
    if resolvable_by_457(name):
        return None
    return (f"tokenizer_config.json names tokenizer_class {name} (a transformers-5 class): AutoTokenizer of "
            f"transformers 4.57 cannot resolve it ({FAST_BASE} would load)")


def apply(folder: Path) -> list[str]:
    """Rewrite config.json and tokenizer_config.json of an export in place; returns the keys changed."""
    folder = Path(folder)
    changed = []
    cp = folder / "config.json"
    if cp.is_file():
        cfg = json.loads(cp.read_text(encoding="utf-8"))
        new = legacy_config(cfg)
        if new != cfg:
            changed += [f"config.json {k}" for k in new if new.get(k) != cfg.get(k)]
            cp.write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
    tp = folder / "tokenizer_config.json"
    if tp.is_file():
        tok = json.loads(tp.read_text(encoding="utf-8"))
        new = legacy_tokenizer_config(tok, (folder / "tokenizer.json").is_file())
        if new != tok:
            changed.append(f"tokenizer_config.json tokenizer_class {tok.get('tokenizer_class')} -> {FAST_BASE}")
            tp.write_text(json.dumps(new, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return changed
