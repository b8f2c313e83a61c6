// linear.cu — y = x̂ @ W^T (+ bias) for every weight format, weights decoded in registers.
// x̂ f32 [M, ldx] (already activation-quantized by act_quant.cu); y f32 [M, ldy]; bias f32 [O] or null.
// Weight formats (prepared by qtool/kernels/weights.py from the checkpoint tensors):
//   F=0 bf16 : w bf16 [O, K]
//   F=1 fp8  : w e4m3 [O, K]; sc f32 scale grid, W[o,k] = w * sc[(o/sbo)*sld + k/sbi]
//              (per-tensor: sbo=O, sbi=K; rowwise: sbo=1, sbi=K; block: sbo=sbi=128)
//   F=2 nvfp4: w u8 [O, K/2] (element 2k low nibble); sc e4m3 u8 [O, K/16]; W = E2M1 * (sc * gs)
//   F=3 mxfp4: w u8 [O, K/2]; sc E8M0 u8 [O, K/32]; W = E2M1 * 2^(sc-127)
//   F=4 int4 : w u8 [O, K/2] unsigned nibbles u; sc f32 [O, sld], zp f32 [O, sld] (group sbi):
//              W = (u - zp) * sc; if s2 != 0 (W4A8 AWQ): W = e4m3(W / s2) * s2
//   F=5 fp8 mma-tiled (gemm only): F=1 with the codes in weights.mma_tile_fp8's order (see gemv_mma4p), the
//              layout of every fp8 layer on the fp8 x fp8 decode path; prefill reads the same copy
// gemv<F, MR>: decode path, M <= MR rows. grid ceil(O/8), block 256 (one warp per output row, 16-byte
//   streaming weight loads, 4 in flight per lane). Needs K % EPV == 0 (EPV = 8 bf16, 16 fp8, 32 fp4/int4),
//   16-byte aligned rows, ldx % 4 == 0, and for fp8 sbi % 16 == 0, for int4 sbi % 32 == 0.
// gemv_h<F, MR> (F = 1..4, not int4 with s2): decode path on f16 math. xh f16 [M, K] from act_quant.cu (x̂ * 2^k
//   per row, pair order: fp8 [0,2,1,3], fp4/int4 [0,4,1,5,2,6,3,7]), hs f32 [M] = 2^-k. Weight codes become
//   exact f16 pairs (bit tricks, no conversion instructions), products are accumulated with HFMA2 over 8
//   elements (|partial| < 2^15), then in f32 with the block scale. sbi is passed as log2 (per-row scale: -1).
//   Error: f16 rounding of x̂ and of 8-term partial sums, ~1e-3 relative (numerics.md budgets 1e-2). With xsc
//   (nvfp4 / mxfp4 activations given as exact E2M1 values, block scales xsc [M, K >> xsc_log2]) every product
//   and 8-term sum is exact in f16.
// gemm<F>: general path (any M, K), 64x64 tiles of f32 FMA with scalar dequant. grid (ceil(O/64), ceil(M/64)),
//   block 256.
#include "common.cuh"
#include "mma_frag.cuh"

#define FMT_BF16 0
#define FMT_FP8 1
#define FMT_NVFP4 2
#define FMT_MXFP4 3
#define FMT_INT4 4
#define FMT_FP8T 5


// byte offset of fp8 code (o, k) in the mma-tiled layout (weights.mma_tile_fp8; gemv_mma4p, gemm<5>)
__device__ __forceinline__ long long tiled_fp8_offset(int o, int k, int K) {
  return (((long long)(o >> 4) * (K >> 6) + (k >> 6)) * 2 + ((o >> 3) & 1)) * 512 + ((o & 7) * 4 + ((k & 63) >> 4)) * 16
         + (k & 15);
}

template <int F>
__device__ __forceinline__ float wload1(const u8* w, const void* sc, const float* zp, float gs, float s2, int K,
                                        int sld, int sbo, int sbi, int o, int k) {
  if (F == FMT_BF16) return bf16_to_f32(((const bf16_t*)w)[(long long)o * K + k]);
  if (F == FMT_FP8)
    return e4m3_to_f32(w[(long long)o * K + k]) * ((const float*)sc)[(long long)(o / sbo) * sld + k / sbi];
  if (F == FMT_FP8T)   // mma-tiled fp8 (gemv_mma4p layout)
    return e4m3_to_f32(w[tiled_fp8_offset(o, k, K)]) * ((const float*)sc)[(long long)(o / sbo) * sld + k / sbi];
  unsigned nib = (w[(long long)o * (K / 2) + k / 2] >> (4 * (k & 1))) & 15u;
  if (F == FMT_NVFP4)
    return e2m1_to_f32(nib) * (e4m3_to_f32(((const u8*)sc)[(long long)o * (K / 16) + k / 16]) * gs);
  if (F == FMT_MXFP4) return e2m1_to_f32(nib) * e8m0_to_f32(((const u8*)sc)[(long long)o * (K / 32) + k / 32]);
  long long g = (long long)o * sld + k / sbi;
  float v = ((float)nib - zp[g]) * ((const float*)sc)[g];
  if (s2 != 0.0f) v = e4m3_round(v / s2) * s2;
  return v;
}

template <int F> struct Epv { static constexpr int v = F == FMT_BF16 ? 8 : (F == FMT_FP8 ? 16 : 32); };

// acc[m] += sum_i W[o, e+i] * x[m, e+i] for the EPV elements held in raw
template <int F, int MR>
__device__ __forceinline__ void dot_chunk(uint4 raw, int e, int o, const float* __restrict__ x, int ldx, int M,
                                          const void* sc, const float* zp, float gs, float s2, int K, int sld,
                                          int sbo, int sbi, float acc[MR]) {
  constexpr int EPV = Epv<F>::v;
  unsigned u[4] = {raw.x, raw.y, raw.z, raw.w};
  float wv[EPV];
  if (F == FMT_BF16) {
#pragma unroll
    for (int j = 0; j < 4; ++j) { wv[2 * j] = __uint_as_float(u[j] << 16); wv[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u); }
  } else if (F == FMT_FP8) {
    float s = ((const float*)sc)[(long long)(o / sbo) * sld + e / sbi] * 256.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      unsigned a, b; fp8x4_to_h2(u[j], a, b);
      float f0, f1, f2, f3; h2x2f(a, f0, f2); h2x2f(b, f1, f3);
      wv[4 * j] = f0 * s; wv[4 * j + 1] = f1 * s; wv[4 * j + 2] = f2 * s; wv[4 * j + 3] = f3 * s;
    }
  } else if (F == FMT_NVFP4 || F == FMT_MXFP4) {
    float s0, s1;
    if (F == FMT_NVFP4) {
      const u8* sp = (const u8*)sc + (long long)o * (K / 16) + e / 16;
      s0 = e4m3_to_f32(sp[0]) * gs * 16384.0f; s1 = e4m3_to_f32(sp[1]) * gs * 16384.0f;
    } else {
      s0 = s1 = e8m0_to_f32(((const u8*)sc)[(long long)o * (K / 32) + e / 32]) * 16384.0f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      unsigned h[4]; fp4x8_to_h2(u[j], h);
      float s = j < 2 ? s0 : s1;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float lo, hi; h2x2f(h[k], lo, hi);
        wv[8 * j + k] = lo * s; wv[8 * j + k + 4] = hi * s;
      }
    }
  } else {  // INT4
    long long g = (long long)o * sld + e / sbi;
    float s = ((const float*)sc)[g], z = zp[g];
    unsigned short zh; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(zh) : "f"(1024.0f + z));
    unsigned zz = ((unsigned)zh << 16) | zh;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      unsigned h[4]; u4x8_to_h2(u[j], h);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float lo, hi; h2x2f(hsub2(h[k], zz), lo, hi);
        wv[8 * j + k] = lo * s; wv[8 * j + k + 4] = hi * s;
      }
    }
    if (s2 != 0.0f) {
#pragma unroll
      for (int i = 0; i < EPV; ++i) wv[i] = e4m3_round(wv[i] / s2) * s2;
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    if (m < M) {
      const float4* xp = (const float4*)(x + (long long)m * ldx + e);
      float a = 0.0f;
#pragma unroll
      for (int q = 0; q < EPV / 4; ++q) {
        float4 xv = xp[q];
        a += wv[4 * q] * xv.x + wv[4 * q + 1] * xv.y + wv[4 * q + 2] * xv.z + wv[4 * q + 3] * xv.w;
      }
      acc[m] += a;
    }
  }
}

template <int F, int MR>
__global__ void __launch_bounds__(256) gemv(const float* __restrict__ x, int ldx, const u8* __restrict__ w,
                                            const void* __restrict__ sc, const float* __restrict__ zp, float gs,
                                            float s2, const float* __restrict__ bias, float* __restrict__ y,
                                            int ldy, int M, int O, int K, int sld, int sbo, int sbi) {
  QT_PDL_ENTRY
  constexpr int EPV = Epv<F>::v;
  constexpr int U = 4;
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int o = blockIdx.x * 8 + warp;
  if (o >= O) return;
  int nch = K / EPV;
  const uint4* wr = (const uint4*)(w + (long long)o * nch * 16);
  float acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0.0f;
  int c = lane;
  for (; c + 32 * (U - 1) < nch; c += 32 * U) {
    uint4 r[U];
#pragma unroll
    for (int t = 0; t < U; ++t) r[t] = ld_stream(wr + c + 32 * t);
#pragma unroll
    for (int t = 0; t < U; ++t)
      dot_chunk<F, MR>(r[t], (c + 32 * t) * EPV, o, x, ldx, M, sc, zp, gs, s2, K, sld, sbo, sbi, acc);
  }
  for (; c < nch; c += 32) dot_chunk<F, MR>(ld_stream(wr + c), c * EPV, o, x, ldx, M, sc, zp, gs, s2, K, sld, sbo, sbi, acc);
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = warp_sum(acc[m]);
  if (lane == 0) {
    float b = bias ? bias[o] : 0.0f;
#pragma unroll
    for (int m = 0; m < MR; ++m)
      if (m < M) y[(long long)m * ldy + o] = acc[m] + b;
  }
}


__device__ __forceinline__ unsigned hmul2(unsigned a, unsigned b) {
  unsigned r; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r;
}
__device__ __forceinline__ float hsum2(unsigned v) { float a, b; h2x2f(v, a, b); return a + b; }

template <int F, int MR>
__global__ void __launch_bounds__(256) gemv_h(const unsigned short* __restrict__ xh, const float* __restrict__ hs,
                                              const u8* __restrict__ w, const void* __restrict__ sc,
                                              const float* __restrict__ zp, float gs,
                                              const float* __restrict__ bias, float* __restrict__ y, int ldy, int M,
                                              int O, int K, int sld, int sbo, int sbi_log2,
                                              const float* __restrict__ xsc, int xsc_log2) {
  QT_PDL_ENTRY
  constexpr int EPV = F == FMT_FP8 ? 16 : 32;
  constexpr int U = 4;
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int o = blockIdx.x * 8 + warp;
  if (o >= O) return;
  int nch = K / EPV;
  const uint4* wr = (const uint4*)(w + (long long)o * nch * 16);
  float acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0.0f;
  const float* fsc = (const float*)sc;
  const u8* bsc = (const u8*)sc;
  long long srow = F == FMT_FP8 ? (long long)(o / sbo) * sld
                 : (F == FMT_NVFP4 ? (long long)o * (K / 16) : (F == FMT_MXFP4 ? (long long)o * (K / 32)
                                                                               : (long long)o * sld));
  unsigned zz = 0;
  for (int c0 = lane; c0 < nch; c0 += 32 * U) {
    uint4 r[U];
#pragma unroll
    for (int t = 0; t < U; ++t)
      if (c0 + 32 * t < nch) r[t] = ld_stream(wr + c0 + 32 * t);
#pragma unroll
    for (int t = 0; t < U; ++t) {
      int c = c0 + 32 * t;
      if (c >= nch) break;
      int e = c * EPV;
      unsigned u[4] = {r[t].x, r[t].y, r[t].z, r[t].w};
      // decoded weight pairs in the x pair order, and the scale of each 8- or 16-element half
      unsigned wp[EPV / 2];
      float s0 = 1.0f, s1 = 1.0f;
      if (F == FMT_FP8) {
#pragma unroll
        for (int j = 0; j < 4; ++j) fp8x4_to_h2(u[j], wp[2 * j], wp[2 * j + 1]);
        if (sbi_log2 >= 0) s0 = s1 = fsc[srow + (e >> sbi_log2)];
      } else {
        const unsigned TWO14 = 0x74007400u;  // f16x2 (2^14, 2^14)
        if (F == FMT_INT4) {
          long long g = srow + (e >> sbi_log2);
          s0 = s1 = fsc[g];
          unsigned short zh; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(zh) : "f"(1024.0f + zp[g]));
          zz = ((unsigned)zh << 16) | zh;
        } else if (F == FMT_NVFP4) {
          s0 = e4m3_to_f32(bsc[srow + (e >> 4)]) * gs;
          s1 = e4m3_to_f32(bsc[srow + (e >> 4) + 1]) * gs;
        } else {
          s0 = s1 = e8m0_to_f32(bsc[srow + (e >> 5)]);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          unsigned h[4];
          if (F == FMT_INT4) u4x8_to_h2(u[j], h); else fp4x8_to_h2(u[j], h);
#pragma unroll
          for (int k = 0; k < 4; ++k) wp[4 * j + k] = F == FMT_INT4 ? hsub2(h[k], zz) : hmul2(h[k], TWO14);
        }
      }
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        if (m < M) {
          const uint4* xp = (const uint4*)(xh + (long long)m * K + e);
          unsigned p0 = 0, p1 = 0;  // f16x2 partial sums of the two halves of the chunk
#pragma unroll
          for (int q = 0; q < EPV / 8; ++q) {
            uint4 xv = xp[q];
            unsigned xs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              if (q < EPV / 16) p0 = hfma2(wp[4 * q + i], xs[i], p0);
              else p1 = hfma2(wp[4 * q + i], xs[i], p1);
            }
          }
          if (xsc) {  // per-block activation scales (nvfp4 / mxfp4 activations as exact E2M1 values)
            const float* xr = xsc + (long long)m * (K >> xsc_log2);
            acc[m] += hsum2(p0) * (s0 * xr[e >> xsc_log2]) + hsum2(p1) * (s1 * xr[(e + 16) >> xsc_log2]);
          } else {
            acc[m] += hsum2(p0) * s0 + hsum2(p1) * s1;
          }
        }
      }
    }
  }
  float rs = 1.0f;
  if (F == FMT_FP8) rs = (sbi_log2 < 0 ? fsc[srow] : 1.0f) * 256.0f;
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = warp_sum(acc[m]);
  if (lane == 0) {
    float b = bias ? bias[o] : 0.0f;
#pragma unroll
    for (int m = 0; m < MR; ++m)
      if (m < M) y[(long long)m * ldy + o] = acc[m] * rs * hs[m] + b;
  }
}

template <int F>
__global__ void __launch_bounds__(256) gemm(const float* __restrict__ x, int ldx, const u8* __restrict__ w,
                                            const void* __restrict__ sc, const float* __restrict__ zp, float gs,
                                            float s2, const float* __restrict__ bias, float* __restrict__ y,
                                            int ldy, int M, int O, int K, int sld, int sbo, int sbi) {
  QT_PDL_ENTRY
  const int BM = 64, BN = 64, BK = 16;
  __shared__ float As[BK][BM + 4], Bs[BK][BN + 4];
  int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  int m0 = blockIdx.y * BM, o0 = blockIdx.x * BN;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      int idx = tid + 256 * t, r = idx / BK, kk = idx % BK;
      int m = m0 + r, o = o0 + r, k = k0 + kk;
      As[kk][r] = (m < M && k < K) ? x[(long long)m * ldx + k] : 0.0f;
      Bs[kk][r] = (o < O && k < K) ? wload1<F>(w, sc, zp, gs, s2, K, sld, sbo, sbi, o, k) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) { a[i] = As[kk][ty * 4 + i]; b[i] = Bs[kk][tx * 4 + i]; }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int o = o0 + tx * 4 + j;
      if (o < O) y[(long long)m * ldy + o] = acc[i][j] + (bias ? bias[o] : 0.0f);
    }
  }
}

#define QT_GEMV_ARGS const float*, int, const u8*, const void*, const float*, float, float, const float*, float*, \
  int, int, int, int, int, int, int
#define QT_INST_F(F) \
  template __global__ void gemv<F, 1>(QT_GEMV_ARGS); template __global__ void gemv<F, 2>(QT_GEMV_ARGS); \
  template __global__ void gemv<F, 4>(QT_GEMV_ARGS); template __global__ void gemv<F, 8>(QT_GEMV_ARGS); \
  template __global__ void gemm<F>(QT_GEMV_ARGS);
#define QT_GEMVH_ARGS const unsigned short*, const float*, const u8*, const void*, const float*, float, \
  const float*, float*, int, int, int, int, int, int, int, const float*, int
#define QT_INST_H(F) \
  template __global__ void gemv_h<F, 1>(QT_GEMVH_ARGS); template __global__ void gemv_h<F, 2>(QT_GEMVH_ARGS); \
  template __global__ void gemv_h<F, 4>(QT_GEMVH_ARGS); template __global__ void gemv_h<F, 8>(QT_GEMVH_ARGS);
QT_INST_H(1)
QT_INST_H(2)
QT_INST_H(3)
QT_INST_H(4)
QT_INST_F(0)
QT_INST_F(1)
QT_INST_F(2)
QT_INST_F(3)
QT_INST_F(4)
template __global__ void gemm<FMT_FP8T>(QT_GEMV_ARGS);

QT_MMA_16X8(mma_e4m3, "m16n8k32.row.col.f32.e4m3.e4m3.f32")   // k 32; Hopper runs it as f16 conversions + HMMA


// gemv_mma4p: FP8 weights x FP8 activations on the tensor cores (mma.sync m16n8k32 e4m3, f32 accumulate), the
// decode GEMV (M <= 8) of the fp8 / fp8-rowwise / fp8-block recipes. Exact products, f32 sums: matches x̂ @ W^T
// to f32 rounding. xq e4m3 codes [M, K] and xs (per row [M], or per 128-group [M, K/128] when xs_group); weights
// mma-tiled (weights.mma_tile_fp8: O padded to 16 rows, K % 64 == 0; byte (o, k) at
// ((o/16 * K/64 + k/64) * 2 + (o%16)/8) * 512 + ((o%8) * 4 + (k%64)/16) * 16 + k%16), so each warp's 16-B loads
// of one round read 512 contiguous bytes and a warp streams one contiguous range; weight scale grid ws as for
// gemv (sbo, sld, sbi_log2 = -1 for one scale per row). One warp = 16 output rows (tile blockIdx.x) x one K
// slice of kslice (multiple of 256): lane (g, t) loads 16 B of rows g and g+8 at k = 16 t (+64 per round) and
// 16 B of x row g at the same k, 4 rounds (12 16-B loads) in flight before its 8 mma steps (the k order inside a
// round is permuted identically for W and x, which a dot product allows). Scales: per-row weight scale with
// per-row activation scale -> one multiply at the end of the slice; per-128 weight blocks (sbi_log2 = 7) and/or
// per-128 activation groups (xs_group) -> one multiply per 128-k half.
// Block = S warps (S = blockDim.x / 32 <= 16 K slices of one 16-row tile), grid ceil(O / 16), dynamic shared
// memory S * 512 B when S > 1: the warps' fragments meet in shared memory and warp 0 sums them in a fixed order
// (bias first, then s = 0..S-1) and writes y (or the il epilogue).
// gemv_mma4ps: il > 0 (gate|up fused with silu, O = 2 il, il % 8 == 0): the weight rows are interleaved in groups
// of 8 (row 16 j + i = gate row 8 j + i, row 16 j + 8 + i = up row 8 j + i, bias the same), so a lane holds the
// gate and up sums of the same feature; instead of y the kernel writes the down projection's fp8 input
// xq_out[m, f] = e4m3(silu_mul1(gate, up) (* pqs[f]) / in_scale[0]) (act_quant scheme 1: the bits of
// silu_mul_quant on y) and xs_out[m] = in_scale[0] (block 0); y is not touched.

__device__ __forceinline__ void silu_quant_store(float g, float u, int m, int f, int I, float ts,
                                                 const float* __restrict__ pqs, u8* __restrict__ xq) {
  float v = silu_mul1(g, u);
  if (pqs) v *= pqs[f];
  xq[(long long)m * I + f] = (u8)f32_to_e4m3(v / ts);
}

template <bool IL>
__device__ __forceinline__ void gemv_mma_tiled(const u8* __restrict__ xq, const float* __restrict__ xs,
    int xs_group, const u8* __restrict__ wq, const float* __restrict__ ws, const float* __restrict__ bias,
    float* __restrict__ y, int ldy, int M, int O, int K, int sld, int sbo, int sbi_log2, int kslice, int il,
    const float* __restrict__ in_scale, const float* __restrict__ pqs, u8* __restrict__ xq_out,
    float* __restrict__ xs_out) {
  constexpr int U = 4;
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, S = blockDim.x >> 5;
  int g = lane >> 2, t = lane & 3;
  int r0 = blockIdx.x * 16;
  int k0 = warp * kslice, k1 = min(K, k0 + kslice);
  int ra = r0 + g, rb = r0 + g + 8;
  bool va = ra < O, vb = rb < O, vx = g < M;
  // lane's 16 B of row ra at k lie at tw + (k/64)*1024, row rb's 512 B further
  const u8* tw = wq + (long long)(r0 >> 4) * (K >> 6) * 1024 + lane * 16;
  const u8* px = xq + (long long)(vx ? g : 0) * K;
  int m0 = 2 * t, m1 = 2 * t + 1;
  const float* wsa = ws + (long long)((va ? ra : 0) / sbo) * sld;
  const float* wsb = ws + (long long)((vb ? rb : 0) / sbo) * sld;
  int ng = (K + 127) / 128;
  bool grouped = sbi_log2 >= 0 || xs_group;
  // PDL: this warp's weights for its first two k steps go to L2 before waiting for the previous kernel (the
  // weights are constant; x̂, the scales' consumers and y are only touched after pdl_wait)
  if (r0 < O) {                 // the warp's 2U KB are contiguous: 2U*8 lines of 128 B
    const u8* base = wq + ((long long)(r0 >> 4) * (K >> 6) + (k0 >> 6)) * 1024;
    long long end = (long long)((k1 - k0 + 63) >> 6) * 1024;
#pragma unroll
    for (int j = 0; j < U / 2; ++j) {
      int off = j * 4096 + lane * 128;
      if (off < end) prefetch_l2(base + off);
    }
  }
  if (!IL) il = 0;
  float ts = il ? in_scale[0] : 1.0f;   // a constant: read before the wait
  QT_PDL_ENTRY
  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // rows (ra, m0), (ra, m1), (rb, m0), (rb, m1)
  float d[4] = {0.f, 0.f, 0.f, 0.f};    // unscaled sums (per-row scales)
  if (r0 < O) {
    for (int kb = k0; kb < k1; kb += 64 * U) {
      uint4 A[U], B[U], X[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        int k = kb + 64 * u + 16 * t;
        bool in = k < k1;
        uint4 z = make_uint4(0, 0, 0, 0);
        const u8* wa = tw + (long long)(k >> 6) * 1024;
        A[u] = (va && in) ? ld_stream((const uint4*)wa) : z;
        B[u] = (vb && in) ? ld_stream((const uint4*)(wa + 512)) : z;
        X[u] = (vx && in) ? *(const uint4*)(px + k) : z;
      }
      if (grouped) {
#pragma unroll
        for (int h = 0; h < U / 2; ++h) {
          int kh = kb + 128 * h;
          if (kh < k1) {
            float e[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int u = 2 * h; u < 2 * h + 2; ++u) {
              mma_e4m3(e, A[u].x, B[u].x, A[u].y, B[u].y, X[u].x, X[u].y);
              mma_e4m3(e, A[u].z, B[u].z, A[u].w, B[u].w, X[u].z, X[u].w);
            }
            int kbi = sbi_log2 >= 0 ? (kh >> sbi_log2) : 0;
            float wa = wsa[kbi], wb = wsb[kbi];
            float x0, x1;
            if (xs_group) {
              int gi = kh >> 7;
              x0 = m0 < M ? xs[(long long)m0 * ng + gi] : 0.f; x1 = m1 < M ? xs[(long long)m1 * ng + gi] : 0.f;
            } else {
              x0 = m0 < M ? xs[m0] : 0.f; x1 = m1 < M ? xs[m1] : 0.f;
            }
            acc[0] += e[0] * (wa * x0); acc[1] += e[1] * (wa * x1);
            acc[2] += e[2] * (wb * x0); acc[3] += e[3] * (wb * x1);
          }
        }
      } else {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          mma_e4m3(d, A[u].x, B[u].x, A[u].y, B[u].y, X[u].x, X[u].y);
          mma_e4m3(d, A[u].z, B[u].z, A[u].w, B[u].w, X[u].z, X[u].w);
        }
      }
    }
    if (!grouped) {
      float wa = wsa[0], wb = wsb[0];
      float x0 = m0 < M ? xs[m0] : 0.f, x1 = m1 < M ? xs[m1] : 0.f;
      acc[0] = d[0] * (wa * x0); acc[1] = d[1] * (wa * x1); acc[2] = d[2] * (wb * x0); acc[3] = d[3] * (wb * x1);
    }
  }
  if (il && blockIdx.x == 0 && threadIdx.x < M) xs_out[threadIdx.x] = ts;
  float ba = (bias && va) ? bias[ra] : 0.0f, bb = (bias && vb) ? bias[rb] : 0.0f;
  if (S > 1) {                         // fixed order: bias first, then slices s = 0..S-1
    extern __shared__ float red[];     // [S][4][32]
#pragma unroll
    for (int i = 0; i < 4; ++i) red[(warp * 4 + i) * 32 + lane] = acc[i];
    __syncthreads();
    if (warp != 0) return;
    float a4[4] = {ba, ba, bb, bb};
    for (int s = 0; s < S; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) a4[i] += red[(s * 4 + i) * 32 + lane];
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = a4[i];
    ba = bb = 0.0f;
  }
  if (il) {                            // rows ra (gate) and rb = ra + 8 (up) of feature (r0 / 16) * 8 + g
    int f = (r0 >> 4) * 8 + g;
    if (va && m0 < M) silu_quant_store(ba + acc[0], bb + acc[2], m0, f, il, ts, pqs, xq_out);
    if (va && m1 < M) silu_quant_store(ba + acc[1], bb + acc[3], m1, f, il, ts, pqs, xq_out);
    return;
  }
  store_frag(y, ldy, ra, rb, va, vb, m0, m1, M, acc, ba, bb);
}

// blocks of up to 16 warps (16 K slices); 512 threads leave the register cap at 128 (they use 94-100)
#define QT_MMA4_THREADS 512
#define QT_MMA_TILED_ARGS const u8* __restrict__ xq, const float* __restrict__ xs, int xs_group, \
  const u8* __restrict__ wq, const float* __restrict__ ws, const float* __restrict__ bias, float* __restrict__ y, \
  int ldy, int M, int O, int K, int sld, int sbo, int sbi_log2, int kslice, int il, \
  const float* __restrict__ in_scale, const float* __restrict__ pqs, u8* __restrict__ xq_out, \
  float* __restrict__ xs_out
#define QT_MMA_TILED_PASS xq, xs, xs_group, wq, ws, bias, y, ldy, M, O, K, sld, sbo, sbi_log2, kslice, il, in_scale, \
  pqs, xq_out, xs_out
extern "C" __global__ void __launch_bounds__(QT_MMA4_THREADS) gemv_mma4p(QT_MMA_TILED_ARGS) { gemv_mma_tiled<false>(QT_MMA_TILED_PASS); }
extern "C" __global__ void __launch_bounds__(QT_MMA4_THREADS) gemv_mma4ps(QT_MMA_TILED_ARGS) { gemv_mma_tiled<true>(QT_MMA_TILED_PASS); }

// gemm_tc<F, XC>: y = x̂ W^T (+ bias) for any M (prefill) on the tensor cores: mma.sync m16n8k16 bf16 with f32
// accumulation, to float32 accuracy. Tiles of 64 rows x 64 outputs x 32 k in shared memory as bf16 (rows padded to
// 40 elements: the 32-bit fragment loads are conflict-free), block 128 (4 warps of 32 x 32), grid
// (ceil(O/64), ceil(M/64)); each thread stages 16 consecutive elements of one A row and one W row per k-tile.
//   A: XC = 1 (fp8 activations on fp8 weights): x̂ as its e4m3 codes xq [M, K] (exact in bf16), scales xs per row
//      [M] or, with xs_group, per 128-k group [M, ceil(K/128)]; XC = 0: x̂ f32 [M, ldx] split into bf16 hi + lo
//      (x = hi + lo to 2^-17; one more mma per product).
//   W: fp8 (F = 1 row-major, F = 5 mma-tiled) as e4m3 codes (exact); bf16 and mxfp4 (e2m1 x 2^e) decode exactly to
//      bf16; nvfp4 and int4 decode (wload1, scales included) to f32, split hi + lo like x. The fp8 scale grid sc and
//      the activation scales are applied to the f32 partial sums of every KG-k group (see KG below).
// Error: products exact or split (dropped lo x lo terms, 2^-18 typical, 2^-16 at worst), f32 sums folded every
// 128 k: float32 level, like the f32 gemm.
// Needs K % 16 == 0 and 16-byte aligned rows; fp8 block scales with sbi % 32 == 0. Partial tiles are zero-filled.
#define TC_BM 64
#define TC_BN 64
#define TC_BK 32
#define TC_LD (TC_BK + 8)

QT_MMA_16X8(mma_bf16, "m16n8k16.row.col.f32.bf16.bf16.f32")

__device__ __forceinline__ unsigned bf16x2(float lo, float hi) {   // round to nearest even
  unsigned r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
// 16 f32 values -> bf16 rows hi (and, if lo, the rounding remainders v - hi, also as bf16)
__device__ __forceinline__ void stage16(const float v[16], unsigned short* hi, unsigned short* lo) {
  unsigned h[8], l[8];
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    h[q] = bf16x2(v[2 * q], v[2 * q + 1]);
    l[q] = bf16x2(v[2 * q] - __uint_as_float(h[q] << 16), v[2 * q + 1] - __uint_as_float(h[q] & 0xffff0000u));
  }
  *(uint4*)hi = make_uint4(h[0], h[1], h[2], h[3]);
  *(uint4*)(hi + 8) = make_uint4(h[4], h[5], h[6], h[7]);
  if (lo) {
    *(uint4*)lo = make_uint4(l[0], l[1], l[2], l[3]);
    *(uint4*)(lo + 8) = make_uint4(l[4], l[5], l[6], l[7]);
  }
}
__device__ __forceinline__ void codes16(uint4 c, float v[16]) {   // 16 e4m3 codes -> their values
  unsigned u[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] = e4m3_to_f32((u[i >> 2] >> (8 * (i & 3))) & 0xffu);
}
// the A (16 x 16, rows r, r + 8) and B (8 x 16, row n) fragments of k-step kk from padded bf16 tiles
__device__ __forceinline__ void frag_a(const unsigned short (*S)[TC_LD], int r, int kk, int t, unsigned a[4]) {
  a[0] = *(const unsigned*)&S[r][kk + 2 * t];
  a[1] = *(const unsigned*)&S[r + 8][kk + 2 * t];
  a[2] = *(const unsigned*)&S[r][kk + 2 * t + 8];
  a[3] = *(const unsigned*)&S[r + 8][kk + 2 * t + 8];
}
__device__ __forceinline__ void frag_b(const unsigned short (*S)[TC_LD], int n, int kk, int t, unsigned b[2]) {
  b[0] = *(const unsigned*)&S[n][kk + 2 * t];
  b[1] = *(const unsigned*)&S[n][kk + 2 * t + 8];
}

// f(i, j, e) for every accumulator element of a warp's 2 x 4 fragments of 4 (gemm_tc's acc / part layout)
template <class Fn>
__device__ __forceinline__ void each_acc(Fn f) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(i, j, e);
}

template <int F, int XC>
__global__ void __launch_bounds__(128, 3) gemm_tc(const float* __restrict__ x, int ldx, const u8* __restrict__ xq,
    const float* __restrict__ xs, int xs_group, const u8* __restrict__ w, const void* __restrict__ sc,
    const float* __restrict__ zp, float gs, float s2, const float* __restrict__ bias, float* __restrict__ y,
    int ldy, int M, int O, int K, int sld, int sbo, int sbi) {
  QT_PDL_ENTRY
  constexpr bool WC = F == FMT_FP8 || F == FMT_FP8T;       // weights as codes + scale grid
  constexpr bool SA = !XC;                                 // A split into hi + lo
  constexpr bool SB = F == FMT_NVFP4 || F == FMT_INT4;     // W split into hi + lo
  __shared__ __align__(16) unsigned short As[SA ? 2 : 1][TC_BM][TC_LD], Bs[SB ? 2 : 1][TC_BN][TC_LD];
  int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  int m0 = blockIdx.y * TC_BM, o0 = blockIdx.x * TC_BN;
  int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  // partial sums are folded into acc (f32, scaled) every KG k: 128, or gcd(sbi, 128) for fp8 weight blocks along
  // K (a multiple of 32 by ops._tc_ok), so a fold never spans two weight blocks or two per-128 activation groups,
  // and the tensor cores never accumulate more than 128 products (their f32 sums do not round to nearest: run
  // 10 measured 3.3e-5 at K = 14336 with one fold per K, 2.5e-6 folding every 128)
  int KG = 128;
  if (WC && sbi < K) { int a = sbi, b = 128; while (b) { int r = a % b; a = b; b = r; } KG = a; }
  int ng = (K + 127) / 128;
  float acc[2][4][4], part[2][4][4];
  // element e of fragment (i, j) of this warp's 32 x 32 tile sits at row frag_m(i, e), column frag_o(j, e)
  auto frag_m = [&](int i, int e) { return m0 + wm + 16 * i + g + (e >> 1) * 8; };
  auto frag_o = [&](int j, int e) { return o0 + wn + 8 * j + 2 * t + (e & 1); };
  each_acc([&](int i, int j, int e) { acc[i][j][e] = part[i][j][e] = 0.0f; });
  int lr = tid >> 1, lk = (tid & 1) * 16;                  // this thread's staging slot: row lr, k offset lk
  for (int k0 = 0; k0 < K; k0 += TC_BK) {
    float v[16];
    int k = k0 + lk;
    {  // A row m0 + lr
      int m = m0 + lr;
      bool in = m < M && k < K;
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = 0.0f;
      if (in && XC) codes16(*(const uint4*)(xq + (long long)m * K + k), v);
      if (in && !XC) {
        const float4* xp = (const float4*)(x + (long long)m * ldx + k);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float4 f = xp[q];
          v[4 * q] = f.x; v[4 * q + 1] = f.y; v[4 * q + 2] = f.z; v[4 * q + 3] = f.w;
        }
      }
      stage16(v, &As[0][lr][lk], SA ? &As[SA ? 1 : 0][lr][lk] : nullptr);
    }
    {  // W row o0 + lr
      int o = o0 + lr;
      bool in = o < O && k < K;
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = 0.0f;
      if (in && WC) codes16(*(const uint4*)(w + (F == FMT_FP8 ? (long long)o * K + k : tiled_fp8_offset(o, k, K))), v);
      if (in && !WC) {
#pragma unroll
        for (int i = 0; i < 16; ++i) v[i] = wload1<F>(w, sc, zp, gs, s2, K, sld, sbo, sbi, o, k + i);
      }
      stage16(v, &Bs[0][lr][lk], SB ? &Bs[SB ? 1 : 0][lr][lk] : nullptr);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TC_BK; kk += 16) {
      unsigned a[2][2][4], b[4][2][2];                     // [tile][hi, lo][fragment]
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        frag_a(As[0], wm + 16 * i + g, kk, t, a[i][0]);
        if (SA) frag_a(As[SA ? 1 : 0], wm + 16 * i + g, kk, t, a[i][1]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        frag_b(Bs[0], wn + 8 * j + g, kk, t, b[j][0]);
        if (SB) frag_b(Bs[SB ? 1 : 0], wn + 8 * j + g, kk, t, b[j][1]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          mma_bf16(part[i][j], a[i][0][0], a[i][0][1], a[i][0][2], a[i][0][3], b[j][0][0], b[j][0][1]);
          if (SA) mma_bf16(part[i][j], a[i][1][0], a[i][1][1], a[i][1][2], a[i][1][3], b[j][0][0], b[j][0][1]);
          if (SB) mma_bf16(part[i][j], a[i][0][0], a[i][0][1], a[i][0][2], a[i][0][3], b[j][1][0], b[j][1][1]);
        }
    }
    __syncthreads();
    int kn = k0 + TC_BK;
    if (kn >= K || kn % KG == 0) {   // the end of a scale group: fold its sums into acc with their scales
      int kg = (k0 / KG) * KG;       // first k of the group
      each_acc([&](int i, int j, int e) {
        float s = 1.0f;
        if (WC) {
          int o = min(frag_o(j, e), O - 1);
          s = ((const float*)sc)[(long long)(o / sbo) * sld + kg / sbi];
        }
        if (XC) {
          int m = min(frag_m(i, e), M - 1);
          s *= xs_group ? xs[(long long)m * ng + (kg >> 7)] : xs[m];
        }
        acc[i][j][e] += part[i][j][e] * s;
        part[i][j][e] = 0.0f;
      });
    }
  }
  each_acc([&](int i, int j, int e) {
    int m = frag_m(i, e), o = frag_o(j, e);
    if (m < M && o < O) y[(long long)m * ldy + o] = acc[i][j][e] + (bias ? bias[o] : 0.0f);
  });
}
#define QT_TC_ARGS const float*, int, const u8*, const float*, int, const u8*, const void*, const float*, float, float, \
  const float*, float*, int, int, int, int, int, int, int
template __global__ void gemm_tc<0, 0>(QT_TC_ARGS);
template __global__ void gemm_tc<1, 0>(QT_TC_ARGS);
template __global__ void gemm_tc<2, 0>(QT_TC_ARGS);
template __global__ void gemm_tc<3, 0>(QT_TC_ARGS);
template __global__ void gemm_tc<4, 0>(QT_TC_ARGS);
template __global__ void gemm_tc<5, 0>(QT_TC_ARGS);
template __global__ void gemm_tc<1, 1>(QT_TC_ARGS);
template __global__ void gemm_tc<5, 1>(QT_TC_ARGS);
