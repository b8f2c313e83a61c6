"""The boundary between qtool's model code and a compute backend (PyTorch reference, CUDA).

Contract: the model code (`qtool/runtime/model.py`, `families/`) is written once against the
`Backend` protocol below and never touches a tensor's storage format; a backend owns the device,
the activation dtype, the in-memory form of the weights (after `prepare`) and of the KV cache.
Numerics of every op are those of docs/numerics.md; `backends/torch_ref.py` defines them.

Shapes: `N = B*T` flattened tokens (row `b*T + t`), `H` hidden size, `Hq`/`Hkv` query/KV heads,
`d` head_dim. `ids` and `positions` are int64 tensors `[B, T]` on `backend.device`; position
`p` of row `b` is the cache slot its K/V are written to, and a query at position `p` attends to
the slots `0..p` of its row (so right-padded batches need no extra mask: a padded slot is
overwritten before any later query can see it).

CUDA-graph rules (for the decode step, T = 1): no method may synchronise with the host or branch
in Python on tensor values; everything that varies per step (ids, positions) is a tensor.

Fusion is part of the protocol: the model code calls the fused methods `rmsnorm_linear`,
`attention_with_rope_store` and `rmsnorm_mlp` (each defined as a composition of the plain ops, which
is how the reference implements them, bit for bit); a backend runs each as one kernel sequence
(the CUDA backend: rmsnorm writing the next linear's quantized input, RoPE + KV write inside the
attention kernel, the attention merge quantizing for the o projection, gate|up + silu in one GEMV).

Methods beyond the list in the brief (all have trivial implementations in the reference):
`synchronize()` (wait for queued work, for timing), `peak_memory_bytes()` (for the stats line),
`wrap_decode(step)` (a backend may return a CUDA-graph-captured replacement of the decode
step `step(ids, positions) -> logits`, whose inputs it may copy into static buffers; the
reference returns `step` unchanged), `cache_nbytes(cache)`.

Serving (qtool/engine/) also needs `new_paged_cache(num_blocks, block_size, kv_format, max_batch,
max_blocks_per_seq)`: a pool of fixed-size KV blocks with an int32 `block_tables` [max_batch,
max_blocks_per_seq] the engine fills in place before each step (a static buffer, so graphs can
capture it); with such a cache, position p of row b lives in block `block_tables[b, p // block_size]`,
slot `p % block_size`, and padded rows point at the dummy block 0, position 0 (torch_ref defines it;
the CUDA backend's is qtool.kernels.ops.PagedKVCache).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from qtool.runtime.weights import LinearWeights, ModelWeights

DecodeStep = Callable[[Tensor, Tensor], Tensor]


@runtime_checkable
class Backend(Protocol):
    name: str                 # 'torch' | 'cuda'
    device: torch.device      # reference: cpu
    act_dtype: torch.dtype    # dtype of activations between ops (reference: float32)

    def prepare(self, weights: ModelWeights) -> None:
        """Move / repack / decode `weights` into the backend's form; called once before forward."""

    def new_cache(self, batch: int, max_len: int, kv_format: str) -> object:
        """An empty KV cache for `batch` rows of `max_len` slots; kv_format in {'bf16','fp8','nvfp4'}."""

    def embed(self, ids: Tensor) -> Tensor:
        """ids [B,T] → [B*T, H]."""

    def rmsnorm(self, x: Tensor, weight: Tensor, eps: float,
                residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(rmsnorm(x + residual) * weight, x + residual); with residual None the second is x."""

    def linear(self, x: Tensor, lw: LinearWeights) -> Tensor:
        """x [N, in] → [N, out]: pre_quant_scale, activation quantization of lw's scheme, matmul, bias.
        An unfused group (`lw.format == 'parts'`, `lw.parts` set) applies each part to x and
        concatenates the outputs along the last dim."""

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        """[N, 2I] (gate | up) → silu(gate) * up, [N, I]."""

    def head_rmsnorm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """Per-head RMSNorm over head_dim (qwen3 q/k norm): x [N, heads, d], weight [d]."""

    def rope_and_store(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor,
                       cache: object, layer: int) -> Tensor:
        """Rotate q [N,Hq,d] and k [N,Hkv,d] at `positions` [B,T]; quantize k and v [N,Hkv,d] into
        the cache slots `positions` of `layer`; return the rotated q."""

    def attention(self, q: Tensor, cache: object, layer: int, positions: Tensor) -> Tensor:
        """Causal GQA of q [N,Hq,d] over the (quantized) K/V in the cache, query at position p
        seeing slots 0..p of its row; scale 1/sqrt(d); returns [N, Hq*d]."""

    def rmsnorm_linear(self, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None,
                       lw: LinearWeights) -> tuple[Tensor, Tensor]:
        """(linear(rmsnorm(x, weight, eps, residual)[0], lw), rmsnorm(...)[1])."""

    def attention_with_rope_store(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cache: object,
                                  layer: int, o: LinearWeights) -> Tensor:
        """linear(attention(rope_and_store(q, k, v, positions, cache, layer), cache, layer, positions), o)."""

    def rmsnorm_mlp(self, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None,
                    gate_up: LinearWeights, down: LinearWeights) -> tuple[Tensor, Tensor]:
        """(linear(silu_mul(linear(m, gate_up)), down), residual) with m, residual = rmsnorm(x, weight, eps,
        residual)."""

    def final_logits(self, x: Tensor) -> Tensor:
        """Final RMSNorm + lm_head of the given rows x [M, H] → float32 logits [M, V]."""

    def sample(self, logits: Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> Tensor:
        """Next token ids [B] from logits [B, V] (temperature 0 = greedy)."""

    def synchronize(self) -> None:
        """Block until queued work is done (timing)."""

    def peak_memory_bytes(self) -> int | None:
        """Peak memory used by this process on the backend's device (None if unknown)."""

    def wrap_decode(self, step: DecodeStep) -> DecodeStep:
        """Optionally return a faster (e.g. CUDA-graph) version of the decode step."""

    def cache_nbytes(self, cache: object) -> int:
        """Bytes held by a KV cache."""


def check_backend(obj) -> None:
    """Raise TypeError naming the missing members if `obj` does not implement Backend."""
    missing = [m for m in ("name", "device", "act_dtype", "prepare", "new_cache", "embed", "rmsnorm", "linear",
                           "silu_mul", "head_rmsnorm", "rope_and_store", "attention", "rmsnorm_linear",
                           "attention_with_rope_store", "rmsnorm_mlp", "final_logits", "sample",
                           "synchronize", "peak_memory_bytes", "wrap_decode", "cache_nbytes")
               if not hasattr(obj, m)]
    if missing:
        raise TypeError(f"{type(obj).__name__} does not implement Backend: missing {', '.join(missing)}")
