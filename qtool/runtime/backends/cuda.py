"""The CUDA backend: qtool's own kernels (kernels_cuda/*.cu via CuPy NVRTC) on torch CUDA tensors.

Contract: implements qtool.runtime.backend.Backend with the numerics of docs/numerics.md, within its stated
tolerances (activations and the residual stream are float32 here, so the only differences from the reference
are accumulation order and the quantized formats' own rounding). One allocator: every buffer is a torch tensor;
kernels run on torch's current stream. ``prepare`` repacks each linear layer once on the GPU
(qtool/kernels/weights.py); NVFP4/MXFP4 weights and the nvfp4 KV cache run on any sm_89+ GPU by decoding in
registers. The fused methods (``rmsnorm_linear``, ``attention_with_rope_store``, ``rmsnorm_mlp``) run the
kernel sequences of qtool.kernels.ops (``norm_linear``, ``attention_o``, ``norm_mlp``); the plain ops run one
kernel each. Prefill attention (T > 1) runs qtool.kernels.prefill_attention (torch's fused float32 SDPA over the K/V
decoded to float32) wherever it applies. ``wrap_decode`` captures the decode step (all layers + final logits) in one CUDA graph;
``decode_loop`` captures decode + sampling + the position advance, so a token costs one graph replay and no
host synchronisation. Importing this module does not import cupy (the loader does, on first launch).
"""
from __future__ import annotations

import torch

from qtool.kernels import gemm, ops, prefill_attention
from qtool.kernels.weights import KLinear, prepare_linear
from qtool.runtime import rope
from qtool.runtime.sampling import nucleus


class CudaBackend:
    name = "cuda"

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device or "cuda")
        self.act_dtype = torch.float32
        self._lin: dict[int, KLinear | list] = {}
        self._rng = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._cos = self._sin = None
        self._old_tables: list = []
        self.notes: list[str] = []
        self._o_proj: list = []                  # layer index -> its o projection (sets the cache's split length)
        self.fuse = True                         # False: the fused methods compose the plain ops (comparisons)

    # -- weights -----------------------------------------------------------------------------
    def prepare(self, weights) -> None:
        dev = self.device
        self.weights = weights
        c = self.config = weights.config
        emb = weights.embed
        self.embed_table = emb.to(dev, torch.bfloat16 if emb.dtype == torch.bfloat16 else torch.float32)
        self.final_norm = weights.final_norm.to(dev, torch.float32)
        self.inv_freq = rope.inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        self.norms = {}
        for L in weights.layers:
            for t in (L.input_norm, L.post_attn_norm, L.q_norm, L.k_norm):
                if t is not None:
                    self.norms[id(t)] = t.to(dev, torch.float32).contiguous()
            for lw in (L.qkv, L.o, L.gate_up, L.down):
                self._register(lw)
            gu, down = self._lin[id(L.gate_up)], self._lin[id(L.down)]
            if ops.silu_fusable(gu, down):   # decode: silu * mul + down's input quantization in gate_up's GEMV
                self._lin[id(L.gate_up)] = ops.interleave_gate_up(gu)
        self._o_proj = [L.o for L in weights.layers]
        gemm.keep_row_major(list(self._lin.values()))   # tiled fp8: row-major codes for prefill / batched GEMMs
        head = weights.lm_head
        hw = head.tensors.get("weight")
        if (head.format == "bf16" and hw is not None and hw.data_ptr() == emb.data_ptr()
                and self.embed_table.dtype == torch.bfloat16 and head.bias is None):
            self._lin[id(head)] = KLinear(0, head.out_features, head.in_features, self.embed_table,
                                          note="tied to the embedding")
        else:
            self._register(head)
        self.k_scales = [1.0 if L.k_scale is None else float(L.k_scale) for L in weights.layers]
        self.v_scales = [1.0 if L.v_scale is None else float(L.v_scale) for L in weights.layers]
        self._ensure_rope(min(c.max_position_embeddings or 4096, 4096))

    def _register(self, lw) -> None:
        if id(lw) in self._lin:
            return
        if lw.parts is not None:
            for p in lw.parts:
                self._register(p)
            self._lin[id(lw)] = [self._lin[id(p)] for p in lw.parts]
            return
        kl = ops.adopt_layout(prepare_linear(lw, self.device))
        if kl.note and kl.note not in self.notes:
            self.notes.append(kl.note)
        self._lin[id(lw)] = kl

    def _ensure_rope(self, n: int) -> None:
        if self._cos is not None and self._cos.shape[0] >= n:
            return
        if self._cos is not None:
            self._old_tables.append((self._cos, self._sin))   # captured graphs may still read them
        cos, sin = rope.cos_sin(self.inv_freq, torch.arange(n))
        half = self.config.head_dim // 2
        self._cos = cos[:, :half].contiguous().to(self.device)
        self._sin = sin[:, :half].contiguous().to(self.device)

    def _norm(self, w: torch.Tensor) -> torch.Tensor:
        t = self.norms.get(id(w))
        return t if t is not None else w.to(self.device, torch.float32)

    # -- ops -----------------------------------------------------------------------------------
    def embed(self, ids):
        return ops.embed(ids, self.embed_table)

    def rmsnorm(self, x, weight, eps, residual=None):
        return ops.rmsnorm(x, self._norm(weight), eps, residual)

    def head_rmsnorm(self, x, weight, eps):
        return ops.rmsnorm(x, self._norm(weight), eps)[0]

    def silu_mul(self, gate_up):
        return ops.silu_mul(gate_up)

    def linear(self, x, lw):
        kl = self._lin[id(lw)]
        if isinstance(kl, list):
            return torch.cat([ops.linear(x, p) for p in kl], dim=-1)
        y = ops.linear(x, kl)
        return ops.deinterleave(y, kl.il) if kl.il else y

    def final_logits(self, x):
        h, _ = ops.rmsnorm(x, self.final_norm, self.config.rms_norm_eps)
        return self.linear(h, self.weights.lm_head)

    # -- fused sequences -------------------------------------------------------------------------
    def rmsnorm_linear(self, x, weight, eps, residual, lw):
        kl = self._lin[id(lw)]
        if isinstance(kl, list) or kl.il:
            y, residual = self.rmsnorm(x, weight, eps, residual)
            return self.linear(y, lw), residual
        return ops.norm_linear(x, self._norm(weight), eps, residual, kl, self.fuse)

    def rmsnorm_mlp(self, x, weight, eps, residual, gate_up, down):
        gu, dn = self._lin[id(gate_up)], self._lin[id(down)]
        if isinstance(gu, list) or isinstance(dn, list):
            m, residual = self.rmsnorm(x, weight, eps, residual)
            return self.linear(self.silu_mul(self.linear(m, gate_up)), down), residual
        return ops.norm_mlp(x, self._norm(weight), eps, residual, gu, dn, self.fuse)

    def attention_with_rope_store(self, q, k, v, positions, cache, layer, o):
        kl = self._lin[id(o)]
        if isinstance(kl, list) or prefill_attention.applies(q, positions, cache):
            return self.linear(self.attention(self.rope_and_store(q, k, v, positions, cache, layer), cache, layer,
                                              positions), o)
        return ops.attention_o(q, k, v, positions, cache, layer, self._cos, self._sin, kl, self.fuse)

    # -- KV cache and attention ----------------------------------------------------------------
    def new_cache(self, batch, max_len, kv_format):
        c = self.config
        self._ensure_rope(max_len)
        return ops.KVCache(kv_format, batch, max_len, c.num_layers, c.num_kv_heads, c.head_dim, self.device,
                           self.k_scales, self.v_scales, o_proj=self._first_o())

    def new_paged_cache(self, num_blocks, block_size, kv_format, max_batch=64, max_blocks_per_seq=None):
        """ops.PagedKVCache: `num_blocks` blocks of `block_size` positions, `block_tables` [max_batch,
        max_blocks_per_seq] (default: num_blocks) on the device, all zero (every row on the dummy block 0)."""
        c = self.config
        per_row = max_blocks_per_seq or num_blocks
        self._ensure_rope(per_row * block_size)
        return ops.PagedKVCache(kv_format, num_blocks, block_size, max_batch, per_row, c.num_layers, c.num_kv_heads,
                                c.head_dim, self.device, self.k_scales, self.v_scales, o_proj=self._first_o())

    def _first_o(self):
        """The first o projection's KLinear (its input quantization sets a cache's attention split length);
        None when unfused or kept in parts."""
        o = self._lin.get(id(self._o_proj[0])) if self._o_proj and self.fuse else None
        return o if isinstance(o, KLinear) else None

    def cache_nbytes(self, cache) -> int:
        return cache.nbytes()

    def rope_and_store(self, q, k, v, positions, cache, layer):
        return ops.rope_and_store(q, k, v, positions, cache, layer, self._cos, self._sin, positions.shape[1])

    def attention(self, q, cache, layer, positions):
        if prefill_attention.applies(q, positions, cache):      # T > 1: float32 SDPA
            return prefill_attention.attention(q, positions, cache, layer)
        return ops.attention(q, positions, cache, layer, positions.shape[1])

    # -- sampling, graphs, misc ----------------------------------------------------------------
    def sample(self, logits, temperature, top_k, top_p, generator):
        top_k, top_p = nucleus(top_k, top_p)
        u = None
        if temperature and temperature > 0 and generator is not None:
            u = torch.rand(logits.shape[0], generator=generator, device=generator.device).to(self.device)
        return ops.sample(logits, temperature or 0.0, top_k or 0, top_p if top_p else 1.0, u=u,
                          rng=None if u is not None else self._rng)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def peak_memory_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device))

    def wrap_decode(self, step):
        graphs: dict = {}

        def graphed(ids, positions):
            key = tuple(ids.shape)
            g = graphs.get(key)
            if g is None:
                g = graphs[key] = _Captured(step, ids, positions)
            return g(ids, positions)
        return graphed

    def decode_loop(self, step, ids, positions, temperature=0.0, top_k=0, top_p=1.0):
        """A captured decode step that also samples and advances: returns ``DecodeLoop``."""
        return DecodeLoop(self, step, ids, positions, temperature, *nucleus(top_k, top_p))


def warm_and_capture(fn):
    """(CUDA graph of fn(), its output): fn runs once on a side stream first (kernels compiled and loaded outside
    the capture), then is captured with the cycle collector off: a dead cycle holding an earlier graph or its
    memory (e.g. a dropped Engine), collected mid-capture, would free device memory inside the capture and
    invalidate it (torch no longer collects before capturing; collecting here would cost ~0.1 s per capture)."""
    import gc
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()                      # warm-up: compiles/loads every kernel outside the capture
    torch.cuda.current_stream().wait_stream(s)
    enabled = gc.isenabled()
    gc.disable()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
    finally:
        if enabled:
            gc.enable()
    return g, out


class _Captured:
    """CUDA graph of ``step(ids, positions) -> logits`` over static input buffers.

    The warm-up run before capture writes the same cache slots the replays will, so it leaves no trace."""

    def __init__(self, step, ids, positions):
        self.ids = ids.clone()
        self.pos = positions.clone()
        self.graph, self.out = warm_and_capture(lambda: step(self.ids, self.pos))

    def __call__(self, ids, positions):
        self.ids.copy_(ids)
        self.pos.copy_(positions)
        self.graph.replay()
        return self.out.clone()


class DecodeLoop:
    """One graph = decode step + sampling + ``ids <- token, positions += 1``; ``next()`` returns the token
    buffer [B] (device) after one replay. Only one host call per token, no synchronisation."""

    def __init__(self, be, step, ids, positions, temperature, top_k, top_p):
        self.ids = ids.clone()
        self.pos = positions.clone()
        start_ids, start_pos = self.ids.clone(), self.pos.clone()

        def body():
            logits = step(self.ids, self.pos)
            tok = ops.sample(logits, temperature, top_k, top_p, rng=be._rng)
            self.ids.copy_(tok.view_as(self.ids))
            self.pos.add_(1)
            return tok
        self.graph, self.tok = warm_and_capture(body)
        self.ids.copy_(start_ids)    # undo the warm-up's advance (its cache writes are overwritten later)
        self.pos.copy_(start_pos)

    def next(self) -> torch.Tensor:
        self.graph.replay()
        return self.tok
