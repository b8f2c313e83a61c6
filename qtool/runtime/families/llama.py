"""Llama-style decoder layer (Llama 1/2/3/3.1/3.2, Mistral, SmolLM2, and the base of qwen2/qwen3).

Contract: `LlamaDecoder(weights, backend).layer(i, x, residual, positions, cache)` computes
pre-norm attention (fused q|k|v linear, optional per-head q/k RMSNorm hook, RoPE + KV write,
causal GQA over the cache, o_proj) and the SwiGLU MLP (fused gate|up, silu*mul, down), returning
(mlp output, residual stream). Biases of q/k/v (qwen2) live in the LinearWeights and are applied
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

    def attention(self, i, a, positions, cache):
        be, L = self.be, self.w.layers[i]
        qkv = be.linear(a, L.qkv)
        nq, nkv = self.hq * self.d, self.hkv * self.d
        q = qkv[:, :nq].reshape(-1, self.hq, self.d)
        k = qkv[:, nq:nq + nkv].reshape(-1, self.hkv, self.d)
        v = qkv[:, nq + nkv:].reshape(-1, self.hkv, self.d)
        q, k = self.qk_norm(L, q, k)
        q = be.rope_and_store(q, k, v, positions, cache, i)
        return be.linear(be.attention(q, cache, i, positions), L.o)

    def mlp(self, i, m):
        be, L = self.be, self.w.layers[i]
        return be.linear(be.silu_mul(be.linear(m, L.gate_up)), L.down)

    def layer(self, i, x, residual, positions, cache):
        be, L = self.be, self.w.layers[i]
        a, residual = be.rmsnorm(x, L.input_norm, self.eps, residual)
        x = self.attention(i, a, positions, cache)
        m, residual = be.rmsnorm(x, L.post_attn_norm, self.eps, residual)
        return self.mlp(i, m), residual
