"""Next-token selection from logits: greedy, temperature, top-k, top-p (nucleus).

Contract: `sample(logits [B,V], temperature, top_k, top_p, generator)` returns int64 ids [B] on
the logits' device. temperature <= 0 → argmax (ties → lowest id). Otherwise logits/temperature,
keep the `top_k` largest (0 = all), then the smallest set of tokens whose probability mass
reaches `top_p` (1.0 = all; the most likely token is always kept), renormalise and draw with
`generator` (deterministic for a seeded generator). Pure torch, no host synchronisation; shared by
the backends.
"""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs        # mass of the tokens ranked above
        drop_sorted = before >= top_p                # the first token always has before == 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
