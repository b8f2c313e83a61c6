"""Tokenizer loading and prompt → token ids (chat template by default, raw on request).

Contract: `load_tokenizer(folder)` loads the checkpoint's tokenizer with transformers or raises
CheckpointError (one line) when the folder has none. `prompt_ids(tok, prompt, system, raw)`
applies the tokenizer's chat template (user message, optional system message, generation prompt)
unless `raw` is set or the tokenizer has no template; raw prompts get the tokenizer's usual
special tokens (e.g. BOS). `eos_ids(tok, config_ids)` unions the tokenizer's EOS and the
model's / generation config's EOS ids.
"""
from __future__ import annotations

from pathlib import Path

from qtool.errors import CheckpointError


def load_tokenizer(folder):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{folder}: no usable tokenizer ({type(exc).__name__}: {first[:160]})",
                              hint="qtool run needs the tokenizer files (tokenizer.json …) in the model folder")


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def prompt_text(tok, prompt: str, system: str | None = None, raw: bool = False) -> str | None:
    """The templated prompt text, or None when the prompt is sent raw."""
    if raw or not has_chat_template(tok):
        return None
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tok, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    text = prompt_text(tok, prompt, system, raw)
    if text is None:
        return list(tok(prompt, add_special_tokens=True)["input_ids"])
    return list(tok(text, add_special_tokens=False)["input_ids"])


def eos_ids(tok, config_ids) -> set[int]:
    ids = {int(i) for i in (config_ids or []) if i is not None}
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def read_prompts(path) -> list[str]:
    """--prompts FILE: one prompt per line, or JSON lines with a 'prompt' (or 'text') field."""
    import json
    from qtool.errors import UsageError
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--prompts file not found: {path}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{n}: not valid JSON ({exc.msg})")
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise UsageError(f"{path}:{n}: a JSON line needs a string 'prompt' field")
            out.append(text)
        else:
            out.append(line)
    if not out:
        raise UsageError(f"--prompts file {path} has no prompts")
    return out
