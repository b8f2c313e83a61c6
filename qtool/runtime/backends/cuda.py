"""The CUDA backend: qtool's own kernels (kernels_cuda/*.cu via CuPy NVRTC) on torch CUDA tensors.

Contract: implements qtool.runtime.backend.Backend with the numerics of docs/numerics.md, within its stated
tolerances (activations and the residual stream are float32 here, so the only differences from the reference
are accumulation order and the quantized formats' own rounding). One allocator: every buffer is a torch tensor;
kernels run on torch's current stream. ``prepare`` repacks each linear layer once on the GPU
(qtool/kernels/weights.py); NVFP4/MXFP4 weights and the nvfp4 KV cache run on any sm_89+ GPU by decoding in
registers. ``wrap_decode`` captures the decode step (all layers + final logits) in one CUDA graph;
``decode_loop`` captures decode + sampling + the position advance, so a token costs one graph replay and no
host synchronisation. Importing this module does not import cupy (the loader does, on first launch).
"""
from __future__ import annotations

import torch

from qtool.kernels import gemm, l2_warm, ops
from qtool.kernels.weights import KLinear, prepare_linear
from qtool.runtime import rope


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
        self._consumer: dict[int, object] = {}   # id(norm weight) -> the LinearWeights reading its output
        self._down: dict[int, object] = {}       # id(gate_up LinearWeights) -> that layer's down projection
        self._o_proj: list = []                  # layer index -> its o projection (reads the attention output)
        self._next_down = None                   # the down projection after the last gate_up linear
        self._pre: dict = {}                     # (data_ptr of a norm output, id(linear)) -> quantized forms
        self._silu_done: dict = {}               # data_ptr of a gate_up placeholder -> (silu output, pre of down)
        self._rope_pending: dict = {}            # data_ptr of a rotated-q placeholder -> (q, (k, v, cos, sin))
        self.fuse = True
        self._warm: l2_warm.Warmer | None = None   # decode: L2 warming of each layer's weights on a graph branch
        self._layer_lin: list[dict] = []          # layer index -> {"o" | "gu" | "down": its prepared linear}

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
            self._consumer[id(L.input_norm)] = L.qkv
            self._consumer[id(L.post_attn_norm)] = L.gate_up
            self._down[id(L.gate_up)] = L.down
            gu, down = self._lin[id(L.gate_up)], self._lin[id(L.down)]
            if ops.silu_fusable(gu, down):   # decode: silu * mul + down's input quantization in gate_up's GEMV
                self._lin[id(L.gate_up)] = ops.interleave_gate_up(gu)
        self._o_proj = [L.o for L in weights.layers]
        self._layer_lin = [{"o": self._lin[id(L.o)], "gu": self._lin[id(L.gate_up)], "down": self._lin[id(L.down)]}
                           for L in weights.layers]
        self._warm = l2_warm.Warmer()
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
        self._pre.clear()
        self._silu_done.clear()
        self._rope_pending.clear()
        return ops.embed(ids, self.embed_table)

    def rmsnorm(self, x, weight, eps, residual=None):
        lw = self._consumer.get(id(weight)) if self.fuse else None
        kl = self._lin.get(id(lw)) if lw is not None else None
        if isinstance(kl, KLinear) and x.dim() == 2 and x.shape[0] <= 8:
            y, res, pre = ops.rmsnorm_quant(x, self._norm(weight), eps, residual, kl, keep_out=False)
            if pre is not None:   # the next linear(y, lw) skips its own activation quantization
                self._pre[(y.data_ptr(), id(kl))] = pre
            return y, res
        return ops.rmsnorm(x, self._norm(weight), eps, residual)

    def head_rmsnorm(self, x, weight, eps):
        return ops.rmsnorm(x, self._norm(weight), eps)[0]

    def silu_mul(self, gate_up):
        lw, self._next_down = self._next_down, None
        done = self._silu_done.pop(gate_up.data_ptr(), None)
        if done is not None:     # computed by linear(x, gate_up) (ops.gate_up_silu)
            out, pre = done
            if pre is not None:
                self._pre[(out.data_ptr(), id(self._lin[id(lw)]))] = pre
            return out
        kl = self._lin.get(id(lw)) if (lw is not None and self.fuse) else None
        if isinstance(kl, KLinear) and gate_up.dim() == 2 and gate_up.shape[0] <= 8:
            out, pre = ops.silu_mul_quant(gate_up, kl, keep_out=False)
            if pre is not None:   # the next linear(out, down) skips its own activation quantization
                self._pre[(out.data_ptr(), id(kl))] = pre
            return out
        return ops.silu_mul(gate_up)

    def linear(self, x, lw):
        self._next_down = self._down.get(id(lw))
        kl = self._lin[id(lw)]
        if isinstance(kl, list):
            return torch.cat([ops.linear(x, p) for p in kl], dim=-1)
        pre = self._pre.pop((x.data_ptr(), id(kl)), None) if self._pre else None
        if pre is not None and x.shape[0] != pre.get("xq", pre.get("xh")).shape[0]:
            pre = None
        if kl.il:                # interleaved gate|up: silu_mul(returned tensor) hands back ops.gate_up_silu's act
            down = self._next_down and self._lin.get(id(self._next_down))
            done = ops.gate_up_silu(x, kl, down if isinstance(down, KLinear) else None, pre, self.fuse)
            gu = torch.empty(1, 1, dtype=torch.float32, device=self.device).expand(x.shape[0], kl.out_features)
            self._silu_done[gu.data_ptr()] = done
            return gu
        return ops.linear(x, kl, pre=pre)

    def final_logits(self, x):
        h, _ = ops.rmsnorm(x, self.final_norm, self.config.rms_norm_eps)
        logits = self.linear(h, self.weights.lm_head)
        if self._warm:
            self._warm.join()      # the warming branches rejoin before the step (or its captured graph) ends
        return logits

    # -- KV cache and attention ----------------------------------------------------------------
    def new_cache(self, batch, max_len, kv_format):
        c = self.config
        self._ensure_rope(max_len)
        o = self._lin.get(id(self._o_proj[0])) if self._o_proj and self.fuse else None
        return ops.KVCache(kv_format, batch, max_len, c.num_layers, c.num_kv_heads, c.head_dim, self.device,
                           self.k_scales, self.v_scales, o_proj=o if isinstance(o, KLinear) else None)

    def cache_nbytes(self, cache) -> int:
        return cache.nbytes()

    def rope_and_store(self, q, k, v, positions, cache, layer):
        if self._warm and self.fuse and positions.shape[1] == 1 and layer < len(self._layer_lin):
            self._warm.fork(self._layer_lin[layer])   # runs beside rope + attention (l2_warm.py)
        if self.fuse and ops.rope_fusable(q, positions.shape[1]):
            # decode: attention(placeholder) rotates q, k and writes the cache itself (attn_partial with cos)
            ph = torch.empty(1, 1, 1, dtype=torch.float32, device=self.device).expand(q.shape)
            self._rope_pending[ph.data_ptr()] = (q, (k, v, self._cos, self._sin))
            return ph
        return ops.rope_and_store(q, k, v, positions, cache, layer, self._cos, self._sin, positions.shape[1])

    def attention(self, q, cache, layer, positions):
        T = positions.shape[1]
        q, rope = self._rope_pending.pop(q.data_ptr(), (q, None))
        kl = self._lin.get(id(self._o_proj[layer])) if (self.fuse and layer < len(self._o_proj)) else None
        if isinstance(kl, KLinear) and q.shape[0] <= 8:
            out, pre = ops.attention_quant(q, positions, cache, layer, T, kl, keep_out=False, rope=rope)
            if pre is not None:   # the next linear(out, o) skips its own activation quantization
                self._pre[(out.data_ptr(), id(kl))] = pre
            return out
        return ops.attention(q, positions, cache, layer, T, rope)

    # -- sampling, graphs, misc ----------------------------------------------------------------
    def sample(self, logits, temperature, top_k, top_p, generator):
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
        return DecodeLoop(self, step, ids, positions, temperature, top_k, top_p)


def warm_and_capture(fn):
    """(CUDA graph of fn(), its output): fn runs once on a side stream first (kernels compiled and loaded outside
    the capture), then is captured."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()                      # warm-up: compiles/loads every kernel outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
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
