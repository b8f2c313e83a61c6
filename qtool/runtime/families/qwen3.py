"""Qwen3: the Llama decoder plus per-head RMSNorm of q and k (over head_dim) before RoPE.

Contract: `qk_norm` applies `backend.head_rmsnorm` with the layer's q_norm / k_norm weights.
"""
from __future__ import annotations

from qtool.runtime.families.llama import LlamaDecoder


class Qwen3Decoder(LlamaDecoder):
    def qk_norm(self, layer, q, k):
        return (self.be.head_rmsnorm(q, layer.q_norm, self.eps),
                self.be.head_rmsnorm(k, layer.k_norm, self.eps))
