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
//   F=5 fp8 mma-tiled (gemm only): F=1 with the codes in ops.mma_tile_fp8's order (see gemv_mma4p), the layout
//              gemv_mma_bulk streams; prefill reads the same copy, so no row-major copy is kept
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
#include "bulk_copy.cuh"

#define FMT_BF16 0
#define FMT_FP8 1
#define FMT_NVFP4 2
#define FMT_MXFP4 3
#define FMT_INT4 4
#define FMT_FP8T 5

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ unsigned hsub2(unsigned a, unsigned b) {
  unsigned r; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r;
}

// byte offset of fp8 code (o, k) in the mma-tiled layout (ops.mma_tile_fp8; gemv_mma4p, gemv_mma_bulk, gemm<5>)
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
  if (F == FMT_FP8T)   // mma-tiled fp8 (gemv_mma4p / gemv_mma_bulk layout)
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


__device__ __forceinline__ unsigned hfma2(unsigned a, unsigned b, unsigned c) {
  unsigned r; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r;
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

// gemv_mma: FP8 weights x FP8 activations on the tensor cores (mma.sync m16n8k32 e4m3, f32 accumulate), the
// decode path of the fp8 / fp8-rowwise / fp8-block recipes. Exact products, f32 sums: matches x̂ @ W^T to f32
// rounding. wq e4m3 [O, K]; xq e4m3 codes [M, K] (M <= 8) and xs (per row [M], or per 128-group [M, K/128] when
// xs_group); weight scale grid ws as for gemv (sbo, sld, sbi_log2 = -1 for one scale per row). One warp = 16
// output rows x one K slice of kslice (multiple of 128; K % 64 == 0): lane (g, t) loads 16 B of rows g and g+8
// at k = 16 t (+64 per round) and 16 B of x row g at the same k; two mma steps per round (the k order inside a
// round is permuted identically for W and x, which a dot product allows). Writes part f32 [S, M, O] (scaled);
// gemv_mma_reduce sums the S slices and adds the bias. grid (ceil(O/64), S), block 128.
// d += A (16 x k, fragments a0..a3) x B (k x 8, b0, b1), f32 accumulators; SHAPE_TYPES names the mma.sync form
#define QT_MMA_16X8(NAME, SHAPE_TYPES)                                                                         \
  __device__ __forceinline__ void NAME(float d[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,        \
                                       unsigned b0, unsigned b1) {                                            \
    asm volatile("mma.sync.aligned." SHAPE_TYPES " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"    \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                            \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));                                    \
  }
QT_MMA_16X8(mma_e4m3, "m16n8k32.row.col.f32.e4m3.e4m3.f32")   // k 32; Hopper runs it as f16 conversions + HMMA
QT_MMA_16X8(mma_f16, "m16n8k16.row.col.f32.f16.f16.f32")

// the 4 accumulators of an mma fragment, rows (ra, rb) x columns (m0, m1), + a per-row offset, into p [M, ld]
__device__ __forceinline__ void store_frag(float* p, int ld, int ra, int rb, bool va, bool vb, int m0, int m1,
                                           int M, const float acc[4], float ba, float bb) {
  if (va && m0 < M) p[(long long)m0 * ld + ra] = ba + acc[0];
  if (va && m1 < M) p[(long long)m1 * ld + ra] = ba + acc[1];
  if (vb && m0 < M) p[(long long)m0 * ld + rb] = bb + acc[2];
  if (vb && m1 < M) p[(long long)m1 * ld + rb] = bb + acc[3];
}

extern "C" __global__ void __launch_bounds__(128) gemv_mma(const u8* __restrict__ xq, const float* __restrict__ xs,
    int xs_group, const u8* __restrict__ wq, const float* __restrict__ ws, float* __restrict__ part, int M, int O,
    int K, int sld, int sbo, int sbi_log2, int kslice) {
  QT_PDL_ENTRY
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int g = lane >> 2, t = lane & 3;
  int r0 = (blockIdx.x * 4 + warp) * 16;
  if (r0 >= O) return;
  int k0 = blockIdx.y * kslice, k1 = min(K, k0 + kslice);
  int ra = r0 + g, rb = r0 + g + 8;
  bool va = ra < O, vb = rb < O, vx = g < M;
  const u8* pa = wq + (long long)(va ? ra : 0) * K;
  const u8* pb = wq + (long long)(vb ? rb : 0) * K;
  const u8* px = xq + (long long)(vx ? g : 0) * K;
  int m0 = 2 * t, m1 = 2 * t + 1;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // rows (ra, m0), (ra, m1), (rb, m0), (rb, m1)
  int blk = sbi_log2 < 0 ? K : 128;
  for (int kb0 = k0; kb0 < k1; kb0 += blk) {
    int kb1 = min(k1, kb0 + blk);
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    for (int kb = kb0; kb < kb1; kb += 128) {  // two rounds of 64 per iteration, loads first
      uint4 A[2], B[2], X[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        int k = kb + 64 * u + 16 * t;
        bool in = k < kb1;
        uint4 z = make_uint4(0, 0, 0, 0);
        A[u] = (va && in) ? ld_stream((const uint4*)(pa + k)) : z;
        B[u] = (vb && in) ? ld_stream((const uint4*)(pb + k)) : z;
        X[u] = (vx && in) ? *(const uint4*)(px + k) : z;
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        mma_e4m3(d, A[u].x, B[u].x, A[u].y, B[u].y, X[u].x, X[u].y);
        mma_e4m3(d, A[u].z, B[u].z, A[u].w, B[u].w, X[u].z, X[u].w);
      }
    }
    // scale this block's sums: weight scale (per row or per 128x128 block) x activation scale
    float wa, wb;
    if (sbi_log2 < 0) { wa = ws[(long long)((va ? ra : 0) / sbo) * sld]; wb = ws[(long long)((vb ? rb : 0) / sbo) * sld]; }
    else {
      int kbi = kb0 >> sbi_log2;
      wa = ws[(long long)((va ? ra : 0) / sbo) * sld + kbi]; wb = ws[(long long)((vb ? rb : 0) / sbo) * sld + kbi];
    }
    float x0, x1;
    if (xs_group) {
      int gi = kb0 >> 7, ng = (K + 127) / 128;
      x0 = m0 < M ? xs[(long long)m0 * ng + gi] : 0.f; x1 = m1 < M ? xs[(long long)m1 * ng + gi] : 0.f;
    } else {
      x0 = m0 < M ? xs[m0] : 0.f; x1 = m1 < M ? xs[m1] : 0.f;
    }
    acc[0] += d[0] * (wa * x0); acc[1] += d[1] * (wa * x1); acc[2] += d[2] * (wb * x0); acc[3] += d[3] * (wb * x1);
  }
  store_frag(part + (long long)blockIdx.y * M * O, O, ra, rb, va, vb, m0, m1, M, acc, 0.0f, 0.0f);
}

extern "C" __global__ void gemv_mma_reduce(const float* __restrict__ part, int S, const float* __restrict__ bias,
                                           float* __restrict__ y, int ldy, int M, int O) {
  QT_PDL_ENTRY
  int o = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
  if (o >= O) return;
  float a = bias ? bias[o] : 0.0f;
  for (int s = 0; s < S; ++s) a += part[((long long)s * M + m) * O + o];
  y[(long long)m * ldy + o] = a;
}

// gemv_mma4 (v4): the gemv_mma computation (same fragments, same k permutation, same operands and scales) with
// more bytes in flight and no reduce launch. Each lane issues U = 4 rounds of 64 k (12 16-B loads) before its 8
// mma steps; the k loop walks 256 k per step. gemv_mma8: U = 8 (512 k per step; kslice a multiple of 512), an
// experiment timed by bench_decode.py --gemv only. Scales: per-row weight scale with per-row activation scale ->
// one multiply at the end of the slice; per-128 weight blocks (sbi_log2 = 7) and/or per-128 activation groups
// (xs_group) -> one multiply per 128-k half. S = gridDim.y K slices of kslice (multiple of 256, K % 64 == 0).
// S == 1: y = acc + bias written directly. S > 1: each block writes its slice into part f32 [S, M, O], then
// takes a ticket on cnt[blockIdx.x] (u32, zero before the launch); the block that draws S - 1 sums the S slices
// of its 64 rows in slice order (deterministic: bias first, then s = 0..S-1, as gemv_mma_reduce), writes y and
// resets its counter to zero (so the next launch, and every CUDA graph replay, finds zeros). Block = W warps of
// 16 rows each (W = blockDim.x / 32; ops uses W = 1: one-warp blocks spread evenly over the SMs), grid
// (ceil(O / (16 W)), S); the ticket counter is per block.
// inb = 1 (v11, the default): no ticket, no part. Block = S warps, warp s computing K slice s of the 16-row tile
// blockIdx.x (grid (ceil(O / 16), 1), dynamic shared memory S * 512 B); the warps' fragments meet in shared
// memory and warp 0 sums them in the ticket's order (bias first, then s = 0..S-1: the same bits) and writes y
// (or the il epilogue). One block barrier instead of a fence, an atomic and an L2 round trip on the tail.
// il > 0 (gate|up fused with silu, O = 2 il, il % 8 == 0, S any): the weight rows are interleaved in groups of
// 8 (row 16 j + i = gate row 8 j + i, row 16 j + 8 + i = up row 8 j + i, bias the same), so a lane holds the
// gate and up sums of the same feature; instead of y the kernel writes the down projection's fp8 input
// xq_out[m, f] = e4m3(silu_mul1(gate, up) (* pqs[f]) / in_scale[0]) (act_quant scheme 1: the bits of
// silu_mul_quant on y) and xs_out[m] = in_scale[0] (block 0); y is not touched.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" :: "l"(p)); }

__device__ __forceinline__ void silu_quant_store(float g, float u, int m, int f, int I, float ts,
                                                 const float* __restrict__ pqs, u8* __restrict__ xq) {
  float v = silu_mul1(g, u);
  if (pqs) v *= pqs[f];
  xq[(long long)m * I + f] = (u8)f32_to_e4m3(v / ts);
}

template <int U, bool P, bool IL>
__device__ __forceinline__ void gemv_mma_deep(const u8* __restrict__ xq, const float* __restrict__ xs,
    int xs_group, const u8* __restrict__ wq, const float* __restrict__ ws, const float* __restrict__ bias,
    float* __restrict__ part, unsigned* __restrict__ cnt, float* __restrict__ y, int ldy, int M, int O, int K,
    int sld, int sbo, int sbi_log2, int kslice, int il, const float* __restrict__ in_scale,
    const float* __restrict__ pqs, u8* __restrict__ xq_out, float* __restrict__ xs_out, int inb) {
  __shared__ unsigned is_last;
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  int g = lane >> 2, t = lane & 3;
  // inb (v11): the block's warps are the S K slices of one 16-row tile (grid y = 1), summed through shared memory
  int r0 = inb ? blockIdx.x * 16 : (blockIdx.x * wpb + warp) * 16;
  int S = inb ? wpb : gridDim.y;
  int k0 = (inb ? warp : blockIdx.y) * kslice, k1 = min(K, k0 + kslice);
  int ra = r0 + g, rb = r0 + g + 8;
  bool va = ra < O, vb = rb < O, vx = g < M;
  // P (mma-tiled weights, see mma_tile_offset): lane's 16 B of row ra at k lie at tw + (k/64)*1024, row rb's
  // 512 B further; else row-major rows pa, pb
  const u8* pa = wq + (long long)(va ? ra : 0) * K;
  const u8* pb = wq + (long long)(vb ? rb : 0) * K;
  const u8* tw = wq + (long long)(r0 >> 4) * (K >> 6) * 1024 + lane * 16;
  const u8* px = xq + (long long)(vx ? g : 0) * K;
  int m0 = 2 * t, m1 = 2 * t + 1;
  const float* wsa = ws + (long long)((va ? ra : 0) / sbo) * sld;
  const float* wsb = ws + (long long)((vb ? rb : 0) / sbo) * sld;
  int ng = (K + 127) / 128;
  bool grouped = sbi_log2 >= 0 || xs_group;
  // PDL: this warp's weights for its first two k steps go to L2 before waiting for the previous kernel (the
  // weights are constant; x̂, the scales' consumers, part, cnt and y are only touched after pdl_wait)
  if (P && r0 < O) {            // the warp's 2U KB are contiguous: 2U*8 lines of 128 B
    const u8* base = wq + ((long long)(r0 >> 4) * (K >> 6) + (k0 >> 6)) * 1024;
    long long end = (long long)((k1 - k0 + 63) >> 6) * 1024;
#pragma unroll
    for (int j = 0; j < U / 2; ++j) {
      int off = j * 4096 + lane * 128;
      if (off < end) prefetch_l2(base + off);
    }
  } else if (r0 < O && t == 0) {
#pragma unroll
    for (int j = 0; j < U; ++j) {
      int k = k0 + 128 * j;
      if (k < k1) { if (va) prefetch_l2(pa + k); if (vb) prefetch_l2(pb + k); }
    }
  }
  if (!IL) il = 0;
  float ts = il ? in_scale[0] : 1.0f;   // a constant: read before the wait
  QT_STAMP(IL ? 3 : 0);
  QT_PDL_ENTRY
  QT_STAMP(IL ? 4 : 1);
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
        const u8* wa = P ? tw + (long long)(k >> 6) * 1024 : pa + k;
        const u8* wb = P ? wa + 512 : pb + k;
        A[u] = (va && in) ? ld_stream((const uint4*)wa) : z;
        B[u] = (vb && in) ? ld_stream((const uint4*)wb) : z;
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
  QT_STAMP(IL ? 5 : 2);
  if (il && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x < M) xs_out[threadIdx.x] = ts;
  bool summed = false;                 // acc already holds bias + the S slices (inb)
  if (inb && S > 1) {                  // the ticket's order: bias first, then slices s = 0..S-1 (same bits)
    extern __shared__ float red[];     // [S][4][32]
#pragma unroll
    for (int i = 0; i < 4; ++i) red[(warp * 4 + i) * 32 + lane] = acc[i];
    __syncthreads();
    if (warp != 0) return;
    float ba = (bias && va) ? bias[ra] : 0.0f, bb = (bias && vb) ? bias[rb] : 0.0f;
    float a4[4] = {ba, ba, bb, bb};
    for (int s = 0; s < S; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) a4[i] += red[(s * 4 + i) * 32 + lane];
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = a4[i];
    summed = true;
  }
  if (S == 1 || summed) {
    float ba = (bias && va && !summed) ? bias[ra] : 0.0f, bb = (bias && vb && !summed) ? bias[rb] : 0.0f;
    if (il) {                        // rows ra (gate) and rb = ra + 8 (up) of feature (r0 / 16) * 8 + g
      int f = (r0 >> 4) * 8 + g;
      if (va && m0 < M) silu_quant_store(ba + acc[0], bb + acc[2], m0, f, il, ts, pqs, xq_out);
      if (va && m1 < M) silu_quant_store(ba + acc[1], bb + acc[3], m1, f, il, ts, pqs, xq_out);
      return;
    }
    store_frag(y, ldy, ra, rb, va, vb, m0, m1, M, acc, ba, bb);
    return;
  }
  store_frag(part + (long long)blockIdx.y * M * O, O, ra, rb, va, vb, m0, m1, M, acc, 0.0f, 0.0f);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&cnt[blockIdx.x], 1u) == (unsigned)(S - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  int rows = 16 * wpb, o0 = blockIdx.x * rows;
  if (il) {                          // feature pairs (gate o, up o + 8) of this block's tiles, sums as below
    for (int i = threadIdx.x; i < rows / 2 * M; i += blockDim.x) {
      int m = i / (rows / 2), j = i % (rows / 2), og = o0 + 16 * (j >> 3) + (j & 7), ou = og + 8;
      if (og >= O) continue;
      float a = bias ? bias[og] : 0.0f, b = bias ? bias[ou] : 0.0f;
      for (int s = 0; s < S; ++s) {
        a += ld_cg(part + ((long long)s * M + m) * O + og);
        b += ld_cg(part + ((long long)s * M + m) * O + ou);
      }
      silu_quant_store(a, b, m, (og >> 4) * 8 + (og & 7), il, ts, pqs, xq_out);
    }
    if (threadIdx.x == 0) cnt[blockIdx.x] = 0u;
    return;
  }
  for (int i = threadIdx.x; i < rows * M; i += blockDim.x) {
    int m = i / rows, o = o0 + i % rows;
    if (o >= O) continue;
    float a = bias ? bias[o] : 0.0f;
    for (int s = 0; s < S; ++s) a += ld_cg(part + ((long long)s * M + m) * O + o);
    y[(long long)m * ldy + o] = a;
  }
  if (threadIdx.x == 0) cnt[blockIdx.x] = 0u;
}

// gemv_mma4 / 4s / 4p: blocks of up to 16 warps (inb: 16 K slices); 512 threads leave the register cap at 128
// (they use 94-100). gemv_mma8 (~158 registers) keeps 128 threads: inb with at most 4 slices.
#define QT_MMA4_THREADS 512
#define QT_MMA_DEEP_ARGS const u8* __restrict__ xq, const float* __restrict__ xs, int xs_group, \
  const u8* __restrict__ wq, const float* __restrict__ ws, const float* __restrict__ bias, float* __restrict__ part, \
  unsigned* __restrict__ cnt, float* __restrict__ y, int ldy, int M, int O, int K, int sld, int sbo, int sbi_log2, \
  int kslice, int il, const float* __restrict__ in_scale, const float* __restrict__ pqs, \
  u8* __restrict__ xq_out, float* __restrict__ xs_out, int inb
#define QT_MMA_DEEP_PASS xq, xs, xs_group, wq, ws, bias, part, cnt, y, ldy, M, O, K, sld, sbo, sbi_log2, kslice, il, \
  in_scale, pqs, xq_out, xs_out, inb
extern "C" __global__ void __launch_bounds__(QT_MMA4_THREADS) gemv_mma4(QT_MMA_DEEP_ARGS) { gemv_mma_deep<4, false, false>(QT_MMA_DEEP_PASS); }
extern "C" __global__ void __launch_bounds__(128) gemv_mma8(QT_MMA_DEEP_ARGS) { gemv_mma_deep<8, false, false>(QT_MMA_DEEP_PASS); }
// gemv_mma4s: gemv_mma4 with the il (gate|up + silu + fp8 quantization) epilogue (il > 0 required)
extern "C" __global__ void __launch_bounds__(QT_MMA4_THREADS) gemv_mma4s(QT_MMA_DEEP_ARGS) { gemv_mma_deep<4, false, true>(QT_MMA_DEEP_PASS); }
// gemv_mma4p: gemv_mma4 on mma-tiled fp8 weights (ops.mma_tile_fp8): O padded to 16 rows, K % 64 == 0; byte
// (o, k) at ((o/16 * K/64 + k/64) * 2 + (o%16)/8) * 512 + ((o%8) * 4 + (k%64)/16) * 16 + k%16, so each warp's
// 16-B loads of one round read 512 contiguous bytes (row-major: 16 rows x 64 B) and a warp streams one
// contiguous range. Timed by bench_decode.py --gemv ("mma4 tiled"); the decode path on tiled weights (v13).
extern "C" __global__ void __launch_bounds__(QT_MMA4_THREADS) gemv_mma4p(QT_MMA_DEEP_ARGS) { gemv_mma_deep<4, true, false>(QT_MMA_DEEP_PASS); }
// gemv_mma4ps (v13): gemv_mma4s on mma-tiled weights (interleaved gate|up rows, then tiled)
extern "C" __global__ void __launch_bounds__(QT_MMA4_THREADS) gemv_mma4ps(QT_MMA_DEEP_ARGS) { gemv_mma_deep<4, true, true>(QT_MMA_DEEP_PASS); }

// gemv_mma_bulk<XH> (v8): FP8 x FP8 decode GEMV (exact products, f32 sums, the scales of gemv_mma) on mma-tiled
// fp8 weights (ops.mma_tile_fp8, the gemv_mma4p layout: a 16-row tile is K * 16 contiguous bytes), streamed by
// the bulk-copy engine into a ring of shared-memory stages instead of register loads. Persistent: grid G <= number
// of SMs, block 256 (8 warps), one block per SM (dynamic shared memory, fp8_bulk.plan). Block c owns the whole
// tiles [c T / G, (c+1) T / G) of the T = ceil(O / 16) tiles, i.e. one contiguous byte range of wt, and no K split
// (no partial sums, no reduce, no counters). Its range is cut into chunks of at most BULK_SB k-blocks (64 k x 16
// rows = 1 KB) that never straddle a tile; thread 0 keeps `nstages` (<= 16) chunks in flight (ring slot
// c % nstages, one mbarrier each), the first ones issued before pdl_wait, so a launch streams weights while the
// previous kernel finishes (wt must not be written by the kernel launched just before: weights are laid out
// once at load time). x̂ codes [M, K] (M <= 8) are staged in shared memory once:
// XH = 1 as f16 (exact for e4m3 values; rows 2K + 16 bytes apart), so the loop converts only weights (cvt
// e4m3x2 -> f16x2) and runs m16n8k16 f16 mma; XH = 0 as e4m3 codes (rows K + 16 apart) with the m16n8k32 e4m3 mma
// (which Hopper itself runs as conversions + f16 mma). In each chunk warp w takes the 128-k units w, w + 8, ...;
// per 64 k, lane (g, t) holds 16 B of rows g and g + 8 (at l * 16 and 512 + l * 16 of the 1 KB k-block) and the
// x̂ values of column g at the same k (any k order is fine for a dot product, as long as A and B share it).
// Scales: per-row weight x per-row activation once per tile; 128x128 weight blocks and/or per-128 activation
// groups once per unit. At a tile's last chunk the 8 warps' fragments are summed in warp order (deterministic)
// and y = bias + sum is written. Needs K % 64 == 0, sm_90+.
#define BULK_WARPS 8
#define BULK_SB 16

__device__ __forceinline__ void bulk_issue(int c, int tile0, int spt, int KB, const u8* __restrict__ wt,
                                           unsigned ring0, unsigned bar0, int nstages) {
  // one copy per chunk (run 13: 4 or 16 smaller copies per chunk ran at 0.84x / 0.48x)
  int slot = c % nstages, tile = tile0 + c / spt, kb0 = (c % spt) * BULK_SB;
  unsigned bytes = (unsigned)min(BULK_SB, KB - kb0) * 1024u;
  unsigned bar = bar0 + 8u * slot;
  mbar_expect_tx(bar, bytes);
  bulk_g2s(ring0 + (unsigned)slot * (BULK_SB * 1024u), wt + ((long long)tile * KB + kb0) * 1024, bytes, bar);
}

__device__ __forceinline__ unsigned e4m3x2_to_h2(unsigned v) {  // bytes 0, 1 of v -> f16x2 (exact)
  unsigned r;
  asm("{ .reg .b16 lo; cvt.u16.u32 lo, %1; cvt.rn.f16x2.e4m3x2 %0, lo; }" : "=r"(r) : "r"(v));
  return r;
}

// e += the 64-k block at st (lane's 16 B of rows g, g + 8) times x̂ at xp (XH: 16 f16, else 16 e4m3 codes)
template <int XH>
__device__ __forceinline__ void bulk_kblock(float e[4], const u8* st, const u8* xp, bool vx) {
  uint4 A = *(const uint4*)st, B = *(const uint4*)(st + 512);
  if (XH) {
    uint4 X0 = vx ? *(const uint4*)xp : make_uint4(0, 0, 0, 0);
    uint4 X1 = vx ? *(const uint4*)(xp + 16) : make_uint4(0, 0, 0, 0);
    unsigned a[4] = {A.x, A.y, A.z, A.w}, b[4] = {B.x, B.y, B.z, B.w};
    unsigned x[8] = {X0.x, X0.y, X0.z, X0.w, X1.x, X1.y, X1.z, X1.w};
    float f[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};   // two independent mma chains
#pragma unroll
    for (int j = 0; j < 4; ++j)   // k 4j .. 4j + 3 of the lane's 16: slots (2t, 2t+1) and (2t+8, 2t+9)
      mma_f16(f[j & 1], e4m3x2_to_h2(a[j]), e4m3x2_to_h2(b[j]), e4m3x2_to_h2(a[j] >> 16), e4m3x2_to_h2(b[j] >> 16),
              x[2 * j], x[2 * j + 1]);
#pragma unroll
    for (int i = 0; i < 4; ++i) e[i] += f[0][i] + f[1][i];
  } else {
    uint4 X = vx ? *(const uint4*)xp : make_uint4(0, 0, 0, 0);
    mma_e4m3(e, A.x, B.x, A.y, B.y, X.x, X.y);
    mma_e4m3(e, A.z, B.z, A.w, B.w, X.z, X.w);
  }
}

template <int XH>
__global__ void __launch_bounds__(32 * BULK_WARPS, 1) gemv_mma_bulk(const u8* __restrict__ xq, const float* __restrict__ xs,
    int xs_group, const u8* __restrict__ wt, const float* __restrict__ ws, const float* __restrict__ bias,
    float* __restrict__ y, int ldy, int M, int O, int K, int sld, int sbo, int sbi_log2, int nstages) {
  extern __shared__ __align__(128) u8 bulk_smem[];
  constexpr int XB = XH ? 2 : 1;                            // bytes per staged x̂ element
  u8* ring = bulk_smem + 128;                               // [0, 128): nstages mbarriers
  u8* xsm = ring + nstages * (BULK_SB * 1024);
  int xld = XB * K + 16;
  float4* red = (float4*)(xsm + ((M * xld + 127) & ~127));  // [BULK_WARPS][32] fragments
  int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  int T = (O + 15) >> 4, KB = K >> 6, spt = (KB + BULK_SB - 1) / BULK_SB;
  int tile0 = (int)((long long)blockIdx.x * T / gridDim.x);
  int nc = ((int)((long long)(blockIdx.x + 1) * T / gridDim.x) - tile0) * spt;
  unsigned bar0 = smem_u32(bulk_smem), ring0 = smem_u32(ring);
  if (tid == 0) {
    for (int s = 0; s < nstages; ++s) mbar_init(bar0 + 8u * s, 1u);
    mbar_fence_init();
  }
  __syncthreads();
  if (tid == 0)
    for (int c = 0; c < min(nstages, nc); ++c) bulk_issue(c, tile0, spt, KB, wt, ring0, bar0, nstages);
  QT_PDL_ENTRY
  for (int i = tid; i < M * (K >> 4); i += blockDim.x) {   // 16 codes per step
    int m = i / (K >> 4), q = i - m * (K >> 4);
    uint4 v = *(const uint4*)(xq + (long long)m * K + 16 * q);
    uint4* dst = (uint4*)(xsm + m * xld + 16 * XB * q);
    if (XH) {
      unsigned c[4] = {v.x, v.y, v.z, v.w}, h[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) { h[2 * j] = e4m3x2_to_h2(c[j]); h[2 * j + 1] = e4m3x2_to_h2(c[j] >> 16); }
      dst[0] = make_uint4(h[0], h[1], h[2], h[3]);
      dst[1] = make_uint4(h[4], h[5], h[6], h[7]);
    } else {
      dst[0] = v;
    }
  }
  __syncthreads();
  bool vx = g < M, grouped = sbi_log2 >= 0 || xs_group;
  int m0 = 2 * t, m1 = 2 * t + 1, ng = (K + 127) / 128;
  const u8* xrow = xsm + (vx ? g : 0) * xld + 16 * XB * t;  // + 64 XB per k-block
  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // rows (ra, m0), (ra, m1), (rb, m0), (rb, m1) of the current tile
  for (int c = 0; c < nc; ++c) {
    int slot = c % nstages, tile = tile0 + c / spt, j = c % spt, kb0 = j * BULK_SB;
    int nkb = min(BULK_SB, KB - kb0);
    int ra = tile * 16 + g, rb = ra + 8;
    bool va = ra < O, vb = rb < O;
    const float* wsa = ws + (long long)((va ? ra : 0) / sbo) * sld;
    const float* wsb = ws + (long long)((vb ? rb : 0) / sbo) * sld;
    mbar_wait(bar0 + 8u * slot, (unsigned)(c / nstages) & 1u);
    const u8* st = ring + slot * (BULK_SB * 1024) + lane * 16;
    for (int u = warp; 2 * u < nkb; u += BULK_WARPS) {
      float e[4] = {0.f, 0.f, 0.f, 0.f}, e1[4] = {0.f, 0.f, 0.f, 0.f};   // the unit's two k-blocks, independent
      bulk_kblock<XH>(e, st + 2 * u * 1024, xrow + (kb0 + 2 * u) * 64 * XB, vx);
      if (2 * u + 1 < nkb) bulk_kblock<XH>(e1, st + (2 * u + 1) * 1024, xrow + (kb0 + 2 * u + 1) * 64 * XB, vx);
#pragma unroll
      for (int i = 0; i < 4; ++i) e[i] += e1[i];
      if (grouped) {
        int kh = (kb0 + 2 * u) * 64;
        int kbi = sbi_log2 >= 0 ? (kh >> sbi_log2) : 0;
        float wa = wsa[kbi], wb = wsb[kbi], x0, x1;
        if (xs_group) {
          x0 = m0 < M ? xs[(long long)m0 * ng + (kh >> 7)] : 0.f; x1 = m1 < M ? xs[(long long)m1 * ng + (kh >> 7)] : 0.f;
        } else {
          x0 = m0 < M ? xs[m0] : 0.f; x1 = m1 < M ? xs[m1] : 0.f;
        }
        acc[0] += e[0] * (wa * x0); acc[1] += e[1] * (wa * x1); acc[2] += e[2] * (wb * x0); acc[3] += e[3] * (wb * x1);
      } else {
        acc[0] += e[0]; acc[1] += e[1]; acc[2] += e[2]; acc[3] += e[3];
      }
    }
    if (j == spt - 1) {   // the tile's last chunk: scale, sum the warps' fragments, write y
      if (!grouped) {
        float wa = wsa[0], wb = wsb[0], x0 = m0 < M ? xs[m0] : 0.f, x1 = m1 < M ? xs[m1] : 0.f;
        acc[0] *= wa * x0; acc[1] *= wa * x1; acc[2] *= wb * x0; acc[3] *= wb * x1;
      }
      red[warp * 32 + lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      __syncthreads();
      if (warp == 0) {
        float4 s = red[lane];
#pragma unroll
        for (int w = 1; w < BULK_WARPS; ++w) {
          float4 p = red[w * 32 + lane];
          s.x += p.x; s.y += p.y; s.z += p.z; s.w += p.w;
        }
        float sum[4] = {s.x, s.y, s.z, s.w};
        store_frag(y, ldy, ra, rb, va, vb, m0, m1, M, sum, (bias && va) ? bias[ra] : 0.0f,
                   (bias && vb) ? bias[rb] : 0.0f);
      }
      acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
    }
    __syncthreads();      // every warp is done with this slot (and with red)
    if (tid == 0 && c + nstages < nc) {
      fence_proxy_async_smem();
      bulk_issue(c + nstages, tile0, spt, KB, wt, ring0, bar0, nstages);
    }
  }
}
#define QT_BULK_ARGS const u8*, const float*, int, const u8*, const float*, const float*, float*, int, int, int, int, \
  int, int, int, int
template __global__ void gemv_mma_bulk<0>(QT_BULK_ARGS);
template __global__ void gemv_mma_bulk<1>(QT_BULK_ARGS);

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
