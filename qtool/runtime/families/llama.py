"""Llama-style decoder layer (Llama 1/2/3/3.1/3.2, Mistral, SmolLM2, and the base of qwen2/qwen3).

Contract: `LlamaDecoder(weights, backend).layer(i, x, residual, positions, cache)` computes
pre-norm attention (rmsnorm + fused q|k|v linear, optional per-head q/k RMSNorm hook, then RoPE +
KV write + causal GQA over the cache + o_proj) and the SwiGLU MLP (rmsnorm, fused gate|up,
silu*mul, down), returning (mlp output, residual stream); it calls the backend's fused methods
(`rmsnorm_linear`, `attention_with_rope_store`, `rmsnorm_mlp`), so the model code shows what runs. Biases of q/k/v (qwen2) live in the LinearWeights and are applied
by the backend's linear. Sliding-window attention (Mistral v0.1) is not applied.
"""
from __future__ import annotations


class LlamaDecoder:
    def __init__(self, weights, backend):
        self.w = weights
        self.be = backend
        c = weights.config
        self.eps = c.rms_norm_eps
        self.hq, self.hkv, self.d = c.num_heads, c.num_kv_heads, c.head_dim

    def qk_norm(self, layer, q, k):
        """Hook for families that normalise q/k per head before RoPE (identity here)."""
        return q, k

    def layer(self, i, x, residual, positions, cache):
        be, L = self.be, self.w.layers[i]
        qkv, residual = be.rmsnorm_linear(x, L.input_norm, self.eps, residual, L.qkv)
        nq, nkv = self.hq * self.d, self.hkv * self.d
        q = qkv[:, :nq].reshape(-1, self.hq, self.d)
        k = qkv[:, nq:nq + nkv].reshape(-1, self.hkv, self.d)
        v = qkv[:, nq + nkv:].reshape(-1, self.hkv, self.d)
        q, k = self.qk_norm(L, q, k)
        x = be.attention_with_rope_store(q, k, v, positions, cache, i, L.o)
        return be.rmsnorm_mlp(x, L.post_attn_norm, self.eps, residual, L.gate_up, L.down)
