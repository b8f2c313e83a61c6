"""Calibration data for ``qtool quantize``: read ``--calib-data`` (or the embedded corpus) and batch it.

Contract:
  * ``calibration_texts(source, size)`` -> ``(texts, description)``. ``source`` is a ``.txt`` file
    (documents separated by blank lines), a ``.jsonl`` file (one JSON object per line with a
    ``text`` string or chat ``messages`` [{role, content}, ...]), a folder holding such files
    (recursively, sorted), or ``None`` for the embedded default corpus (no network needed; see
    docs/calibration.md). At most ``size`` texts are returned, chosen deterministically (seed 0);
    fewer when the source has fewer. Chat records come back as ``ChatText``: a ``str`` holding
    "role: content" lines that also keeps ``.messages``. Bad paths/formats raise ``UsageError``.
  * ``calibration_batches(tokenizer, texts, seq_len, batch_size)`` -> list of
    ``{"input_ids", "attention_mask"}`` LongTensor dicts: ``ChatText`` is rendered with the
    tokenizer's chat template when it has one, every text is truncated to ``seq_len`` tokens,
    texts are ordered by length (less padding) and right-padded within a batch.
Deterministic: same inputs give the same texts and batches. torch is imported only inside functions.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from qtool.errors import UsageError

SEED = 0
DATA_DIR = Path(__file__).parent / "data"
CHUNK_CHARS = 2000          # default-corpus documents are packed to about this many characters
DEFAULT_SHARES = (("reference", 0.55), ("mix", 0.30), ("chat", 0.15))
SUFFIXES = (".txt", ".jsonl")


class ChatText(str):
    """A chat record: the str is plain "role: content" lines; ``messages`` keeps the structure."""

    messages: list

    def __new__(cls, messages: list):
        obj = super().__new__(cls, "\n".join(f"{m['role']}: {m['content']}" for m in messages))
        obj.messages = messages
        return obj


# ---------------------------------------------------------------- reading sources

def calibration_texts(source, size: int) -> tuple[list[str], str]:
    """Up to ``size`` calibration texts from ``source`` (None = embedded default corpus) and a description."""
    if not isinstance(size, int) or size < 1:
        raise UsageError(f"--calib-size must be a positive integer, got {size!r}")
    if source is None:
        return _default_corpus(size)
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"calibration data not found: {source}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise UsageError(f"no .txt or .jsonl files in calibration folder: {source}")
        docs = [d for f in files for d in read_calibration_file(f)]
        kind = f"folder {path} ({len(files)} files)"
    else:
        docs = read_calibration_file(path)
        kind = f"{path}"
    if not docs:
        raise UsageError(f"calibration data has no text: {source}")
    texts = _sample(docs, size)
    return texts, f"{kind}: {_count(texts, docs, size)}"


def read_calibration_file(path: Path) -> list[str]:
    """All documents of one .txt or .jsonl file (UsageError for other types or bad content)."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"calibration data must be .txt, .jsonl or a folder of them: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"calibration file is not UTF-8 text: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read calibration file {path}: {exc.strerror}") from None
    return split_documents(raw) if suffix == ".txt" else _parse_jsonl(raw, path)


def split_documents(raw: str) -> list[str]:
    """Documents of a .txt file: blocks separated by one or more blank lines."""
    docs, block = [], []
    for line in raw.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            docs.append("\n".join(block))
            block = []
    if block:
        docs.append("\n".join(block))
    return docs


def _parse_jsonl(raw: str, path: Path) -> list[str]:
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"line {n} of {path} is not valid JSON") from None
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            if rec["text"].strip():
                docs.append(rec["text"])
        elif isinstance(rec, dict) and _valid_messages(rec.get("messages")):
            docs.append(ChatText([{"role": m["role"], "content": m["content"]} for m in rec["messages"]]))
        else:
            raise UsageError(f"line {n} of {path} has neither a 'text' string nor chat 'messages' "
                             "[{\"role\": ..., \"content\": ...}]")
    return docs


def _valid_messages(messages) -> bool:
    return (isinstance(messages, list) and bool(messages)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages))


def _sample(docs: list, size: int) -> list:
    """``size`` documents chosen with a fixed seed, kept in source order (all when fewer)."""
    if len(docs) <= size:
        return list(docs)
    keep = sorted(random.Random(SEED).sample(range(len(docs)), size))
    return [docs[i] for i in keep]


def _count(texts: list, docs: list, size: int) -> str:
    note = f" (the source has only {len(docs)})" if len(docs) < size else f" of {len(docs)}"
    return f"{len(texts)} samples{note}"


# ---------------------------------------------------------------- the embedded default corpus

def default_corpus_pools() -> dict[str, list[str]]:
    """The default corpus by part: 'reference' (CPython's pydoc_data), 'mix' and 'chat' (qtool/data)."""
    return {"reference": _pack(_python_reference_docs()),
            "mix": split_documents((DATA_DIR / "calib_mix.txt").read_text(encoding="utf-8")),
            "chat": _parse_jsonl((DATA_DIR / "calib_chat.jsonl").read_text(encoding="utf-8"),
                                 DATA_DIR / "calib_chat.jsonl")}


def _python_reference_docs() -> list[str]:
    """Paragraph groups of the Python language reference shipped with CPython (pydoc_data.topics)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:   # some distributions split pydoc_data out; the rest of the corpus still works
        return []
    docs = []
    for key in sorted(topics):
        docs.append(_pack(split_documents(topics[key])))
    return [d for group in docs for d in group]


def _pack(paragraphs: list[str], limit: int = CHUNK_CHARS) -> list[str]:
    """Join consecutive paragraphs into chunks of at most ``limit`` characters (longer ones kept whole)."""
    chunks, cur = [], ""
    for p in paragraphs:
        if cur and len(cur) + 2 + len(p) > limit:
            chunks.append(cur)
            cur = p
        else:
            cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        chunks.append(cur)
    return chunks


def _default_corpus(size: int) -> tuple[list[str], str]:
    pools = default_corpus_pools()
    total = sum(len(v) for v in pools.values())
    want = {name: min(len(pools[name]), math.ceil(size * share)) for name, share in DEFAULT_SHARES}
    short = size - sum(want.values())
    for name, _ in DEFAULT_SHARES:        # give what a small pool cannot supply to the others
        if short <= 0:
            break
        extra = min(short, len(pools[name]) - want[name])
        want[name] += extra
        short -= extra
    while sum(want.values()) > size:      # ceil() can overshoot by a few
        name = max(want, key=want.get)
        want[name] -= 1
    picked = {name: _sample(pools[name], want[name]) for name in want}
    texts = [t for name, _ in DEFAULT_SHARES for t in picked[name]]
    random.Random(SEED).shuffle(texts)
    parts = (f"{len(picked['reference'])} Python language reference sections from CPython's pydoc_data, "
             f"{len(picked['mix'])} varied English passages and {len(picked['chat'])} chat dialogues from qtool/data")
    return texts, f"qtool default corpus: {_count(texts, [None] * total, size)} ({parts})"


# ---------------------------------------------------------------- batching

def render_text(tokenizer, text: str) -> tuple[str, bool]:
    """(string to tokenize, whether it already carries special tokens) for one calibration text."""
    if isinstance(text, ChatText) and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(text.messages, tokenize=False), True
        except Exception:   # a template that rejects these roles: fall back to plain lines
            pass
    return str(text), False


def calibration_batches(tokenizer, texts, seq_len: int, batch_size: int) -> list[dict]:
    """Tokenize, truncate to ``seq_len``, sort by length and pad into ``batch_size`` batches."""
    import torch

    if seq_len < 1 or batch_size < 1:
        raise UsageError(f"--calib-seq-len and --batch-size must be positive (got {seq_len}, {batch_size})")
    seqs = []
    for text in texts:
        rendered, templated = render_text(tokenizer, text)
        ids = tokenizer(rendered, add_special_tokens=not templated, truncation=True,
                        max_length=seq_len)["input_ids"]
        if ids:
            seqs.append(list(ids[:seq_len]))
    if not seqs:
        raise UsageError("calibration texts produced no tokens")
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    pad = _pad_id(tokenizer)
    batches = []
    for start in range(0, len(order), batch_size):
        group = [seqs[i] for i in order[start:start + batch_size]]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, s in enumerate(group):
            ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, :len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
