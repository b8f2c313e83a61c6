"""The decoder model, written once against the Backend protocol (qtool/runtime/backend.py).

Contract: `Model(weights, backend)` prepares the backend and picks the family module for
`weights.config.family` (qtool/runtime/families/). `forward(ids [B,T], positions [B,T], cache,
last_index=None)` runs embedding, every decoder layer and the final norm + lm_head, writing the
K/V of every position into `cache`; it returns float32 logits `[B, V]` of the rows' last tokens
(`last_index` [B] picks a column per row, default T-1), or `[B, T, V]` with `all_logits=True`.
Prefill (T > 1) and decode (T = 1) take the same path. The decode path is CUDA-graph friendly:
no host synchronisation and no Python branching on tensor values.
"""
from __future__ import annotations

import torch

from qtool.runtime.families import family_class


class Model:
    def __init__(self, weights, backend):
        self.weights = weights
        self.config = weights.config
        self.backend = backend
        backend.prepare(weights)
        self.decoder = family_class(self.config)(weights, backend)

    def new_cache(self, batch: int, max_len: int, kv_format: str):
        return self.backend.new_cache(batch, max_len, kv_format)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache, last_index: torch.Tensor | None = None,
                all_logits: bool = False) -> torch.Tensor:
        be = self.backend
        B, T = ids.shape
        x = be.embed(ids)
        residual = None
        for i in range(self.config.num_layers):
            x, residual = self.decoder.layer(i, x, residual, positions, cache)
        h = x + residual if residual is not None else x
        if all_logits:
            return be.final_logits(h).view(B, T, -1)
        if T == 1:
            rows = h
        else:
            col = last_index if last_index is not None else torch.full((B,), T - 1, dtype=torch.long,
                                                                         device=h.device)
            rows = h.index_select(0, torch.arange(B, device=h.device) * T + col.to(h.device))
        return be.final_logits(rows)
