"""Requests, per-request sampling parameters, and the outputs the engine streams back (no torch).

Contract: `SamplingParams` holds what one request asks for (temperature below 1e-5 = greedy, top_k 0 = all,
top_p 1 = all, seed, stop strings, max_tokens, ignore_eos, logprobs = return the chosen token's
log-probability and the top-1 alternative). `Request(id, prompt_ids, params, on_output)` is what the
engine schedules; its state (`num_computed` KV positions, output ids, timing) belongs to the engine.
`Output` is one delivery: new text and token ids since the last one, their logprobs, and on the last
one `finished` with `finish_reason` in {'stop', 'length', 'abort'}.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

GREEDY_BELOW = 1e-5     # a temperature this small is greedy (as vLLM's _SAMPLING_EPS): logits / T would overflow


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class Output:
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[tuple[float, int, float]] | None = None     # (chosen logprob, top-1 id, top-1 logprob)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None] | None = None
    arrival: float = field(default_factory=time.monotonic)
    # engine state
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0            # positions whose K/V are in the cache
    generator: object = None
    stream: object = None            # TextStream
    first_token_time: float | None = None
    cached_tokens: int | None = None   # prompt tokens found in the prefix cache at first admission
    finished: bool = False
    preemptions: int = 0

    all_ids: list[int] = field(default_factory=list)   # prompt + output (kept by the engine, not rebuilt)

    def __post_init__(self):
        self.all_ids = list(self.prompt_ids) + list(self.output_ids)
