"""A checkpoint's tokenizer and chat template without transformers: `tokenizers` + jinja2.

Contract: `Tokenizer.from_folder(folder)` reads tokenizer.json (the `tokenizers` library) and
tokenizer_config.json (special tokens, add_bos_token / add_eos_token, chat template; also
chat_template.jinja / chat_template.json as transformers 5 saves them) and reproduces what
transformers' AutoTokenizer does with them: the same token ids from `encode(text,
add_special_tokens)`, the same text from `decode(ids, skip_special_tokens)`, and the same prompt
from `apply_chat_template(messages, add_generation_prompt)` (jinja2 sandbox with transformers'
options: trim_blocks, lstrip_blocks, loopcontrols, tojson, raise_exception, strftime_now, and
the special-token strings as variables). `eos_token_id` / `bos_token_id` / `pad_token_id` are
ints or None; `eos_ids` is the set of EOS ids the tokenizer knows. A folder with only a
sentencepiece model (no tokenizer.json) is converted once through transformers (the slow path).
`decode_stream()` returns a `tokenizers.decoders.DecodeStream` for incremental detokenization
(`IncrementalDecoder` in qtool.runtime.generate wraps it). Problems raise CheckpointError with one
line naming the file. Imports only `tokenizers` and jinja2 (no torch, no transformers).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from qtool.errors import CheckpointError

GIL_FREE_CHARS = 1 << 16     # texts longer than this are encoded with the GIL released (Tokenizer.encode)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(v) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})",
                              hint="the tokenizer files of the checkpoint are damaged; copy them again")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def _pick_template(value) -> str | None:
    """A chat template value: a string, or transformers' list of {name, template} (take 'default')."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {d.get("name"): d.get("template") for d in value if isinstance(d, dict)}
        t = named.get("default")
        return t if isinstance(t, str) and t else None
    if isinstance(value, dict) and isinstance(value.get("chat_template"), (str, list)):
        return _pick_template(value["chat_template"])
    return None


def read_chat_template(folder: Path, cfg: dict) -> str | None:
    """The chat template as transformers 5 finds it: chat_template.jinja, chat_template.json, tokenizer_config."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8") or None
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{jinja_file}: cannot read the chat template ({exc})")
    template = _pick_template(_read_json(folder / "chat_template.json"))
    return template if template is not None else _pick_template(cfg.get("chat_template"))


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime
        return datetime.now().strftime(fmt)

    class _Generation(jinja2.ext.Extension):     # {% generation %} blocks render their body, as in transformers
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (used only by non-BPE tokenizers that ask for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    """encode / decode / apply_chat_template of one checkpoint (see the module contract)."""

    def __init__(self, backend, config: dict, chat_template: str | None, source: str = "?"):
        from tokenizers import AddedToken, processors

        self.backend = backend                      # tokenizers.Tokenizer
        self.source = source
        self.chat_template = chat_template
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            s = _content(config.get(key))
            if s is not None:
                self.special_tokens[key] = s
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        add = []
        for s in [*self.special_tokens.values(), *extra]:
            s = _content(s) if not isinstance(s, str) else s
            if s:
                add.append(AddedToken(s, special=True, normalized=False))
        if add:
            backend.add_special_tokens(add)
        self.add_bos = bool(config.get("add_bos_token", False))
        self.add_eos = bool(config.get("add_eos_token", False))
        if backend.post_processor is None and (self.add_bos or self.add_eos):   # else tokenizer.json decides
            bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
            self.add_bos = self.add_bos and bos is not None
            self.add_eos = self.add_eos and eos is not None
            single = f"{(bos + ':0 ') if self.add_bos else ''}$A:0{(' ' + eos + ':0') if self.add_eos else ''}"
            pair = (f"{single}{(' ' + bos + ':1') if self.add_bos else ''} $B:1"
                    f"{(' ' + eos + ':1') if self.add_eos else ''}")
            specials = ([(bos, backend.token_to_id(bos))] if self.add_bos else []) + \
                       ([(eos, backend.token_to_id(eos))] if self.add_eos else [])
            backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and \
            type(backend.model).__name__ != "BPE"

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        folder = Path(folder)
        cfg = _read_json(folder / "tokenizer_config.json")
        template = read_chat_template(folder, cfg)
        tj = folder / "tokenizer.json"
        if tj.is_file():
            from tokenizers import Tokenizer as _Backend
            try:
                backend = _Backend.from_file(str(tj))
            except PermissionError:
                raise CheckpointError(f"{tj}: permission denied", hint="make the tokenizer files readable") from None
            except Exception as exc:  # noqa: BLE001 - the library raises plain Exception on bad files
                msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise CheckpointError(f"{tj}: not a valid tokenizers file ({msg[:160]})",
                                      hint="the tokenizer files of the checkpoint are damaged; copy them again") from None
            backend.no_truncation()   # as AutoTokenizer does per call: a saved max_length must not cut prompts
            backend.no_padding()
            return cls(backend, cfg, template, str(folder))
        return cls._from_transformers(folder, cfg, template)

    @classmethod
    def _from_transformers(cls, folder: Path, cfg: dict, template: str | None) -> "Tokenizer":
        """No tokenizer.json (e.g. only a sentencepiece model): let transformers convert it once."""
        if not any((folder / n).is_file() for n in ("tokenizer.model", "vocab.json", "tokenizer_config.json")):
            raise CheckpointError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)",
                                  hint="qtool run needs the tokenizer files (tokenizer.json …) in the model folder")
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(folder))
            backend = tok.backend_tokenizer
        except Exception as exc:  # noqa: BLE001 - transformers raises many types here
            msg = (str(exc).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{folder}: no usable tokenizer ({type(exc).__name__}: {msg[:160]})",
                                  hint="qtool run needs the tokenizer files (tokenizer.json …) in the model folder")
        cfg = {k: v for k, v in cfg.items() if k not in ("add_bos_token", "add_eos_token")}  # already in backend
        return cls(backend, cfg, template or getattr(tok, "chat_template", None), str(folder))

    # ---------------------------------------------------------------- ids
    def token_id(self, key: str) -> int | None:
        s = self.special_tokens.get(key)
        return None if s is None else self.backend.token_to_id(s)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    @property
    def eos_ids(self) -> set[int]:
        return {self.eos_token_id} - {None}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---------------------------------------------------------------- text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. A long text goes through ``encode_batch``, which releases the GIL (``encode``
        holds it: an 8 MB prompt tokenized on a server's worker thread froze every other request for 9 s)."""
        if len(text) > GIL_FREE_CHARS:
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        """transformers-style call: {"input_ids": [...]} (for code written against AutoTokenizer)."""
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_spaces else text

    def decode_stream(self, skip_special_tokens: bool = True):
        """A DecodeStream (feed it ids with `.step(self.backend, id)`), or None when spaces need clean-up."""
        if self.clean_up_spaces:
            return None
        from tokenizers.decoders import DecodeStream
        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The rendered prompt text (as transformers' apply_chat_template(..., tokenize=False))."""
        if not self.chat_template:
            raise CheckpointError(f"{self.source}: the tokenizer has no chat template",
                                  hint="send the prompt as is with --raw")
        import jinja2
        try:
            return _compile(self.chat_template).render({
                "tools": None, "documents": None, **self.special_tokens, **kwargs,
                "messages": messages, "add_generation_prompt": add_generation_prompt})
        except jinja2.TemplateError as exc:
            raise CheckpointError(f"{self.source}: the chat template failed ({type(exc).__name__}: {exc})",
                                  hint="send the prompt as is with --raw") from None
