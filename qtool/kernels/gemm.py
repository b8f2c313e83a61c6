"""Dense linears through cuBLAS / cuBLASLt (called through torch) for prefill and batched decode (M > 8 rows;
bf16 weights from 2 rows).

Contract: ``applies(kl, M)`` says whether ``ops.linear`` takes this path ("blas") for M rows; ``linear(x, kl)``
returns y = x̂ W^T (+ bias) as float32 [M, O] on torch's current stream (no host synchronisation, so a batched
decode step that uses it can be captured in a CUDA graph). ``keep_row_major(kls)`` gives mma-tiled fp8 layers a
row-major copy of their codes (``KLinear.rm``) when the copies fit in a quarter of the free GPU memory; without
one, each call untiles the codes into a scratch buffer (untile_fp8).

Per format:
- fp8 weights with fp8 activations per tensor (static ``input_scale``) or per token: x̂ as e4m3 codes + scales
  (act_quant.cu, the reference's exact rule) and ``torch._scaled_mm`` on the row-major codes: fp8 tensor cores,
  float32 accumulation, the activation and weight scales applied in the epilogue (per tensor, or per row x per
  output feature); every product is exact, sums are float32 in cuBLASLt's order.
- bf16 weights: ``torch.mm`` on x̂ rounded to bf16.
- every other format (fp8 block scales or weight-only, nvfp4, mxfp4, int4 AWQ / GPTQ): the weight decoded once per
  call into a bf16 scratch buffer (dequant.cu: the reference decode rounded once to bf16; at M <= CHUNK_MAX_M in
  row chunks sized to stay in L2, each chunk's GEMM right after its decode: ``chunk_rows``), then ``torch.mm`` on x̂
  (act_quant.cu's float32 result, rounded to bf16). Where both roundings can be avoided they are: x̂ of a static
  per-tensor fp8 or nvfp4 input scale is divided by that scale (leaving e4m3 or e2m1 x e4m3 values, exact in bf16)
  and nvfp4 weights are decoded without their global scale (E2M1 x E4M3, exact); both scales multiply the float32
  output instead, so those products are exact and only the float32 sums differ from the reference.
Outputs are float32 where cuBLASLt writes it directly (probed once per process, outside graph capture), else
bf16 widened to float32. Tolerance (docs/numerics.md): the bf16 roundings of x̂ and of decoded weights give
‖y − ref‖/‖ref‖ of a few 1e-3 (tested at 5e-3, bound 1e-2); the fp8 path has exact products and Hopper's fp8
accumulation between cuBLASLt's float32 promotions (tested at 2e-3).
"""
from __future__ import annotations

import functools
import math

import torch

from qtool.kernels.launch import f32, i32, launch, ptr
from qtool.kernels.quant_input import act_quant, fp8_codes_ok
from qtool.kernels.weights import A_FP8, A_FP8_TOKEN, A_NONE, A_NVFP4, F_BF16, F_FP8, F_FP8T, F_INT4, F_NVFP4, KLinear

DECODE_MAX_M = 8          # rows the GEMV decode paths take; above it this module's GEMMs run


def applies(kl: KLinear, M: int) -> bool:
    """M > DECODE_MAX_M rows (bf16 weights: M >= 2, where cuBLAS reads the weights once and the f32 GEMV for 8
    rows measured 3.5x its 1-row time, H100 2026-12-07) on a layout dequant.cu and cuBLAS take: K % 8 == 0
    (16-byte rows of bf16) and fp8 / int4 scale blocks along K in multiples of 8."""
    K = kl.in_features
    if M <= (1 if kl.fmt == F_BF16 else DECODE_MAX_M) or K % 8:
        return False
    return kl.fmt not in (F_FP8, F_INT4) or kl.sbi % 8 == 0 or kl.sbi >= K


def _scaled_ok(kl: KLinear) -> bool:
    """fp8 x fp8 through _scaled_mm: codes from act_quant (static per-tensor or per-token activation scales, no
    pre-quant scale) and a per-tensor or per-row weight scale; K, O multiples of 16 (cuBLASLt's fp8 rule)."""
    return (kl.fmt == F_FP8 and kl.act in (A_FP8, A_FP8_TOKEN) and fp8_codes_ok(kl) and kl.sbi >= kl.in_features
            and kl.in_features % 16 == 0 and kl.out_features % 16 == 0)


def linear(x: torch.Tensor, kl: KLinear) -> torch.Tensor:
    """y f32 [M, O] for x f32 [M, K] (already permuted by kl.perm where the layer has one)."""
    if _scaled_ok(kl):
        y = _fp8_scaled(x, kl)
    else:
        xh = x if (kl.act == A_NONE and kl.pqs is None) else _act(x, kl)
        unit = kl.act in (A_FP8, A_NVFP4) and kl.in_scale is not None    # x̂ / in_scale: e4m3 or e2m1 x e4m3, exact
        if unit:
            xh = xh / kl.in_scale
        gs = kl.fmt == F_NVFP4 and kl.gs != 1.0                          # e2m1 x e4m3 without the global: exact
        a = xh.to(torch.bfloat16)
        rows = kl.out_features if kl.fmt == F_BF16 else chunk_rows(kl, x.shape[0])
        if rows >= kl.out_features:
            y = _mm(a, kl.w if kl.fmt == F_BF16 else dequant(kl, unit_global=gs))
        else:                                     # decoded in row chunks that stay in L2 (batched decode)
            y = torch.empty(x.shape[0], kl.out_features, dtype=torch.float32, device=x.device)
            w = torch.empty(rows, kl.in_features, dtype=torch.bfloat16, device=x.device)
            for o0 in range(0, kl.out_features, rows):
                n = min(rows, kl.out_features - o0)
                y[:, o0:o0 + n] = _mm(a, dequant(kl, unit_global=gs, rows=(o0, n), out=w[:n]))
        if unit:
            y.mul_(kl.in_scale)
        if gs:
            y.mul_(kl.gs)
    if kl.bias is not None:
        y.add_(kl.bias)
    return y


def _act(x: torch.Tensor, kl: KLinear) -> torch.Tensor:
    return act_quant(x, kl)["x"]


def _mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a bf16 [M, K] @ w bf16 [O, K]^T -> f32 [M, O]."""
    if _f32_out("mm"):
        return torch.mm(a, w.t(), out_dtype=torch.float32)
    return torch.mm(a, w.t()).float()


def _fp8_scaled(x: torch.Tensor, kl: KLinear) -> torch.Tensor:
    q = act_quant(x, kl, codes=True)
    M, O = x.shape[0], kl.out_features
    a = q["xq"].view(torch.float8_e4m3fn)
    b = row_major(kl).view(torch.float8_e4m3fn).t()
    if kl.act == A_FP8 and kl.sc.numel() == 1:            # per tensor x per tensor
        kind, sa, sb = "tensor", kl.in_scale.reshape(()), kl.sc.reshape(())
    else:                                             # per row of x (xs) x per output feature
        kind, sa = "row", q["xs"][:, :1].contiguous()
        sb = (kl.sc if kl.sc.numel() == O else kl.sc.reshape(1).expand(O)).reshape(1, O).contiguous()
    if _f32_out(kind):
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16).float()


def row_major(kl: KLinear) -> torch.Tensor:
    """kl's fp8 codes as row-major u8 [O, K]: kl.w, its kept copy (kl.rm), or a scratch untiled copy."""
    if not kl.tiled:
        return kl.w
    if kl.rm is not None:
        return kl.rm
    return untile(kl)


def untile(kl: KLinear) -> torch.Tensor:
    O, K = kl.out_features, kl.in_features
    out = torch.empty(O, K, dtype=torch.uint8, device=kl.w.device)
    launch("dequant", "untile_fp8", (math.ceil(O * (K // 16) / 256),), (256,), (ptr(kl.w), ptr(out), i32(O), i32(K)))
    return out


def dequant(kl: KLinear, unit_global: bool = False, rows: tuple[int, int] | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """kl's weights decoded to bf16 [O, K] (``out``, else a fresh scratch tensor from torch's caching allocator);
    rows = (o0, n): only rows o0 .. o0 + n - 1, into [n, K]. unit_global (nvfp4): without the per-tensor global
    scale kl.gs, so every value (E2M1 x E4M3) is exact in bf16."""
    K = kl.in_features
    o0, n = rows or (0, kl.out_features)
    if out is None:
        out = torch.empty(n, K, dtype=torch.bfloat16, device=kl.w.device)
    f = F_FP8T if kl.tiled else kl.fmt
    launch("dequant", f"dequant_bf16<{f}>", (math.ceil(n * (K // 8) / 256),), (256,),
           (ptr(kl.w), ptr(kl.sc), ptr(kl.zp), f32(1.0 if unit_global else kl.gs), f32(kl.s2), ptr(out), i32(n),
            i32(K), i32(kl.sld), i32(kl.sbo), i32(kl.sbi), i32(o0)))
    return out


CHUNK_MAX_M = 64       # rows of x up to which decoded weights go through L2 in row chunks (batched decode)
L2_SHARE = 0.5         # the share of the GPU's L2 one chunk of bf16 weights may fill


def chunk_rows(kl: KLinear, M: int) -> int:
    """Weight rows decoded per chunk for M rows of x: every row (one scratch of O x K bf16, written to and read back
    from HBM) above CHUNK_MAX_M; at or below it, a multiple of 128 rows whose bf16 copy fills at most L2_SHARE of
    the L2 (at least 128), so the GEMM reads each chunk from L2 right after the decode wrote it: HBM then carries
    the codes once instead of codes + 2 x 2 bytes per weight (8B nvfp4 at batch 32: ~36 GB a step, run 61)."""
    if M > CHUNK_MAX_M:
        return kl.out_features
    l2 = _l2_bytes(kl.w.device)
    return max(128, int(l2 * L2_SHARE) // (2 * kl.in_features) // 128 * 128)


@functools.lru_cache(maxsize=None)
def _l2_bytes(device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20)


def keep_row_major(kls) -> int:
    """Attach a row-major copy of the codes (kl.rm) to every mma-tiled fp8 KLinear in ``kls`` whose prefill /
    batched GEMM reads row-major codes (_scaled_ok), when all the copies together fit in a quarter of the free
    GPU memory. Returns the bytes kept (0: none; the GEMMs then untile per call)."""
    todo = [kl for kl in kls if isinstance(kl, KLinear) and kl.tiled and kl.rm is None and _scaled_ok(kl)]
    need = sum(kl.out_features * kl.in_features for kl in todo)
    if not todo or need > torch.cuda.mem_get_info(todo[0].w.device)[0] // 4:
        return 0
    for kl in todo:
        kl.rm = untile(kl)
    return need


_F32_OUT: dict[str, bool] = {}


def _f32_out(kind: str) -> bool:
    """Whether cuBLASLt writes float32 outputs directly here for ``kind`` ("mm": bf16 x bf16; "tensor" / "row":
    fp8 x fp8 with per-tensor / per-row scales): tried once on small operands. While a graph is being captured
    the answer is not cached and is False (the bf16 output, widened)."""
    ok = _F32_OUT.get(kind)
    if ok is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        ok = _F32_OUT[kind] = _probe(kind)
    return ok


def _probe(kind: str) -> bool:
    dev = torch.device("cuda", torch.cuda.current_device())
    try:
        if kind == "mm":
            a = torch.ones(32, 32, dtype=torch.bfloat16, device=dev)
            return bool(torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32)
        a = torch.ones(32, 32, device=dev).to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        sa, sb = (one, one) if kind == "tensor" else (torch.ones(32, 1, device=dev), torch.ones(1, 32, device=dev))
        y = torch._scaled_mm(a, a.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        return bool(y.dtype == torch.float32 and float(y[0, 0]) == 32.0)
    except (RuntimeError, TypeError):
        return False
