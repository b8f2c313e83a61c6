"""Text generation over a Model: batched prefill, then one decode step per token.

Contract: `generate(model, tok, prompts_ids, opts, kv_format, eos, on_text=None)` right-pads
the prompts into one batch, runs prefill (one forward over all prompt tokens, logits of each
row's last token), then decode steps (a backend's `decode_loop` — one captured graph of step + sampling,
queued one step ahead of the host — else `backend.wrap_decode` of a `forward` with T = 1 and per-row position
tensors) until every row has hit an EOS id, a stop string, or
`opts.max_new_tokens`. Sampling follows opts (temperature 0 = greedy; a seed makes sampling
deterministic). `on_text(row, text)` receives each row's newly decoded text as it comes (held
back while it could be the start of a stop string or an incomplete UTF-8 character). Returns
(list of Completion, Stats). The only host synchronisation per step is reading the sampled ids.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from qtool.errors import UsageError


@dataclass
class GenerateOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str          # 'eos' | 'stop' | 'length'


@dataclass
class Stats:
    backend: str
    kv_cache_dtype: str
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int           # forward passes with T = 1
    decode_tokens: int          # tokens those passes computed (decode_steps × batch here; the engine's rows)
    batch: int
    peak_memory_bytes: int | None
    weight_bytes: int
    kv_cache_bytes: int
    graph_s: float = 0.0        # capturing the decode graph (decode_loop), outside prefill_s and decode_s

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tok_s"] = round(self.prefill_tok_s, 2)
        d["decode_tok_s"] = round(self.decode_tok_s, 2)
        return d


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def stats_line(s: Stats, backend_label: str) -> str:
    batch = f", {s.batch} prompts" if s.batch > 1 else ""
    return (f"prompt {s.prompt_tokens} tok | prefill {s.prefill_tok_s:.1f} tok/s | "
            f"decode {s.decode_tok_s:.1f} tok/s ({s.generated_tokens} tok{batch}) | "
            f"peak mem {_fmt_bytes(s.peak_memory_bytes)} | "
            f"backend {backend_label} | kv {s.kv_cache_dtype} | weights {_fmt_bytes(s.weight_bytes)}")


class TextStream:
    """Incremental detokenisation of one row, with stop-string handling.

    Each token is fed to a `tokenizers` DecodeStream (work per token independent of the length so
    far; it holds a chunk back while it ends in an incomplete UTF-8 character). Text that could be
    the start of a stop string is held back too. `flush()` reconciles with one full decode, so the
    concatenated output always equals `tok.decode(ids)` cut at the first stop string. Tokenizers
    without `decode_stream` (or a stream that loses its prefix) fall back to re-decoding.
    """

    def __init__(self, tok, stops: list[str]):
        self.tok, self.stops = tok, [s for s in stops if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False
        make = getattr(tok, "decode_stream", None)
        self._ds = make(skip_special_tokens=True) if make else None

    def _holdback(self, full: str) -> int:
        if full.endswith("\ufffd"):
            return len(full) - len(full.rstrip("\ufffd"))
        k_max = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    k_max = max(k_max, k)
                    break
        return k_max

    def _decoded(self, token_id: int) -> str:
        """All text decoded so far, after adding token_id."""
        if self._ds is not None:
            try:
                chunk = self._ds.step(self.tok.backend, token_id)
                return self.text + (chunk or "")
            except Exception:  # noqa: BLE001 - DecodeStream raises on a changed prefix; re-decode from here on
                self._ds = None
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def _advance(self, full: str, final: bool = False) -> str:
        for s in self.stops:
            i = full.find(s, max(0, self.emitted - len(s)))
            if i >= 0:
                full = full[:i]
                self.stopped = True
        if self.stopped or final:
            out = full[self.emitted:]
            self.text, self.emitted = full, max(self.emitted, len(full))
            return out
        safe = len(full) - self._holdback(full)
        out = full[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        self.text = full
        return out

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(self._decoded(token_id))

    def flush(self) -> str:
        if not self.stopped:
            full = self.tok.decode(self.ids, skip_special_tokens=True)
            if full.startswith(self.text[:self.emitted]):
                return self._advance(full, final=True)
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


def context_limit(config) -> int:
    """Positions the model allows (prompt + output); 0 = no limit given."""
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def check_prompt_lengths(lens: list[int], limit: int) -> None:
    """UsageError (exit 2) for a prompt of zero tokens or one that leaves no position to generate into."""
    for i, n in enumerate(lens):
        which = "the prompt" if len(lens) == 1 else f"prompt {i + 1} of {len(lens)}"
        if n == 0:
            raise UsageError(f"{which} encodes to zero tokens")
        if limit and n >= limit:
            raise UsageError(f"{which} has {n} tokens; the model allows {limit} positions (prompt + answer)",
                             hint="shorten the prompt")


def generate(model, tok, prompts_ids: list[list[int]], opts: GenerateOptions, kv_format: str, eos: set[int],
             on_text=None) -> tuple[list[Completion], Stats]:
    be = model.backend
    dev = be.device
    B = len(prompts_ids)
    lens = [len(p) for p in prompts_ids]
    limit = context_limit(model.config)
    check_prompt_lengths(lens, limit)
    T = max(lens)
    max_new = opts.max_new_tokens
    if limit:
        max_new = min(max_new, limit - T)
    cache = model.new_cache(B, T + max_new, kv_format)
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts_ids):
        ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    ids = ids.to(dev)
    positions = torch.arange(T, dtype=torch.long).expand(B, T).contiguous().to(dev)
    pos = torch.tensor(lens, dtype=torch.long, device=dev)
    gen = None
    if opts.seed is not None:
        gen = torch.Generator(device=dev)
        gen.manual_seed(opts.seed)

    def pick(logits):
        return be.sample(logits, opts.temperature, opts.top_k, opts.top_p, gen)

    t0 = time.perf_counter()
    tok_ids = pick(model.forward(ids, positions, cache, last_index=pos - 1))
    be.synchronize()
    t1 = time.perf_counter()

    streams = [TextStream(tok, opts.stop) for _ in range(B)]
    finish: list[str | None] = [None] * B
    generated = 0

    def consume(host: list[int]) -> bool:
        """Hand one step's sampled ids to the rows' streams; True when every row has finished."""
        nonlocal generated
        for b in range(B):
            if finish[b]:
                continue
            if host[b] in eos:
                finish[b] = "eos"
                continue
            generated += 1
            out = streams[b].add(host[b])
            if out and on_text:
                on_text(b, out)
            if streams[b].stopped:
                finish[b] = "stop"
        return all(finish)

    graph_s = 0.0
    if getattr(be, "decode_loop", None) is not None and gen is None and max_new > 1:
        t = time.perf_counter()
        loop = be.decode_loop(lambda i, p: model.forward(i, p, cache), tok_ids[:, None], pos[:, None],
                              opts.temperature, opts.top_k, opts.top_p)
        be.synchronize()
        graph_s = time.perf_counter() - t
        steps = _pipelined(loop, tok_ids, max_new, consume)
    else:
        step = be.wrap_decode(lambda i, p: model.forward(i, p, cache))
        steps = 0
        for n in range(max_new):
            if consume(tok_ids.tolist()) or n == max_new - 1:
                break
            tok_ids = pick(step(tok_ids[:, None], pos[:, None]))
            pos = pos + 1
            steps += 1
    be.synchronize()
    t2 = time.perf_counter()
    results = []
    for b in range(B):
        rest = streams[b].flush()
        if rest and on_text:
            on_text(b, rest)
        results.append(Completion(streams[b].text, streams[b].ids, lens[b], finish[b] or "length"))
    stats = Stats(backend=be.name, kv_cache_dtype=kv_format, prompt_tokens=sum(lens), generated_tokens=generated,
                  prefill_s=t1 - t0, decode_s=t2 - t1 - graph_s, decode_steps=steps, decode_tokens=steps * B, batch=B,
                  peak_memory_bytes=be.peak_memory_bytes(),
                  weight_bytes=model.weights.nbytes(), kv_cache_bytes=be.cache_nbytes(cache), graph_s=graph_s)
    return results, stats


def _pipelined(loop, first, max_new: int, consume) -> int:
    """Decode with a captured step + sampling graph (``backend.decode_loop``), one step ahead of the host: step
    n + 1 is queued before token n is read back (through pinned memory and an event), so detokenising and
    streaming token n overlap the GPU's work on the next. Returns the decode steps whose tokens were consumed
    (a step queued past the last consumed token is computed and dropped)."""
    B = first.shape[0]
    host = torch.empty(max_new, B, dtype=first.dtype, pin_memory=True)
    events = []

    def queue(n: int, src) -> None:
        host[n].copy_(src, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        events.append(ev)
    queue(0, first)
    for n in range(max_new):
        if n + 1 < max_new:
            queue(n + 1, loop.next())
        events[n].synchronize()
        if consume(host[n].tolist()):
            return n
    return max_new - 1
