"""Tokenizer loading and prompt → token ids (chat template by default, raw on request).

Contract: `load_tokenizer(folder)` loads the checkpoint's tokenizer (qtool.runtime.tokenizer.Tokenizer,
no transformers) or raises CheckpointError (one line) when the folder has none. `prompt_ids(tok, prompt, system, raw)`
applies the tokenizer's chat template (user message, optional system message, generation prompt)
unless `raw` is set or the tokenizer has no template; raw prompts get the tokenizer's usual
special tokens (e.g. BOS). `eos_ids(tok, config_ids)` unions the tokenizer's EOS and the
model's / generation config's EOS ids.
"""
from __future__ import annotations


def load_tokenizer(folder):
    """The checkpoint's Tokenizer (qtool.runtime.tokenizer: `tokenizers` + jinja2, no transformers)."""
    from qtool.runtime.tokenizer import Tokenizer
    return Tokenizer.from_folder(folder)


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def messages_for(prompt: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def prompt_text(tok, prompt: str, system: str | None = None, raw: bool = False) -> str | None:
    """The templated prompt text, or None when the prompt is sent raw (asked, or no chat template)."""
    if raw or not has_chat_template(tok):
        return None
    return tok.apply_chat_template(messages_for(prompt, system), add_generation_prompt=True)


def prompt_ids(tok, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    text = prompt_text(tok, prompt, system, raw)
    if text is None:
        return tok.encode(prompt, add_special_tokens=True)
    return tok.encode(text, add_special_tokens=False)


def conversation_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of a whole conversation with the generation prompt (raw concatenation without a template)."""
    if not has_chat_template(tok):
        return tok.encode("\n".join(m["content"] for m in messages if m["role"] != "system"), add_special_tokens=True)
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def eos_ids(tok, config_ids) -> set[int]:
    ids = {int(i) for i in (config_ids or []) if i is not None}
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def parse_prompts(text: str, source: str) -> list[str]:
    """Prompts from text: one per line, or JSON lines with a 'prompt' (or 'text') field; blank lines skipped."""
    import json
    from qtool.errors import UsageError
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{source}:{n}: not valid JSON ({exc.msg})")
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise UsageError(f"{source}:{n}: a JSON line needs a string 'prompt' field")
            out.append(text)
        else:
            out.append(line)
    if not out:
        raise UsageError(f"{source} has no prompts")
    return out
