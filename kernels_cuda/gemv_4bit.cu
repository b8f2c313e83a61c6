// gemv_4bit.cu — decode GEMV (M <= 8 rows) for 4-bit weights on the tensor cores: nvfp4, mxfp4 and int4 (ModelOpt
// AWQ, GPTQ, AutoAWQ as prepared by qtool/kernels/weights.py), mma.sync m16n8k16 f16 with f32 accumulation. The codes
// are repacked once at load time (qtool/kernels/gemv_4bit.py, tile_codes) so that one 16-byte load per lane holds
// the A-fragment codes of 4 mma steps for two rows; the scales stay in weights.py's row-major arrays.
//
// Layout (q4 tiles): O padded to 16 rows (zero codes); the 16-row tile T is K/64 rounds of 512 B, round r covering
// k = 64 r .. 64 r + 63 as 4 mma steps s (k 64 r + 16 s .. + 15: one 16-element block, so any scale group that is a
// multiple of 16 long holds whole steps). Lane l = 4 g + t holds 16 B = words j = 0..3: row 16 T + g + 8 (j & 1),
// steps 2 (j >> 1) and 2 (j >> 1) + 1. Nibble n of word j is the code of step 2 (j >> 1) + ((n & 3) >> 1) at x slot
// i = 2 ((n & 3) & 1) + (n >> 2), and slot i of lane t in step s is the element k = 64 r + 16 s + 8 (t >> 1) +
// P[4 (t & 1) + i], P = [0, 4, 1, 5, 2, 6, 3, 7]: act_quant's f16 pair order for 4-bit weights, so the 8 bytes of xh
// at 64 r + 16 s + 4 t are the lane's B fragment (b0 = slots 0, 1; b1 = slots 2, 3) as they lie. e2m1x8_to_h2 /
// int4x8_to_h2 of word j give the pairs (nibble n, nibble n + 4): a0, a2 of the first step, then of the second
// (int4 words hold nibble n at bits 4n..4n+3; e2m1 words permute each code's bits, see e2m1x8_to_h2).
//
// Values: e2m1 codes decode exactly to E2M1 * 2^-14 in f16, int4 codes to the integer u - z (int4x8_to_h2, Marlin's
// magic-number decode). x is act_quant's f16 copy in that pair order: x̂ * 2^k per row (hs = 2^-k) for weight-only
// recipes; for nvfp4 activations (hperm 3) E2M1 times its e4m3 block scale (exact, hs = g); for mxfp4 ones (XS = 1)
// the exact E2M1 values with the f32 block scales xsc [M, K / 32]. The tensor cores sum a scale period of PA steps
// (PA * 16 k: mxfp4 2, int4 min(group / 16, 8), nvfp4 the iteration's 16) in f32; each period's sums are scaled in
// f32 by the weight scale of its rows (mxfp4 2^(e - 127), int4 the group scale) times, with XS, the x block scale
// of its columns, and added up. nvfp4 weights carry their e4m3 block scale already: E2M1 * 2^-14 * scale is exact in
// f16 (a multiple of 2^-24 with at most 6 significant bits), so the decoded pairs are multiplied by it (hmul2)
// before the mma. At the end: times gs * 2^14 (fp4), times hs of the column, plus the bias. Every product is exact;
// error: x rounded to f16 (weight-only recipes, 2^-12 relative) and the f32 sums.
//
// gemv_q4<F, PA, XS>: F = 2 nvfp4 (sc e4m3 u8 [O, K/16], global scale gs), 3 mxfp4 (sc E8M0 u8 [O, K/32]), 4 int4
// (sc f32 [O, sld], zp f32 [O, sld], group 2^glog2 along K, glog2 >= 5; a per-row scale: sld = 1 and glog2 = 30).
// In-block K split as linear.cu's gemv_mma4 (inb): grid ceil(O / 16), block S warps, warp w computing k in
// [w kslice, (w + 1) kslice) (kslice a multiple of 256) of the block's 16-row tile; the warps' fragments meet in
// shared memory (S * 512 B) and warp 0 sums them in warp order (deterministic) and writes y [M, ldy]. Each lane keeps
// U = 4 rounds of loads in flight (weights streamed past L1, x through L1). Needs K % 64 == 0, M <= 8.
#include "common.cuh"
#include "mma_frag.cuh"

#define Q4_NVFP4 2
#define Q4_MXFP4 3
#define Q4_INT4 4

// a * (b.lo, b.lo) / a * (b.hi, b.hi) in f16x2 (ptxas folds the half broadcast into the multiply's operand)
__device__ __forceinline__ unsigned hmul2_lo(unsigned a, unsigned b) {
  unsigned r;
  asm("{ .reg .f16 l, h; .reg .b32 d; mov.b32 {l, h}, %2; mov.b32 d, {l, l}; mul.rn.f16x2 %0, %1, d; }"
      : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ unsigned hmul2_hi(unsigned a, unsigned b) {
  unsigned r;
  asm("{ .reg .f16 l, h; .reg .b32 d; mov.b32 {l, h}, %2; mov.b32 d, {h, h}; mul.rn.f16x2 %0, %1, d; }"
      : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ unsigned h2_of(float v) {    // f16x2 (v, v)
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return ((unsigned)h << 16) | h;
}
// 8 e2m1 codes in tile_codes' fp4 bit layout -> the f16 pairs h[j] = E2M1 * 2^-14 (exact) of pair j: magnitude bits
// at 0-2 / sign at 6 of each 16-bit half (pair 0), 3-5 / 9 (pair 1), 10-12 / 7 (pair 2), 13-15 / 8 (pair 3), moved
// to the f16 mantissa top / low exponent bits 9-11 and the sign bit 15: 12 operations for 8 codes
__device__ __forceinline__ void e2m1x8_to_h2(unsigned w, unsigned h[4]) {
  constexpr unsigned EM = 0x0e000e00u, SG = 0x80008000u;
  h[0] = (w << 9) & (EM | SG);
  h[1] = (w << 6) & (EM | SG);
  h[2] = ((w >> 1) & EM) | ((w << 8) & SG);
  h[3] = ((w >> 4) & EM) | ((w << 7) & SG);
}
template <unsigned B, unsigned C>
__device__ __forceinline__ unsigned and_or(unsigned a) {   // (a & B) | C in one lop3
  unsigned r;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(r) : "r"(a), "n"(B), "n"(C), "n"((0xf0 & 0xcc) | 0xaa));
  return r;
}
// 8 unsigned int4 codes -> the f16 pairs (n, n + 4), n = 0..3, of u - z (exact): 1024 + u from the low nibble of each
// byte, 1024 + 16 u from the high one (Marlin's magic number: one lop3 per pair, one shift per word), then minus
// 1024 + z (zlo = f16x2 (1024 + z)) or times 1/16 minus 64 + z (zhi = f16x2 (-64 - z))
__device__ __forceinline__ void int4x8_to_h2(unsigned w, unsigned zlo, unsigned zhi, unsigned h[4]) {
  constexpr unsigned LO = 0x000f000fu, HI = 0x00f000f0u, MAGIC = 0x64006400u, SIXTEENTH = 0x2c002c00u;
  unsigned w8 = w >> 8;
  h[0] = hsub2(and_or<LO, MAGIC>(w), zlo);
  h[1] = hfma2(and_or<HI, MAGIC>(w), SIXTEENTH, zhi);
  h[2] = hsub2(and_or<LO, MAGIC>(w8), zlo);
  h[3] = hfma2(and_or<HI, MAGIC>(w8), SIXTEENTH, zhi);
}
__device__ __forceinline__ float f4c(float4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

template <int F, int PA, int XS>
__global__ void __launch_bounds__(512) gemv_q4(const unsigned short* __restrict__ xh, const float* __restrict__ hs,
    const float* __restrict__ xsc, const u8* __restrict__ wt, const void* __restrict__ sc,
    const float* __restrict__ zp, float gs, int sld, int glog2, const float* __restrict__ bias,
    float* __restrict__ y, int ldy, int M, int O, int K, int kslice) {
  constexpr int U = 4, NP = 4 * U / PA;                 // rounds per iteration, scale periods per iteration
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, S = blockDim.x >> 5;
  int ra = blockIdx.x * 16 + g, rb = ra + 8;
  bool va = ra < O, vb = rb < O, vx = g < M;
  int m0 = 2 * t, m1 = m0 + 1;
  bool v0 = m0 < M, v1 = m1 < M;
  int k0 = warp * kslice, k1 = min(K, k0 + kslice);
  const u8* tile = wt + (long long)blockIdx.x * (K >> 6) * 512;
  // the weights are constant: this warp's first iteration (up to 2 KB, contiguous) goes to L2 before the wait
  if (k0 < k1 && lane < 4 * min(U, (k1 - k0) >> 6)) prefetch_l2(tile + (long long)(k0 >> 6) * 512 + lane * 128);
  QT_PDL_ENTRY
  // per-lane pointers at k0: weights (this lane's 16 B of each round), x (row g; columns past M read row 0, their
  // outputs are dropped), fp4 block scales of rows ra, rb, x block scales of columns m0, m1 (XS), int4 scale rows
  const u8* wp = tile + (long long)(k0 >> 6) * 512 + lane * 16;
  const unsigned short* xp = xh + (long long)(vx ? g : 0) * K + k0 + 4 * t;
  int sra = va ? ra : O - 1, srb = vb ? rb : O - 1;    // scale rows (clamped: rows past O hold zero codes)
  constexpr int BL = F == Q4_NVFP4 ? 4 : 5;           // log2 of the fp4 scale block
  const int nb = K >> BL;                              // fp4 scale blocks per row (weights and x)
  const u8* sap = (const u8*)sc + (long long)sra * nb + (k0 >> BL);
  const u8* sbp = (const u8*)sc + (long long)srb * nb + (k0 >> BL);
  const float* xsa = XS ? xsc + (long long)(v0 ? m0 : 0) * nb + (k0 >> BL) : nullptr;
  const float* xsb = XS ? xsc + (long long)(v1 ? m1 : 0) * nb + (k0 >> BL) : nullptr;
  const float* sca = (const float*)sc + (long long)sra * sld, *scb = (const float*)sc + (long long)srb * sld;
  const float* zpa = zp + (long long)sra * sld, *zpb = zp + (long long)srb * sld;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};                 // rows (ra, m0), (ra, m1), (rb, m0), (rb, m1)
  for (int kb = k0; kb < k1; kb += 64 * U) {
    // every load of the iteration first, without branches: rounds past the slice are clamped to its last round
    // (their x zeroed below, so they add nothing)
    int last = min(U, (k1 - kb) >> 6) - 1;
    uint4 W[U];
    uint2 X[U][4];
    unsigned SA[U], SB[U];                             // fp4: the round's block scales of rows ra, rb
    float ZS[2][NP], ZZ[2][NP];                        // int4: scale and zero of each period, rows ra, rb
#pragma unroll
    for (int u = 0; u < U; ++u) {
      int uc = min(u, last);
      W[u] = ld_stream((const uint4*)(wp + uc * 512));
#pragma unroll
      for (int s = 0; s < 4; ++s) X[u][s] = *(const uint2*)(xp + uc * 64 + 16 * s);
      if (F == Q4_NVFP4) {
        SA[u] = *(const unsigned*)(sap + 4 * uc);
        SB[u] = *(const unsigned*)(sbp + 4 * uc);
      } else if (F == Q4_MXFP4) {
        SA[u] = *(const unsigned short*)(sap + 2 * uc);
        SB[u] = *(const unsigned short*)(sbp + 2 * uc);
      }
    }
    if (F == Q4_INT4) {
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        int gi = min(kb + 16 * PA * p, k1 - 16) >> glog2;   // periods past the slice: any valid scale
        ZS[0][p] = sca[gi]; ZS[1][p] = scb[gi];
        ZZ[0][p] = zpa[gi]; ZZ[1][p] = zpb[gi];
      }
    }
    // the iteration's compute; the branch below also keeps ptxas from sinking the loads above into it (in one
    // basic block it issued each round's weight load just before its mma: one round in flight)
    auto iter = [&]() {
      float e[4] = {0.f, 0.f, 0.f, 0.f};                 // the current period's sums
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float fa[2], fb[2];                              // mxfp4: this round's weight block scales (per 2 steps)
        float4 xa = make_float4(1.f, 1.f, 1.f, 1.f), xb = xa;   // XS: x block scales of columns m0, m1
        if (F == Q4_NVFP4) {
          if (XS) {                                      // (rounds past the slice: zero x, any scale)
            int uc = min(u, last);
            xa = *(const float4*)(xsa + 4 * uc);
            xb = *(const float4*)(xsb + 4 * uc);
          }
        } else if (F == Q4_MXFP4) {
          fa[0] = e8m0_to_f32(SA[u] & 255u); fa[1] = e8m0_to_f32((SA[u] >> 8) & 255u);
          fb[0] = e8m0_to_f32(SB[u] & 255u); fb[1] = e8m0_to_f32((SB[u] >> 8) & 255u);
          if (XS) {
            int uc = min(u, last);
            float2 a = *(const float2*)(xsa + 2 * uc);
            float2 b = *(const float2*)(xsb + 2 * uc);
            xa = make_float4(a.x, a.y, 0.f, 0.f); xb = make_float4(b.x, b.y, 0.f, 0.f);
          }
        }
#pragma unroll
        for (int jp = 0; jp < 2; ++jp) {
          int q0 = 4 * u + 2 * jp;                       // the iteration's step index of this word pair's first step
          unsigned ha[4], hb[4];
          if (F == Q4_INT4) {
            float za = ZZ[0][q0 / PA], zb = ZZ[1][q0 / PA];
            int4x8_to_h2(jp ? W[u].z : W[u].x, h2_of(1024.f + za), h2_of(-64.f - za), ha);
            int4x8_to_h2(jp ? W[u].w : W[u].y, h2_of(1024.f + zb), h2_of(-64.f - zb), hb);
          } else {
            e2m1x8_to_h2(jp ? W[u].z : W[u].x, ha);
            e2m1x8_to_h2(jp ? W[u].w : W[u].y, hb);
          }
          if (F == Q4_NVFP4) {                           // the block scale of each step, exactly, in f16
            unsigned sa = e4m3x2_to_h2(SA[u] >> (16 * jp)), sb = e4m3x2_to_h2(SB[u] >> (16 * jp));  // 2 steps
            ha[0] = hmul2_lo(ha[0], sa); ha[1] = hmul2_lo(ha[1], sa); ha[2] = hmul2_hi(ha[2], sa);
            ha[3] = hmul2_hi(ha[3], sa);
            hb[0] = hmul2_lo(hb[0], sb); hb[1] = hmul2_lo(hb[1], sb); hb[2] = hmul2_hi(hb[2], sb);
            hb[3] = hmul2_hi(hb[3], sb);
          }
#pragma unroll
          for (int sub = 0; sub < 2; ++sub) {
            int s = 2 * jp + sub, q = q0 + sub;
            mma_f16(e, ha[2 * sub], hb[2 * sub], ha[2 * sub + 1], hb[2 * sub + 1], X[u][s].x, X[u][s].y);
            if ((q + 1) % PA == 0) {                     // the end of a scale period
              float wa, wb, x0 = 1.f, x1 = 1.f;
              if (F == Q4_NVFP4) {                       // (weights already scaled)
                wa = wb = 1.f;
                if (XS) { x0 = f4c(xa, s); x1 = f4c(xb, s); }
              } else if (F == Q4_MXFP4) {
                wa = fa[jp]; wb = fb[jp];
                if (XS) { x0 = f4c(xa, jp); x1 = f4c(xb, jp); }
              } else {
                wa = ZS[0][q / PA]; wb = ZS[1][q / PA];
              }
              if (XS) {
                acc[0] += e[0] * (wa * x0); acc[1] += e[1] * (wa * x1);
                acc[2] += e[2] * (wb * x0); acc[3] += e[3] * (wb * x1);
              } else {
                acc[0] += e[0] * wa; acc[1] += e[1] * wa; acc[2] += e[2] * wb; acc[3] += e[3] * wb;
              }
              e[0] = e[1] = e[2] = e[3] = 0.f;
            }
          }
        }
      }
    };
    if (last == U - 1) {
      iter();
    } else {                                           // the slice's partial last iteration: rounds past it add 0
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u > last) {
#pragma unroll
          for (int s = 0; s < 4; ++s) X[u][s] = make_uint2(0u, 0u);
        }
      iter();
    }
    wp += U * 512; xp += U * 64;
    sap += U << (6 - BL); sbp += U << (6 - BL);
    if (XS) { xsa += U << (6 - BL); xsb += U << (6 - BL); }
  }
  if (S > 1) {                                         // the warps' K slices, summed in warp order
    extern __shared__ float red[];                     // [S][4][32]
#pragma unroll
    for (int i = 0; i < 4; ++i) red[(warp * 4 + i) * 32 + lane] = acc[i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float a = 0.f;
      for (int w = 0; w < S; ++w) a += red[(w * 4 + i) * 32 + lane];
      acc[i] = a;
    }
  }
  float post = F == Q4_INT4 ? 1.0f : gs * 16384.0f;
  float h0 = v0 ? hs[m0] * post : 0.f, h1 = v1 ? hs[m1] * post : 0.f;
  float out[4] = {acc[0] * h0, acc[1] * h1, acc[2] * h0, acc[3] * h1};
  store_frag(y, ldy, ra, rb, va, vb, m0, m1, M, out, (bias && va) ? bias[ra] : 0.f, (bias && vb) ? bias[rb] : 0.f);
}

#define QT_Q4_ARGS const unsigned short*, const float*, const float*, const u8*, const void*, const float*, float, int, \
  int, const float*, float*, int, int, int, int, int
template __global__ void gemv_q4<Q4_NVFP4, 16, 0>(QT_Q4_ARGS);
template __global__ void gemv_q4<Q4_MXFP4, 2, 0>(QT_Q4_ARGS);
template __global__ void gemv_q4<Q4_MXFP4, 2, 1>(QT_Q4_ARGS);
template __global__ void gemv_q4<Q4_INT4, 2, 0>(QT_Q4_ARGS);
template __global__ void gemv_q4<Q4_INT4, 4, 0>(QT_Q4_ARGS);
template __global__ void gemv_q4<Q4_INT4, 8, 0>(QT_Q4_ARGS);
