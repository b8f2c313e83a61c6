"""Prefill attention (T > 1 queries per batch row) in float32 through torch's scaled_dot_product_attention.

Contract: ``attention(q, positions, cache, layer)`` with q [N, Hq, d] float32 (rotated; row n = b*T + t),
positions int64 [B, T], cache an ops.KVCache or ops.PagedKVCache after this step's K/V were written, returns
[N, Hq*d] float32: the attention of torch_ref's ``attention`` (query at position p sees slots 0..p of its row,
scale 1/sqrt(d), GQA head h on KV head h // (Hq/Hkv)). How: the stored K/V of positions 0..p_last of each row are
gathered (through the block table when paged), decoded with the reference's ``kv_decode`` (the stored values x
the layer's scales, float32), repeated per query head; q stays float32; SDPA runs on float32 tensors (on a GPU
its fused memory-efficient kernel, whose float32 GEMMs are 3xTF32 on the tensor cores, float32-level accuracy
whatever the TF32 setting: 2.9 ms of kernel time for a 512-token prefill of the 8B shape on an H100, run 52, about
24 TFLOP/s of causal attention; matmuls, where it falls back to them, without TF32), with a causal mask
aligned bottom-right when a row's queries are at consecutive positions p0..p0+T-1 (one call per run of adjacent
rows sharing p0: the engine's batched prefill orders its rows by start position), else with an explicit boolean
mask (slot j visible to the query at p iff j <= p) per row; a run is split so that its repeated K (and V) hold at
most KV_ELEMENTS elements (one row at least, whatever its length). Tolerance against the reference: docs/numerics.md, "Prefill attention". Reads the
positions on the host (one small sync at layer 0, remembered for the same positions tensor in the later layers of
that forward), so it is for eager prefill, never for a captured decode step. ``applies`` says where it runs;
elsewhere the backend keeps attn_partial. (Batched float32 GEMMs with materialised scores were tried on the
premise that this kernel ran at ~1 TFLOP/s; it runs at ~24, and the GEMM version, in bench/prefill_attention_gemm.py,
is the one to measure against it.)
"""
from __future__ import annotations

import contextlib
import math

import torch

MAX_HEAD_DIM = 256          # the decode kernels' largest; a multiple of 8 keeps SDPA on its fused kernel
_memo: list = []             # [(positions tensor, summary)]: the current forward's positions (read at layer 0)


def applies(q: torch.Tensor, positions: torch.Tensor, cache) -> bool:
    """Prefill rows (T > 1), head_dim <= MAX_HEAD_DIM and a multiple of 8, a KV format kv_decode reads, whole
    GQA groups."""
    D, Hq = q.shape[-1], q.shape[-2]
    return (positions.dim() == 2 and positions.shape[1] > 1 and D % 8 == 0 and D <= MAX_HEAD_DIM
            and cache.fmt in ("bf16", "fp8", "nvfp4") and Hq % cache.hkv == 0)


def _summary(positions: torch.Tensor, fresh: bool) -> list[tuple[int, int, bool]]:
    """Per row (first position, last position, consecutive p0..p0+T-1?): read on the host when ``fresh`` (layer 0,
    the start of a forward) or for another positions tensor, else the same tensor's summary from an earlier layer
    of this forward (positions do not change between layers; inference tensors carry no version counter)."""
    if not fresh and _memo and _memo[0][0] is positions:
        return _memo[0][1]
    B, T = positions.shape
    first = positions[:, 0]
    step = torch.arange(T, device=positions.device)
    consec = (positions == first[:, None] + step).all(dim=1).to(positions.dtype)
    rows = torch.stack([first, positions.max(dim=1).values, consec], dim=1).tolist()
    out = [(int(a), int(b), bool(c)) for a, b, c in rows]
    _memo[:] = [(positions, out)]
    return out


def _stored(cache, store: tuple, b0: int, b1: int, length: int) -> tuple:
    """The stored tensors of rows b0..b1-1, positions 0..length-1, as [rows, Hkv, length, ...] (views when
    contiguous; gathered through the block table when paged)."""
    bs = cache.block_size
    out = []
    for t in store:
        if t is None:
            continue
        if bs:
            nb = -(-length // bs)
            if nb > cache.block_tables.shape[1]:
                raise ValueError(f"{length} positions exceed the block table ({cache.block_tables.shape[1]} blocks)")
            ids = cache.block_tables[b0:b1, :nb].long()                  # [rows, nb]
            g = t[ids]                                                   # [rows, nb, Hkv, bs, ...]
            g = g.transpose(1, 2).reshape(b1 - b0, t.shape[1], nb * bs, *t.shape[3:])
            out.append(g[:, :, :length])
        else:
            out.append(t[b0:b1, :, :length])
    return tuple(out)


def _decoded(cache, which: str, layer: int, b0: int, b1: int, length: int) -> torch.Tensor:
    """K or V of rows b0..b1-1, positions 0..length-1: [rows, Hkv, length, d] float32 (kv_decode)."""
    from qtool.formats.kv import kv_decode
    store = cache.k[layer] if which == "k" else cache.v[layer]
    scale = (cache.k_scales if which == "k" else cache.v_scales)[layer]
    st = _stored(cache, store, b0, b1, length)
    if cache.fmt == "bf16":
        return st[0].float()                                             # stored bf16: exact in float32
    if cache.fmt == "fp8":
        return kv_decode("fp8", st[0].view(torch.float8_e4m3fn), scale=float(scale)).float()
    return kv_decode("nvfp4", st[0], st[1].view(torch.float8_e4m3fn), scale=float(scale)).float()


KV_ELEMENTS = 1 << 27        # repeated K (and as much V) held at once (512 MB of float32 each): a run of rows is split


def _sdpa(qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """qb [R, Hq, T, d] float32 over k / v [R, Hkv, L, d] float32; causal bottom-right (queries at L-T..L-1) when
    mask is None, else mask [R, 1, T, L] bool. K/V are repeated per query head (the float32 fused kernels take no
    GQA argument)."""
    import torch.nn.functional as F
    T, L = qb.shape[2], k.shape[2]
    G = qb.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(qb.shape[-1])
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    with _ieee_matmuls():
        if mask is not None:
            return F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
        if L == T:
            return F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale)
        from torch.nn.attention.bias import causal_lower_right
        return F.scaled_dot_product_attention(qb, k, v, attn_mask=causal_lower_right(T, L), scale=scale)


@contextlib.contextmanager
def _ieee_matmuls():
    """CUDA float32 matmuls in IEEE float32 (no TF32) inside, the process's setting restored after. Through torch's
    ``fp32_precision`` where it exists (torch >= 2.9): reading the legacy ``allow_tf32`` raises once a process set
    the new API, and writing it leaves the two APIs mixed. The setting is process-wide, so another thread's CUDA
    matmuls during a prefill run without TF32 too (the engine runs every forward on one thread)."""
    m = torch.backends.cuda.matmul
    attr, ieee = ("fp32_precision", "ieee") if hasattr(m, "fp32_precision") else ("allow_tf32", False)
    saved = getattr(m, attr)
    setattr(m, attr, ieee)
    try:
        yield
    finally:
        setattr(m, attr, saved)


def attention(q: torch.Tensor, positions: torch.Tensor, cache, layer: int) -> torch.Tensor:
    """[N, Hq*d] float32 attention of the prefill queries q [N, Hq, d] (see the module contract)."""
    B, T = positions.shape
    N, Hq, D = q.shape
    rows = _summary(positions, layer == 0)
    qb = q.reshape(B, T, Hq, D).to(torch.float32).transpose(1, 2)          # [B, Hq, T, d]
    out = torch.empty(B, T, Hq, D, dtype=torch.float32, device=q.device)
    groups = []                  # one call per run of adjacent rows at the same p0..p0+T-1; a masked call per other row
    for b, (p0, _, consec) in enumerate(rows):
        if consec and groups and groups[-1][2] is None and rows[groups[-1][0]][0] == p0:
            groups[-1][1] = b + 1
        else:
            groups.append([b, b + 1, None if consec else positions[b]])
    for g0, g1, pos in groups:
        length = rows[g0][1] + 1         # a run shares p0 and T (so its last position); a masked group: one row
        step = max(1, KV_ELEMENTS // (Hq * length * D))     # rows whose repeated float32 K (and V) fit the budget
        for b0 in range(g0, g1, step):
            b1 = min(g1, b0 + step)
            k = _decoded(cache, "k", layer, b0, b1, length)
            v = _decoded(cache, "v", layer, b0, b1, length)
            mask = None
            if pos is not None:
                mask = (torch.arange(length, device=q.device)[None, :] <= pos[:, None])[None, None]   # [1, 1, T, L]
            o = _sdpa(qb[b0:b1], k, v, mask)                      # [R, Hq, T, d]
            out[b0:b1] = o.transpose(1, 2)
    return out.reshape(N, Hq * D)
