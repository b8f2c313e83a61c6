"""Next-token selection from logits: greedy, temperature, top-k, top-p (nucleus).

Contract: `sample(logits [B,V], temperature, top_k, top_p, generator)` returns int64 ids [B] on
the logits' device. temperature <= 0 → argmax (ties → lowest id). Otherwise logits/temperature,
keep the `top_k` largest (0 = all), then the smallest set of tokens whose probability mass
reaches `top_p` (1.0 = all; the most likely token is always kept), renormalise and draw with
`generator` (deterministic for a seeded generator). Pure torch, no host synchronisation; shared by
the backends. `nucleus(top_k, top_p)` is what both backends sample with: a top_p below TOP_P_MIN
(it would round to 0 in a float32 comparison or kernel argument) keeps the most likely token only,
i.e. (top_k 1, top_p 1.0).
"""
from __future__ import annotations

import torch

TOP_P_MIN = 1e-30          # float32 holds it (and its sums) as a normal number


def nucleus(top_k: int, top_p: float) -> tuple[int, float]:
    """(top_k, top_p) as the samplers take them: a top_p too small for float32 keeps only the most likely token."""
    if top_p is not None and top_p < TOP_P_MIN:
        return 1, 1.0
    return top_k, top_p


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
        drop_sorted = before >= top_p                # the first token always has before == 0 ...
        drop_sorted[..., 0] = False                  # ... and stays whatever top_p rounds to
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
