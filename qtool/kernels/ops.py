"""Launch wrappers: each op takes torch CUDA tensors, allocates its output with torch, and launches the
matching kernel of kernels_cuda/ on torch's current stream (so CUDA-graph capture through torch sees it).

Contract: inputs are float32 contiguous unless stated; pointers are passed as 64-bit integers (null = 0);
every function returns its output tensor(s). Shapes and layouts are those of each kernel's header comment.
One allocator: all memory comes from torch (CuPy allocates nothing).

The kernel plan: what runs is chosen by format, shape and GPU properties only (no environment switches; the
measurements behind each choice are in docs/dev/gpu-results.md and docs/dev/cuda-notes.md, the variants that lost
are in git history):
- decode linears (M <= 8): fp8 x fp8 on gemv_mma4p over mma-tiled weights (``adopt_layout``), the K split over the
  warps of one block sized to one resident wave (``split.mma4_split``); an fp8 gate|up with a static down-projection
  input scale interleaved for gemv_mma4ps (silu * mul + the down projection's quantization in its epilogue,
  ``silu_fusable``); 4-bit weights (nvfp4, mxfp4, int4 weight-only) on gemv_q4 over a q4-tiled copy of their codes
  (``adopt_layout``, gemv_4bit.py; the K split planned as gemv_mma4p's); other weight-only and fp4-activation
  recipes on gemv_h; the rest on gemv (f32);
- prefill and batched-decode linears (M > 8; bf16 from 2 rows): cuBLAS through torch where ``gemm.applies``
  (gemm.py), else gemm_tc where ``_tc_ok``, else the f32 gemm;
- decode: rmsnorm, silu * mul and the attention merge write the next linear's quantized input (``*_quant``);
- decode attention: RoPE + KV write inside attn_partial (``rope_fusable``), GM = 4 heads unrolled where G <= 4,
  splits of 16/32 positions up to 1024 (64 up to 4096, then 128) merged by attn_combine_heads where the o
  projection's quantization is local to a head, else by attn_combine over several blocks per row; caches longer
  than LONG_CACHE for their KV format (and every paged cache) on attn_partial_paged, which stages K/V in shared
  memory;
- prefill attention (T > 1): prefill_attention.py (torch's fused float32 SDPA over the decoded K/V), chosen by
  CudaBackend; attn_partial where it does not apply (head_dim > 256 or not a multiple of 8) and in tests;
- every launch with programmatic dependent launch on sm_90+ (pdl.py).
The fused sequences the backend runs are ``norm_linear``, ``attention_o`` and ``norm_mlp``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch

from qtool.formats import registry
from qtool.kernels import gemm, gemv_4bit, pdl  # noqa: F401 - pdl: ops.pdl for callers
from qtool.kernels.launch import allow_smem, f32, i32, launch, ptr
from qtool.kernels.quant_input import act_quant, fp8_codes_ok, threads
from qtool.kernels.split import MMA4_MAX_SLICES, kslices, mma4_split
from qtool.kernels.weights import (A_FP8, A_FP8_BLOCK, A_MXFP4, A_NONE, A_NVFP4, F_FP8, F_FP8T, F_INT4, F_MXFP4,
                                   F_NVFP4, KLinear, mma_tile_fp8, mma_untile_fp8, to_tiled)

KV_CODES = registry.kv_format_codes()


# ---------------------------------------------------------------- elementwise
def embed(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    ids32 = ids.reshape(-1).to(torch.int32)
    n, H = ids32.numel(), table.shape[1]
    out = torch.empty(n, H, dtype=torch.float32, device=table.device)
    name = "embed_gather" if table.dtype == torch.bfloat16 else "embed_gather_f32"
    launch("elementwise", name, (n,), (256,), (ptr(ids32), ptr(table), ptr(out), i32(H)))
    return out


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    x = x.contiguous()
    H = x.shape[-1]
    rows = x.numel() // H
    if H > 16 * 1024:
        raise ValueError(f"rmsnorm kernel supports rows of at most 16384 elements, got {H}")
    y = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    launch("elementwise", "rmsnorm_residual", (rows,), (threads(H),),
           (ptr(x), ptr(residual), ptr(w), ptr(y), ptr(res_out if residual is not None else None), i32(H),
            f32(eps)))
    return y, res_out


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    gu = gu.contiguous()
    n, I2 = gu.shape
    I = I2 // 2
    out = torch.empty(n, I, dtype=torch.float32, device=gu.device)
    launch("elementwise", "silu_mul", (math.ceil(I / 256), n), (256,), (ptr(gu), ptr(out), i32(I)))
    return out


# ---------------------------------------------------------------- linear
# decode paths: "mma4" (gemv_mma4p, fp8 x fp8 on mma-tiled weights), "q4" (gemv_q4, 4-bit weights with a q4-tiled
# copy), "half" (gemv_h), "f32" (gemv); prefill: "tc" (gemm_tc), "gemm" (f32 tiled gemm)
PATHS = ("mma4", "q4", "half", "f32", "tc", "gemm")
HALF_INPUT = ("half", "q4")     # paths reading act_quant's f16 copy of x̂ (xh, hs; xsc for fp4 activations)


def _mma_ok(kl: KLinear, M: int) -> bool:
    return (fp8_codes_ok(kl) and M <= 8 and kl.in_features % 64 == 0 and (kl.sbi_log2 < 0 or kl.sbi == 128))


def _tc_ok(kl: KLinear) -> bool:
    """gemm_tc (tensor-core GEMM for any M) applies: fp8 activations on fp8 weights (x̂ as exact e4m3 codes) or no
    activation quantization (x, or x * pre_quant_scale, split into two bf16 terms: float32-level sums); K % 16 == 0,
    16-byte aligned weight rows, fp8 scale blocks along K in multiples of 32 (its k-tile). Other quantized
    activations (nvfp4, mxfp4, W4A8's fp8 on int4) keep the f32 GEMM: their x̂ is not exact in two bf16 terms, and
    a small error in x̂ moves the next layers' activation codes (cuda-notes.md, run 2)."""
    K = kl.in_features
    if K % 16 or kl.w.data_ptr() % 16 or not (kl.act == A_NONE or fp8_codes_ok(kl)) or kl.fmt in (F_NVFP4, F_INT4):
        return False      # nvfp4 / int4 weights (split in two bf16 terms): run 10 measured 15 vs 18 TFLOP/s f32
    return not (kl.fmt == F_FP8 and kl.sbi < K and kl.sbi % 32)


def _half_ok(kl: KLinear, M: int) -> bool:
    """gemv_h applies to weight-only recipes (x̂ = x rounded to f16) and to nvfp4/mxfp4 weights with fp4
    activations (exact E2M1 codes + block scales); fp8 activations on non-fp8 weights stay on the f32 path."""
    if not (M <= 8 and kl.half_ok):
        return False
    if kl.act == A_NONE:
        return True
    if kl.act in (A_NVFP4, A_MXFP4):
        return (kl.fmt in (F_NVFP4, F_MXFP4) and kl.in_features % 32 == 0 and kl.in_features <= 16 * 1024
                and (kl.act == A_MXFP4 or kl.in_scale is not None))
    return False


def adopt_layout(kl: KLinear) -> KLinear:
    """``kl`` with its fp8 weights in the mma-tiled order when its decode GEMV is gemv_mma4p (fp8 activations
    given as e4m3 codes, K % 64 == 0, per-tensor / per-row / 128-block scales); 4-bit weights that gemv_q4
    supports with a q4-tiled copy of their codes (gemv_4bit.adopt); else ``kl`` unchanged."""
    if gemv_4bit.supported(kl):
        return gemv_4bit.adopt(kl)
    if kl.fmt != F_FP8 or kl.tiled or not _mma_ok(kl, 1):
        return kl
    return to_tiled(kl)


def decode_path(kl: KLinear, M: int) -> str:
    """The path ``linear`` takes for M rows ("blas": cuBLAS through torch, gemm.py, for M > 8; row-major fp8
    weights that could be tiled take the f32 GEMV)."""
    if gemm.applies(kl, M):
        return "blas"
    if kl.tiled and _mma_ok(kl, M):
        return "mma4"
    if gemv_4bit.applies(kl, M):
        return "q4"
    if not kl.tiled and _half_ok(kl, M):
        return "half"
    if M <= 8 and kl.gemv_ok:
        return "f32"
    return "tc" if _tc_ok(kl) else "gemm"


def _quant_outputs(kl: KLinear, M: int, K: int, path: str, dev) -> dict:
    """Empty buffers for the quantized forms of x that ``path`` reads (see act_quant)."""
    res = {}
    if path == "mma4":
        res["xq"] = torch.empty(M, K, dtype=torch.uint8, device=dev)
        res["xs"] = torch.empty(M, (K + 127) // 128 if kl.act == A_FP8_BLOCK else 1, dtype=torch.float32, device=dev)
    elif path in HALF_INPUT:
        res["xh"] = torch.empty(M, K, dtype=torch.float16, device=dev)
        res["hs"] = torch.empty(M, dtype=torch.float32, device=dev)
        if kl.act == A_MXFP4 or (kl.act == A_NVFP4 and path == "half"):    # q4 folds nvfp4 block scales into xh
            res["xsc"] = torch.empty(M, K // (16 if kl.act == A_NVFP4 else 32), dtype=torch.float32, device=dev)
    return res


def _quant_args(kl: KLinear | None, pre: dict, path: str) -> tuple:
    """The trailing arguments every fused row-quantizing kernel takes (act_quant.cuh's quant_row): scheme,
    in_scale, pqs, outh, hscale, hperm, outq, qscale; kl None: scheme 0 and no outputs."""
    if kl is None:
        return (i32(0),) + (ptr(None),) * 4 + (i32(0),) + (ptr(None),) * 2
    hperm = 0 if path not in HALF_INPUT else (1 if kl.fmt == F_FP8 else 3 if path == "q4" and kl.act == A_NVFP4 else 2)
    return (i32(kl.act), ptr(kl.in_scale), ptr(kl.pqs), ptr(pre.get("xh")), ptr(pre.get("hs")), i32(hperm),
            ptr(pre.get("xq")), ptr(pre.get("xs", pre.get("xsc"))))


def rmsnorm_quant(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None, kl: KLinear,
                  keep_out: bool = True):
    """rmsnorm (as ``rmsnorm``) fused with the activation quantization of the linear ``kl`` that reads it,
    when that linear takes the mma or half decode path: returns (y, new_residual, pre) with ``pre`` to pass to
    ``linear(y, kl, pre=pre)``, or pre None (then nothing was fused). keep_out=False: when fused, y is allocated
    but not written (the linear reads only ``pre``; saves the row's store)."""
    x = x.contiguous()
    M, H = x.shape
    path = decode_path(kl, M)
    if path not in ("mma4", *HALF_INPUT) or H % 16 or H > 16 * 1024 or kl.perm is not None:
        y, r = rmsnorm(x, w, eps, residual)
        return y, r, None
    y = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else None
    pre = _quant_outputs(kl, M, H, path, x.device)
    pre["path"] = path
    launch("act_quant", "rmsnorm_quant", (M,), (threads(H),),
           (ptr(x), ptr(residual), ptr(w), f32(eps), ptr(y if keep_out else None), ptr(res_out), i32(H))
           + _quant_args(kl, pre, path))
    return y, (res_out if residual is not None else x), pre


def silu_mul_quant(gu: torch.Tensor, kl: KLinear, keep_out: bool = True):
    """silu_mul (as ``silu_mul``) fused with the activation quantization of the linear ``kl`` that reads it (the
    down projection), when that linear takes the mma4 decode path (fp8 activations): returns (out, pre) as
    rmsnorm_quant, pre None when nothing was fused (then out comes from plain silu_mul); keep_out as
    rmsnorm_quant."""
    gu = gu.contiguous()
    M, I2 = gu.shape
    I = I2 // 2
    path = decode_path(kl, M)
    if path != "mma4" or I % 16 or I > 16 * 1024 or kl.perm is not None:
        return silu_mul(gu), None
    out = torch.empty(M, I, dtype=torch.float32, device=gu.device)
    pre = _quant_outputs(kl, M, I, path, gu.device)
    pre["path"] = path
    _launch_silu_quant(gu, out if keep_out else None, kl, pre, path, M, I)
    return out, pre


def _launch_silu_quant(gu, out, kl, pre, path, M, I) -> None:
    # local scales: blocks of 128 threads, 2048 elements each (run 6: 6.1 us for I = 14336 on one SM; run 7: 4.1 us)
    launch("act_quant", "silu_mul_quant", *_row_grid(M, I, kl, path, 2048),
           (ptr(gu), ptr(out), i32(I)) + _quant_args(kl, pre, path))


# ---------------------------------------------------------------- gate|up + silu fused into the GEMV epilogue
def silu_fusable(kl, down) -> bool:
    """Whether the gate|up linear ``kl`` may hold its rows interleaved (interleave_gate_up) so that its decode
    GEMV (gemv_mma4ps) also applies silu * mul and the down projection's fp8 input quantization: fp8 with a
    per-tensor or per-row weight scale on the mma4 path, a down projection ``down`` on the mma4 path reading fp8
    codes with a static per-tensor input scale (scheme 1), out = 2 * in_features(down), in_features(down) % 8 == 0."""
    if not (isinstance(kl, KLinear) and isinstance(down, KLinear)):
        return False
    O = kl.out_features
    return (kl.fmt == F_FP8 and kl.perm is None and kl.il == 0 and down.perm is None
            and O % 16 == 0 and down.in_features * 2 == O and (kl.sbo == 1 or kl.sbo >= O)
            and down.act == A_FP8 and down.in_scale is not None and decode_path(kl, 1) == "mma4"
            and decode_path(down, 1) == "mma4")


def interleave_gate_up(kl: KLinear) -> KLinear:
    """``kl`` (rows [gate | up], O = 2I) with its rows interleaved in groups of 8: row 16j + i = gate row 8j + i,
    row 16j + 8 + i = up row 8j + i (weights, per-row scales, bias); ``il`` = I. Its outputs come back in that
    order (deinterleave) unless gemv_mma4ps consumes them. Mma-tiled weights stay tiled."""
    O = kl.out_features
    idx = torch.arange(O, device=kl.w.device).view(2, O // 16, 8).transpose(0, 1).reshape(-1)
    sc = kl.sc.reshape(O, -1)[idx].reshape(kl.sc.shape).contiguous() if kl.sbo == 1 else kl.sc
    bias = kl.bias[idx].contiguous() if kl.bias is not None else None
    w = mma_untile_fp8(kl.w, O, kl.in_features) if kl.tiled else kl.w
    w = w.index_select(0, idx).contiguous()
    return replace(kl, w=mma_tile_fp8(w) if kl.tiled else w, sc=sc, bias=bias, il=O // 2, rm=None)


def deinterleave(y: torch.Tensor, I: int) -> torch.Tensor:
    """[M, 2I] outputs of an interleaved gate|up linear back to [gate | up]."""
    M = y.shape[0]
    return y.view(M, I // 8, 2, 8).transpose(1, 2).reshape(M, 2 * I)


def gate_up_silu(x: torch.Tensor, kl: KLinear, down: KLinear | None, pre: dict | None = None, fuse: bool = True):
    """silu(gate) * up of the gate|up linear ``kl`` on x, ready for the down projection ``down``: (act, pre_down)
    to pass as ``linear(act, down, pre=pre_down)``. Decode on an interleaved kl (kl.il): one gemv_mma4ps launch
    writes pre_down's fp8 codes and act is allocated but not written; otherwise linear (+ deinterleave), then
    silu_mul_quant (fuse and down reads fp8 codes: act not written either) or silu_mul (pre_down None)."""
    M = x.shape[0]
    if kl.il and fuse and down is not None and M <= 8 and decode_path(kl, M) == "mma4":
        x = x.to(torch.float32).contiguous()
        q = pre if pre is not None else act_quant(x, kl, codes=True)
        dpath = decode_path(down, M)
        pre_d = _quant_outputs(down, M, kl.il, dpath, x.device)
        pre_d["path"] = dpath
        _launch_mma4(q, kl, torch.empty(0, device=x.device), M, silu=(down, pre_d))
        return torch.empty(M, kl.il, dtype=torch.float32, device=x.device), pre_d
    gu = linear(x, kl, pre=pre)
    if kl.il:
        gu = deinterleave(gu, kl.il)
    if fuse and down is not None and M <= 8:
        return silu_mul_quant(gu, down, keep_out=False)
    return silu_mul(gu), None


def linear(x: torch.Tensor, kl: KLinear, force_gemm: bool = False, force_f32: bool = False,
           path: str | None = None, pre: dict | None = None) -> torch.Tensor:
    """y = x̂ W^T + b. M <= 8: gemv_mma4p (fp8 x fp8 tensor cores on mma-tiled weights), gemv_q4 (4-bit weights
    with a q4-tiled copy, tensor cores), gemv_h (f16 pair math) or gemv (f32); else gemm_tc (tensor cores, "tc") or
    the f32 tiled gemm. ``path`` forces 'mma4' / 'q4' / 'half' / 'f32' / 'tc' / 'gemm' (tests; 'f32' on mma-tiled
    weights is the gemm, mma4 needs mma-tiled weights, q4 the q4 copy, half row-major ones)."""
    x = x.to(torch.float32).contiguous()
    if kl.perm is not None:
        x = x.index_select(1, kl.perm)
    M = x.shape[0]
    O, K = kl.out_features, kl.in_features
    y = torch.empty(M, O, dtype=torch.float32, device=x.device)
    mr = 1 if M == 1 else 2 if M == 2 else 4 if M <= 4 else 8
    if path is None:
        path = "gemm" if force_gemm else "f32" if force_f32 else None
    if pre is not None:
        path = pre["path"]
    if path is None:
        path = decode_path(kl, M)
    if path == "blas":
        return gemm.linear(x, kl)
    if kl.tiled and path in ("half", "f32"):
        if path != "f32":
            raise ValueError(f"path {path!r} reads row-major weights; this layer's fp8 weights are mma-tiled")
        path = "gemm"                    # the f32 reference of tiled weights
    if path == "tc":
        _launch_tc(x, kl, y, M)
        return y
    if path == "mma4":
        q = pre if pre is not None else act_quant(x, kl, codes=True)
        _launch_mma4(q, kl, y, M)
        return y
    if path == "q4":
        q = pre if pre is not None else q4_input(x, kl)
        gemv_4bit.launch(q, kl, y, M)
        return y
    if path == "half":
        fp4c = kl.act in (A_NVFP4, A_MXFP4)
        q = pre if pre is not None else act_quant(x, kl, half=True, fp4codes=fp4c)
        xsc = q.get("xsc")
        launch("linear", f"gemv_h<{kl.fmt}, {mr}>", (math.ceil(O / 8),), (256,),
               (ptr(q["xh"]), ptr(q["hs"]), ptr(kl.w), ptr(kl.sc), ptr(kl.zp), f32(kl.gs), ptr(kl.bias), ptr(y),
                i32(O), i32(M), i32(O), i32(K), i32(kl.sld), i32(kl.sbo), i32(kl.sbi_log2), ptr(xsc),
                i32(A_NVFP4 if kl.act == A_NVFP4 else A_MXFP4)))
        return y
    if kl.act != A_NONE or kl.pqs is not None:
        x = act_quant(x, kl)["x"]
    args = (ptr(x), i32(K), ptr(kl.w), ptr(kl.sc), ptr(kl.zp), f32(kl.gs), f32(kl.s2), ptr(kl.bias), ptr(y),
            i32(O), i32(M), i32(O), i32(K), i32(kl.sld), i32(kl.sbo), i32(kl.sbi))
    if path == "f32":
        launch("linear", f"gemv<{kl.fmt}, {mr}>", (math.ceil(O / 8),), (256,), args)
    else:
        launch("linear", f"gemm<{F_FP8T if kl.tiled else kl.fmt}>", (math.ceil(O / 64), math.ceil(M / 64)), (256,),
               args)
    return y


def q4_input(x: torch.Tensor, kl: KLinear) -> dict:
    """act_quant's outputs gemv_q4 reads: xh / hs (nvfp4 activations with their block scales folded in, mxfp4 ones
    as E2M1 values with xsc)."""
    return act_quant(x, kl, half=True, fp4codes=kl.act == A_MXFP4, fold=kl.act == A_NVFP4)


def _launch_tc(x: torch.Tensor, kl: KLinear, y: torch.Tensor, M: int) -> None:
    """gemm_tc: x̂ as e4m3 codes (exact) for fp8 x fp8 layers, else x̂ f32 (split into two bf16 terms in the
    kernel)."""
    O, K = kl.out_features, kl.in_features
    if x.data_ptr() % 16:
        x = x.clone()                    # the kernel reads 16-byte vectors
    codes = fp8_codes_ok(kl)
    q = act_quant(x, kl, codes=True) if codes else {}
    xf = x if codes or not (kl.act != A_NONE or kl.pqs is not None) else act_quant(x, kl)["x"]
    launch("linear", f"gemm_tc<{F_FP8T if kl.tiled else kl.fmt}, {int(codes)}>",
           (math.ceil(O / 64), math.ceil(M / 64)), (128,),
           (ptr(xf), i32(K), ptr(q.get("xq")), ptr(q.get("xs")), i32(1 if codes and kl.act == A_FP8_BLOCK else 0),
            ptr(kl.w), ptr(kl.sc), ptr(kl.zp), f32(kl.gs), f32(kl.s2), ptr(kl.bias), ptr(y), i32(O), i32(M),
            i32(O), i32(K), i32(kl.sld), i32(kl.sbo), i32(kl.sbi)))


def _launch_mma4(q: dict, kl: KLinear, y: torch.Tensor, M: int, S: int | None = None,
                 silu: tuple | None = None) -> None:
    """gemv_mma4p on the mma-tiled kl into y [M, O]: one block of S warps (K slices; default split.mma4_split, at most
    MMA4_MAX_SLICES) per 16-row tile, the slices summed through shared memory in a fixed order. ``silu`` =
    (down, pre): kl's rows are gate|up interleaved (kl.il), and gemv_mma4ps writes silu(gate) * up quantized for
    the down projection into pre's xq / xs instead of y."""
    if not kl.tiled:
        raise ValueError("gemv_mma4p reads mma-tiled weights (adopt_layout)")
    O, K = kl.out_features, kl.in_features
    name = "gemv_mma4ps" if silu is not None else "gemv_mma4p"
    S, kslice = mma4_split(O, K, name) if S is None else kslices(K, min(S, MMA4_MAX_SLICES), 256)
    if silu is None:
        tail = (i32(0), ptr(None), ptr(None), ptr(None), ptr(None))
    else:
        down, pre = silu
        tail = (i32(kl.il), ptr(down.in_scale), ptr(down.pqs), ptr(pre["xq"]), ptr(pre["xs"]))
    launch("linear", name, (math.ceil(O / 16),), (32 * S,),
           (ptr(q["xq"]), ptr(q["xs"]), i32(1 if kl.act == A_FP8_BLOCK else 0), ptr(kl.w), ptr(kl.sc), ptr(kl.bias),
            ptr(y), i32(O), i32(M), i32(O), i32(K), i32(kl.sld), i32(kl.sbo), i32(kl.sbi_log2), i32(kslice)) + tail,
           smem=512 * S if S > 1 else 0)


# ---------------------------------------------------------------- rope + KV cache + attention
class KVCache:
    """Per layer K and V codes (+ nvfp4 block scales) in kv_cache.cuh's layout [B, Hkv, L, ...] (``storage``:
    other leading dims, PagedKVCache's block pool)."""

    block_tables: torch.Tensor | None = None       # paged caches only
    block_size = 0

    def __init__(self, fmt: str, batch: int, max_len: int, layers: int, hkv: int, d: int, device,
                 k_scales: list[float], v_scales: list[float], o_proj: KLinear | None = None,
                 storage: tuple | None = None):
        self.fmt, self.code = fmt, KV_CODES[fmt]
        self.batch, self.max_len, self.hkv, self.d = batch, max_len, hkv, d
        self.k_scales, self.v_scales = k_scales, v_scales
        shape = storage or (batch, hkv, max_len)
        if fmt == "bf16":
            mk = lambda: (torch.zeros(*shape, d, dtype=torch.bfloat16, device=device), None)  # noqa: E731
        elif fmt == "fp8":
            mk = lambda: (torch.zeros(*shape, d, dtype=torch.uint8, device=device), None)  # noqa: E731
        else:
            mk = lambda: (torch.zeros(*shape, d // 2, dtype=torch.uint8, device=device),  # noqa: E731
                          torch.zeros(*shape, d // 16, dtype=torch.uint8, device=device))
        self.k = [mk() for _ in range(layers)]
        self.v = [mk() for _ in range(layers)]
        # split length of the attention kernel: fixed per cache so a captured graph keeps its grid
        # 16 positions where decode merges with attn_combine_heads (o_proj: the first o projection; None: a plain
        # merge). Run 27-29, ctx 512: with attn_combine_heads 16 positions 296 tok/s, 32: 292-294, 64: 283, 128:
        # 262; with attn_combine (per-token activation scales) 16 positions is slower than 32 (288 vs 293)
        short = 16 if _head_local(o_proj, decode_path(o_proj, batch) if o_proj is not None else "f32", d) else 32
        self.chunk = short if max_len <= 1024 else 64 if max_len <= 4096 else 128
        self.splits = math.ceil(max_len / self.chunk)
        # long caches: attention by attn_partial_paged over a one-block-per-row table (row b = block b of max_len
        # positions: the contiguous layout itself), whose staged sub-chunks read long rows faster (run 57)
        self.row_table = None
        if storage is None and max_len > LONG_CACHE.get(fmt, max_len):
            self.row_table = torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.k + self.v for t in pair if t is not None)

    def paging(self) -> tuple:
        """The kernels' trailing paging arguments: (block table, its row stride, block size); null for this
        contiguous layout."""
        return ptr(None), i32(0), i32(0)

    def row_paging(self) -> tuple:
        """attn_partial_paged's paging arguments for this contiguous layout (long caches): one block of max_len
        positions per row, block b = row b."""
        return ptr(self.row_table), i32(1), i32(self.max_len)

    def row_len(self) -> int:
        """L, the positions of one stored row (contiguous: max_len; paged: the block size)."""
        return self.max_len


class PagedKVCache(KVCache):
    """The serving cache (backend.py's paged contract): per layer K and V over a pool of ``num_blocks`` blocks of
    ``block_size`` positions, [num_blocks, Hkv, block_size, ...] in kv_cache.cuh's per-row layout, and
    ``block_tables`` int32 [max_batch, max_blocks_per_seq] on the device (all zero: every row on the dummy block
    0), which the engine fills in place before each step: position p of batch row b lives in block
    ``block_tables[b, p // block_size]``, slot ``p % block_size``. Attention runs attn_partial_paged, whose
    split length follows each row's length (_paged_splits)."""

    def __init__(self, fmt: str, num_blocks: int, block_size: int, max_batch: int, max_blocks_per_seq: int,
                 layers: int, hkv: int, d: int, device, k_scales: list[float], v_scales: list[float],
                 o_proj: KLinear | None = None):
        super().__init__(fmt, max_batch, max_blocks_per_seq * block_size, layers, hkv, d, device, k_scales,
                         v_scales, o_proj, storage=(num_blocks, hkv, block_size))
        self.num_blocks, self.block_size = num_blocks, block_size
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)

    def paging(self) -> tuple:
        bt = self.block_tables
        if bt.dtype != torch.int32 or not bt.is_contiguous():
            raise ValueError("block_tables must stay a contiguous int32 tensor (filled in place)")
        return ptr(bt), i32(bt.stride(0)), i32(self.block_size)

    def row_len(self) -> int:
        return self.block_size


def rope_and_store(q, k, v, positions, cache: KVCache, layer: int, cos: torch.Tensor, sin: torch.Tensor,
                   T: int) -> torch.Tensor:
    """q [N,Hq,d], k/v [N,Hkv,d] (strided row views allowed); positions int64 [N]; returns rotated q."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    q2, k2, v2 = _rows(q), _rows(k), _rows(v)
    q_out = torch.empty(N, Hq, D, dtype=torch.float32, device=q.device)
    kc, ks = cache.k[layer]
    vc, vs = cache.v[layer]
    pos = positions.reshape(-1).to(torch.int64).contiguous()
    launch("rope_kv", "rope_kv_write", (N, Hq + 2 * Hkv), (D,),
           (ptr(q2), i32(q2.stride(0)), ptr(k2), i32(k2.stride(0)), ptr(v2), i32(v2.stride(0)), ptr(pos), i32(T),
            ptr(cos), ptr(sin), ptr(None), ptr(None), f32(0.0), ptr(q_out), ptr(kc), ptr(ks), ptr(vc), ptr(vs),
            i32(cache.code), f32(cache.k_scales[layer]), f32(cache.v_scales[layer]), i32(Hq), i32(Hkv), i32(D),
            i32(cache.row_len())) + cache.paging())
    return q_out


ATTN_PU = {64: 8, 128: 8, 256: 4}   # positions in flight per warp of attn_partial<D, PU, GM, KF> (loader.TEMPLATES)


def _attn_gm(D: int, G: int) -> int:
    """GM, the query heads per KV head attn_partial unrolls: 4 where G <= 4 and PU * 4 >= 32 (the warp
    transpose-reduce needs 32 values; half the registers and FMAs of 8), else 8 (G = 5..8, or D = 256)."""
    if G <= 4 and ATTN_PU[D] * 4 >= 32:
        return 4
    return 8


def _attn_partial(q: torch.Tensor, positions: torch.Tensor, cache: KVCache, layer: int, T: int,
                  rope: tuple | None = None, early: bool = True):
    """attn_partial over every split: (part f32 [N, Hq, S, D], ml f32 [N, Hq, S, 2]). q [N, Hq, D] rotated, or with
    rope = (k, v, cos, sin) (decode, T = 1: rope_fusable) the unrotated q, k, v (row views with unit element
    stride), rotated and written into the cache by the kernel itself; then pos, the first K / V rows and the RoPE
    factors are read before the PDL wait (attention.cu's ``early``; early=False: after it, for tests). A paged
    cache, and a contiguous one longer than LONG_CACHE (through its one-block-per-row table), runs
    attn_partial_paged with _paged_splits(N) splits whose length follows each row's length."""
    N, Hq, D = q.shape
    Hkv = cache.hkv
    if Hq % Hkv or Hq // Hkv > 8 or D not in ATTN_PU:
        raise ValueError(f"attention kernel supports head_dim 64/128/256 and <= 8 query heads per KV head "
                         f"(got d={D}, {Hq}/{Hkv})")
    paged = cache.block_tables is not None or cache.row_table is not None
    S = _paged_splits(N, Hkv, cache.max_len) if paged else cache.splits
    part = torch.empty(N, Hq, S, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(N, Hq, S, 2, dtype=torch.float32, device=q.device)
    kc, ks = cache.k[layer]
    vc, vs = cache.v[layer]
    pos = positions.reshape(-1).to(torch.int64).contiguous()
    q2 = _rows(q)
    if rope is None:
        tail = (ptr(None), i32(0), ptr(None), i32(0), ptr(None), ptr(None), i32(0))
    else:
        if T != 1:
            raise ValueError("attention with fused RoPE is for decode (one token per row)")
        k, v, cos, sin = rope
        k2, v2 = _rows(k), _rows(v)
        # early loads before the PDL wait: only if no copy kernel (the predecessor) produced pos
        early = early and pos.data_ptr() == positions.data_ptr()
        tail = (ptr(k2), i32(k2.stride(0)), ptr(v2), i32(v2.stride(0)), ptr(cos), ptr(sin), i32(int(early)))
    kernel = f"{D}, {ATTN_PU[D]}, {_attn_gm(D, Hq // Hkv)}, {cache.code}>"
    head = (ptr(q2), i32(q2.stride(0)), ptr(pos), i32(T), ptr(kc), ptr(ks), ptr(vc), ptr(vs), i32(cache.code),
            f32(cache.k_scales[layer]), f32(cache.v_scales[layer]), ptr(part), ptr(ml), i32(Hq), i32(Hkv))
    if paged:
        name = "attn_partial_paged<" + kernel
        smem = paged_stage_bytes(cache, name)
        allow_smem("attention", name, smem)
        launch("attention", name, (N * Hkv, S), (128,),
               head + (i32(PAGED_MIN_SPAN), f32(1.0 / math.sqrt(D))) + tail[:-1]
               + (cache.paging() if cache.block_tables is not None else cache.row_paging()), smem)
    else:
        launch("attention", "attn_partial<" + kernel, (N * Hkv, S), (128,),
               head + (i32(cache.max_len), i32(cache.chunk), f32(1.0 / math.sqrt(D))) + tail)
    return part, ml


PAGED_MIN_SPAN = 32     # positions of the shortest split of attn_partial_paged (one round of 4 warps x 8 rows)
# contiguous caches longer than this (per KV format) take attn_partial_paged (KVCache.row_table). Run 57 (H100, one
# layer of 8B attention, batch 1), attn_partial against attn_partial_paged: bf16 ctx 8192 28.5 / 30.9 us, 32768
# 110.6 / 94.3; fp8 35.2 / 31.2, 193.1 / 95.1; nvfp4 48.7 / 36.9, 274.1 / 116.3
LONG_CACHE = {"bf16": 16384, "fp8": 4096, "nvfp4": 4096}
PAGED_SUB_CHUNK = 128   # positions attn_partial_paged stages in shared memory at once (attention.cu's CMAX)


def paged_stage_bytes(cache: "KVCache", name: str) -> int:
    """Dynamic shared memory of attn_partial_paged ``name`` for this cache: K and V rows (codes + nvfp4 block scales)
    of PAGED_SUB_CHUNK positions, or of the largest multiple of 32 positions that fits beside the kernel's static
    shared memory in the GPU's per-block limit (99 KB on sm_89 / sm_120: head_dim 256 stages 32 to 96); the kernel
    reads its sub-chunk length back from the size."""
    kc, ks = cache.k[0]
    row = 2 * (kc.shape[-1] * kc.element_size() + (ks.shape[-1] if ks is not None else 0))    # K and V
    return _stage_bytes(name, row, kc.device)


@functools.lru_cache(maxsize=None)
def _stage_bytes(name: str, row: int, device) -> int:
    from qtool.kernels import loader
    props = torch.cuda.get_device_properties(device)
    limit = int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)
    room = limit - int(loader.function("attention", name).shared_size_bytes)
    sub = min(PAGED_SUB_CHUNK, room // row // 32 * 32)
    if sub < 32:
        raise ValueError(f"{name}: {room} bytes of shared memory left per block, {32 * row} needed")
    return sub * row


def _paged_splits(N: int, hkv: int, max_len: int) -> int:
    """Splits per row of attn_partial_paged for N query rows (static per launch shape, so per captured graph):
    about 1024 blocks in all, at most 64 (the merge reads every split), at most one per PAGED_MIN_SPAN positions."""
    return max(1, min(64, math.ceil(1024 / (N * hkv)), math.ceil(max_len / PAGED_MIN_SPAN)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[N, H, D] -> [N, H*D] rows (a view when heads are contiguous inside a row, else a copy)."""
    N, H, D = t.shape
    r = t.reshape(N, -1) if t.stride(-1) == 1 and t.stride(-2) == D else t.contiguous().reshape(N, -1)
    if r.stride(1) != 1:
        raise ValueError("attention needs rows with unit element stride")
    return r


def rope_fusable(q: torch.Tensor, T: int) -> bool:
    """Whether decode attention may do RoPE and the KV write itself (attn_partial with cos): one token per row,
    head dims the kernel has (run 24: +2 %)."""
    return T == 1 and q.shape[-1] in ATTN_PU


def attention(q: torch.Tensor, positions: torch.Tensor, cache: KVCache, layer: int, T: int,
              rope: tuple | None = None) -> torch.Tensor:
    """q [N,Hq,d] f32; positions int64 [N]; returns [N, Hq*d]. rope: as _attn_partial (q then unrotated)."""
    N, Hq, D = q.shape
    part, ml = _attn_partial(q, positions, cache, layer, T, rope)
    out = torch.empty(N, Hq * D, dtype=torch.float32, device=q.device)
    _launch_combine(part, ml, out, part.shape[2], D, None, {}, "f32", N, Hq * D)
    return out


def attention_quant(q: torch.Tensor, positions: torch.Tensor, cache: KVCache, layer: int, T: int, kl: KLinear,
                    keep_out: bool = True, rope: tuple | None = None):
    """``attention`` with the split merge fused with the activation quantization of the o projection ``kl``
    (attn_combine with a scheme), when that linear takes the mma or half decode path: returns (out, pre) as
    rmsnorm_quant; pre None when nothing was fused (out then comes from ``attention``); keep_out as
    rmsnorm_quant; rope as _attn_partial."""
    N, Hq, D = q.shape
    HD = Hq * D
    path = decode_path(kl, N)
    if path not in ("mma4", *HALF_INPUT) or HD % 16 or D % 16 or HD > 16 * 1024 or kl.perm is not None:
        return attention(q, positions, cache, layer, T, rope), None
    part, ml = _attn_partial(q, positions, cache, layer, T, rope)
    out = torch.empty(N, HD, dtype=torch.float32, device=q.device)
    pre = _quant_outputs(kl, N, HD, path, q.device)
    pre["path"] = path
    _launch_combine(part, ml, out if keep_out else None, part.shape[2], D, kl, pre, path, N, HD)
    return out, pre


def _launch_combine(part, ml, out, S, D, kl, pre, path, N, HD, split: bool = True,
                    heads: bool | None = None) -> None:
    """Merge + normalise the splits into out [N, HD] (may be None), and with kl the quantized forms in pre.
    heads: attn_combine_heads (parallel over splits, one block per head; default where the quantization is
    local to a head); else attn_combine with split: rows over several blocks where the scheme allows (split=False:
    one block per row, the tests' reference grid)."""
    if HD % 16 or HD > 16 * 1024:
        raise ValueError(f"attention merge supports rows of at most 16384 elements (got {HD})")
    if heads is None:
        heads = _head_local(kl, path, D)
    if heads:
        launch("attention", "attn_combine_heads", (N, HD // D), (128,),
               (ptr(part), ptr(ml), ptr(out), i32(S), i32(D), i32(HD)) + _quant_args(kl, pre, path))
        return
    launch("attention", "attn_combine", *(_row_grid(N, HD, kl, path) if split else ((N,), (threads(HD),))),
           (ptr(part), ptr(ml), ptr(out), i32(S), i32(D), i32(HD)) + _quant_args(kl, pre, path))


def _head_local(kl: KLinear | None, path: str, D: int) -> bool:
    """Whether the o projection's input quantization of kl (None: none) is local to one head of D elements
    (attn_combine_heads): none, per-tensor static, or per-128-group fp8 with D % 128 == 0, on the mma4 path."""
    if D not in ATTN_PU:
        return False
    return kl is None or (path == "mma4" and (kl.act == A_FP8 or (kl.act == A_FP8_BLOCK and D % 128 == 0)))


def _row_grid(M: int, n: int, kl: KLinear | None, path: str, per_block: int = 512) -> tuple[tuple, tuple]:
    """(grid, block) of a fused row kernel over M rows of n elements (16 per thread): rows whose quantization
    scales are local to 16..128 elements (no quantization, per-tensor static or per-128-group fp8) spread over
    blocks of per_block elements, so a row is not pulled through one SM (attn_combine: S splits x n x 4 B; run 6
    measured 9.3 us for one block); other schemes need the whole row in one block (row-wide amax)."""
    local = kl is None or (path == "mma4" and kl.act in (A_FP8, A_FP8_BLOCK))
    if local:
        return (M, math.ceil(n / per_block)), (per_block // 16,)
    return (M,), (threads(n),)


# ---------------------------------------------------------------- the fused sequences of a decoder layer
def norm_linear(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None, kl: KLinear,
                fuse: bool = True):
    """linear(rmsnorm(x + residual) * w, kl) and the new residual. Decode (M <= 8, fuse): the rmsnorm kernel writes
    kl's quantized input (rmsnorm_quant), which the linear reads."""
    if fuse and x.shape[0] <= 8:
        y, res, pre = rmsnorm_quant(x, w, eps, residual, kl, keep_out=False)
        return linear(y, kl, pre=pre), res
    y, res = rmsnorm(x, w, eps, residual)
    return linear(y, kl), res


def norm_mlp(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None, gu: KLinear,
             down: KLinear, fuse: bool = True):
    """down(silu(gate) * up) of rmsnorm(x + residual) * w through the gate|up linear gu, and the new residual;
    fused as norm_linear and gate_up_silu (an interleaved gu: one gemv_mma4ps launch for gate|up + silu + down's
    input quantization)."""
    pre = None
    if fuse and x.shape[0] <= 8:
        m, res, pre = rmsnorm_quant(x, w, eps, residual, gu, keep_out=False)
    else:
        m, res = rmsnorm(x, w, eps, residual)
    act, pre_d = gate_up_silu(m, gu, down, pre, fuse)
    return linear(act, down, pre=pre_d), res


def attention_o(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                layer: int, cos: torch.Tensor, sin: torch.Tensor, o: KLinear, fuse: bool = True) -> torch.Tensor:
    """o(attention(RoPE(q) over the cache after RoPE(k), v are stored at positions)): q [N, Hq, d], k / v
    [N, Hkv, d] unrotated (row views allowed), positions [B, T]. Decode (fuse): attn_partial rotates and stores
    itself (rope_fusable), and for M <= 8 the split merge writes o's quantized input (attention_quant)."""
    T = positions.shape[1]
    if fuse and rope_fusable(q, T):
        qr, rope = q, (k, v, cos, sin)
    else:
        qr, rope = rope_and_store(q, k, v, positions, cache, layer, cos, sin, T), None
    if fuse and q.shape[0] <= 8:
        out, pre = attention_quant(qr, positions, cache, layer, T, o, keep_out=False, rope=rope)
        return linear(out, o, pre=pre)
    return linear(attention(qr, positions, cache, layer, T, rope), o)


# ---------------------------------------------------------------- sampling
def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           u: torch.Tensor | None = None, rng: torch.Tensor | None = None) -> torch.Tensor:
    logits = logits.to(torch.float32)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    launch("sampling", "sample_tokens", (1,), (1024,),
           (ptr(logits), i32(logits.stride(0)), i32(V), ptr(out), i32(B), f32(temperature), i32(top_k or 0),
            f32(top_p if top_p is not None else 1.0), ptr(u), ptr(rng)))
    return out
