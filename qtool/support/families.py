"""Maps a checkpoint's config.json (or a user-typed family name) onto model-matrix rows.

Contract: `rows_for_config(config)` applies the ordered rules of recipes/families.toml and
returns the matching row names (a checkpoint may match several rows; a recipe is supported when
any of them says Y). `resolve_family(name)` accepts a row name as the seed spells it, or an
alias, case-insensitively, and raises UsageError listing the known families otherwise.
`text_config(config)` is the one place a multimodal config's text part is unwrapped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from qtool.errors import CheckpointError, Unsupported, UsageError
from qtool.support import data


def _norm(name: str) -> str:
    return re.sub(r"[\s\-_/.]", "", name).lower()


def known_families() -> list[str]:
    return list(data.model_matrix().rows)


def resolve_family(name: str) -> str:
    """A family name as typed by the user → the matrix row name."""
    key = _norm(name)
    for row in known_families():
        if _norm(row) == key:
            return row
    for row, aliases in data.families().get("aliases", {}).items():
        if any(_norm(a) == key for a in aliases):
            return row
    raise UsageError(f"unknown model family {name!r}",
                     hint="known families: " + ", ".join(known_families()))


def family_rows(row: str) -> list[str]:
    """A named family's rows: the rows it implies (recipes/families.toml [implies]) and itself."""
    return [*data.families().get("implies", {}).get(row, []), row]


def text_config(config: dict) -> dict:
    """The language model's config: a multimodal config.json's text part over its outer keys, else `config`."""
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(key), dict):
            return {**config, **config[key]}
    return config


def _rule_matches(rule: dict, config: dict) -> bool:
    text = text_config(config)
    text = {} if text is config else text
    model_types = {str(config.get("model_type", "")).lower(), str(text.get("model_type", "")).lower()}
    if "model_type" in rule and not model_types & {m.lower() for m in rule["model_type"]}:
        return False
    if "text_model_type" in rule and str(text.get("model_type", "")).lower() not in rule["text_model_type"]:
        return False
    if "architectures" in rule:
        archs = config.get("architectures") or []
        if not any(sub in a for a in archs for sub in rule["architectures"]):
            return False
    vocab = config.get("vocab_size", text.get("vocab_size"))
    if "vocab_min" in rule and not (isinstance(vocab, int) and vocab >= rule["vocab_min"]):
        return False
    if "vocab_is" in rule and vocab not in rule["vocab_is"]:
        return False
    if "rope_type" in rule:
        rs = config.get("rope_scaling") or text.get("rope_scaling") or config.get("rope_parameters") or {}
        if not isinstance(rs, dict) or (rs.get("rope_type") or rs.get("type")) not in rule["rope_type"]:
            return False
    if "max_positions_max" in rule:
        mp = config.get("max_position_embeddings", text.get("max_position_embeddings"))
        if not (isinstance(mp, int) and mp <= rule["max_positions_max"]):
            return False
    return True


def match_rules(config: dict) -> list[dict]:
    """The rules that match, in order, up to and including the first final one."""
    out = []
    for rule in data.families()["rule"]:
        if _rule_matches(rule, config):
            out.append(rule)
            if rule.get("final"):
                break
    return out


def rows_for_config(config: dict) -> list[str]:
    rows: list[str] = []
    for rule in match_rules(config):
        rows += [r for r in rule["rows"] if r not in rows]
    if not rows:
        arch = ", ".join(config.get("architectures") or []) or "?"
        raise Unsupported(
            f"unknown architecture: model_type={config.get('model_type')!r} ({arch}) is in no support-matrix row",
            hint="known families: " + ", ".join(known_families()) + "; pass --family NAME to choose one")
    return rows


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: config.json is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: config.json is not a JSON object")
    return cfg


def rows_for_model(model: str, family: str | None = None) -> tuple[list[str], str]:
    """Rows for `--model PATH|FAMILY` (with an optional --family override) and how they were found."""
    if family:
        return family_rows(resolve_family(family)), "given by --family"
    p = Path(model).expanduser()
    if p.exists():
        cfg = read_config(p)
        return rows_for_config(cfg), f"detected from {p / 'config.json' if p.is_dir() else p}"
    try:
        return family_rows(resolve_family(model)), "family name"
    except UsageError:
        if "/" in model or model.startswith((".", "~")):
            raise UsageError(f"model path not found: {model}",
                             hint="give a local Hugging Face folder or a family name: " + ", ".join(known_families()))
        raise
