// attn_tc.cuh (bench prototype, not in the package) — paged decode attention with QK^T and PV on the tensor cores.
// Appended by bench/attention_tc.py to kernels_cuda/attention.cu (+ mma_frag.cuh) as preprocessed by the loader, so
// it uses their helpers (cp_async, RowBytes, PagedRows, kv_store_vec, rope_*, warp_max, e4m3x2_to_h2, mma_f16).
// Same signature, grid, split rule and outputs (part, ml) as attn_partial_paged<D, PU, GM, KF> (D 64 / 128 / 256,
// G <= 8), including the decode path with cos (RoPE of q and k, the new K / V row written by the block whose split
// holds it, with attn_partial_paged's code): attn_combine merges its splits unchanged. Its dynamic shared memory is
// larger than attn_partial_paged's (padded rows): 2 * CMAX * (codes + 16) + 2 * CMAX * scales bytes per row format,
// so ops.paged_stage_bytes must change with it if it replaces that kernel.
//
// Per block (row n, KV head kh, split): each 128-position sub-chunk's K / V codes (+ nvfp4 scales) are staged in
// shared memory by cp.async (rows padded by 16 bytes against bank conflicts; rows past the sub-chunk's end zeroed
// up to the next 16). Scores: mma m16n8k16 with A = the G <= 8 query heads (rows 8..15 zero) x 16 head dims and
// B = K^T (16 dims x 8 positions); each warp takes every 4th tile of 8 positions. Each query head is scaled by a
// power of two 2^e to a max of ~2^14 (exact; the f16 parts then stay normal for elements within 2^-10 of the max)
// and split into parts exact in the operand type (f16: hi + lo, ~22 bits; bf16 caches: hi + mid + lo, 24 bits),
// each part one mma; the scores are multiplied in float32 by 2^-e / sqrt(d) times the cache's K scale. The K codes
// are exact in f16 (e4m3; E2M1 x e4m3 block scale) or bf16. Softmax as attn_partial_paged (float32, running max
// over sub-chunks). PV: A = the probabilities times 2^14 (exact, so the f16 parts of p >= 2^-10 stay normal), split
// the same way, B = V (16 positions x 8 dims); warp w owns head dims [w D / 4, (w + 1) D / 4) over all positions
// (no cross-warp sum); 2^-14 and the V scale are applied to the sums in float32.
#pragma once

QT_MMA_16X8(mma_bf16, "m16n8k16.row.col.f32.bf16.bf16.f32")

__device__ __forceinline__ unsigned pack_h2(float lo, float hi) {   // f16x2 (lo -> bits 0..15), round to nearest
  unsigned r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
__device__ __forceinline__ unsigned pack_bf2(float lo, float hi) {  // bf16x2 (lo -> bits 0..15)
  unsigned r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
__device__ __forceinline__ float h_lo(unsigned h) { return h2f((unsigned short)(h & 0xffffu)); }
__device__ __forceinline__ float h_hi(unsigned h) { return h2f((unsigned short)(h >> 16)); }
__device__ __forceinline__ float bf_lo(unsigned b) { return __uint_as_float(b << 16); }
__device__ __forceinline__ float bf_hi(unsigned b) { return __uint_as_float(b & 0xffff0000u); }
__device__ __forceinline__ unsigned hmul2_(unsigned a, unsigned b) {
  unsigned r; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r;
}
// E2M1 code (sign bit 3) -> f16 bits: magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 (exact)
__device__ __forceinline__ unsigned e2m1_h(unsigned c) {
  return (unsigned)(((0x464442403E3C3800ULL >> (8 * (c & 7u))) & 0xffu) << 8) | ((c & 8u) << 12);
}

// the split parts of (x0, x1) for KF: f16 hi, lo (NP = 2) or bf16 hi, mid, lo (NP = 3), packed pairs
template <int KF>
__device__ __forceinline__ void split_pair(float x0, float x1, unsigned p[3]) {
  if (KF == KV_BF16) {
    p[0] = pack_bf2(x0, x1);
    float r0 = x0 - bf_lo(p[0]), r1 = x1 - bf_hi(p[0]);
    p[1] = pack_bf2(r0, r1);
    p[2] = pack_bf2(r0 - bf_lo(p[1]), r1 - bf_hi(p[1]));
  } else {
    p[0] = pack_h2(x0, x1);
    p[1] = pack_h2(x0 - h_lo(p[0]), x1 - h_hi(p[0]));
    p[2] = 0u;
  }
}
template <int KF>
__device__ __forceinline__ void mma_kf(float d[4], unsigned a0, unsigned a2, unsigned b0, unsigned b1) {
  if (KF == KV_BF16) mma_bf16(d, a0, 0u, a2, 0u, b0, b1);
  else mma_f16(d, a0, 0u, a2, 0u, b0, b1);
}

template <int D, int KF>
__global__ void __launch_bounds__(128) attn_tc_paged(const float* __restrict__ q, int ldq,
    const long long* __restrict__ pos, int T, void* kc, u8* ks, void* vc, u8* vs, int kv_fmt, float k_scale,
    float v_scale, float* __restrict__ part, float* __restrict__ ml, int Hq, int Hkv, int min_span,
    float sm_scale, const float* __restrict__ kr, int ldk, const float* __restrict__ vr, int ldv,
    const float* __restrict__ cosT, const float* __restrict__ sinT, const int* __restrict__ bt, int bt_ld,
    int bs) {
  constexpr int GMAX = 8, NW = 4, NP = KF == KV_BF16 ? 3 : 2, DPL = D / 32, KS = D / 16, DT = D / 32;
  using RB = RowBytes<D, KF>;
  constexpr int RS = RB::codes + 16;                       // padded row stride of the staged codes
  constexpr int SB = RB::scales;
  __shared__ float sm_s[GMAX][CMAX];
  __shared__ float sm_m[GMAX], sm_l[GMAX], sm_c[GMAX];
  __shared__ long long sm_row[CMAX];
  __shared__ float sm_q[GMAX][D];                           // the query heads, rotated, times 2^e (per head)
  __shared__ float sm_qf[GMAX];                             // 2^-e / sqrt(d) * K scale: the scores' factor
  extern __shared__ __align__(16) u8 stage[];               // K codes [CMAX][RS], V codes, K scales [CMAX][SB], V
  u8* sK = stage;
  u8* sV = stage + CMAX * RS;
  u8* sKs = stage + 2 * CMAX * RS;
  u8* sVs = sKs + CMAX * SB;
  int n = blockIdx.x / Hkv, kh = blockIdx.x % Hkv, split = blockIdx.y, S = gridDim.y;
  int G = Hq / Hkv;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  QT_PDL_ENTRY
  int len = (int)pos[n] + 1;
  int span = max(min_span, ((len + S - 1) / S + 31) / 32 * 32);
  int c0 = split * span, c1 = min(c0 + span, len);
  if (c0 >= len) {
    if (threadIdx.x < G) {
      long long o = ((long long)n * Hq + kh * G + threadIdx.x) * S + split;
      ml[o * 2] = -QT_INF; ml[o * 2 + 1] = 0.0f;
    }
    return;
  }
  long long b = n / T;
  const float kse = KF == KV_BF16 ? 1.0f : (KF == KV_FP8 ? k_scale : k_scale / 6.0f);
  const float vse = (KF == KV_BF16 ? 1.0f : (KF == KV_FP8 ? v_scale : v_scale / 6.0f)) / 16384.0f;
  long long p = len - 1;
  // with cos (decode): RoPE of q and of the new k, and the new K / V row written by the block whose split holds p
  // (attn_partial_paged's code: rope_kv_write's expression and quantization)
  float cs[DPL], sn[DPL];
  if (cosT) rope_factors<D>(cs, sn, lane, cosT, sinT, p);
  if (cosT && p < c1 && warp < 2) {
    float x[DPL];
    const float* src = (warp == 0 ? kr + (long long)n * ldk : vr + (long long)n * ldv) + kh * D + lane * DPL;
#pragma unroll
    for (int i = 0; i < DPL; ++i) x[i] = src[i];
    if (warp == 0) rope_lanes<D>(x, lane, cs, sn);
    PagedRows rp = paged_rows(bt, bt_ld, bs, b, kh, Hkv, c0);
    kv_store_vec<DPL>(kv_fmt, warp == 0 ? kc : vc, warp == 0 ? ks : vs, rp.at(p - c0), D, lane * DPL, x,
                      warp == 0 ? k_scale : v_scale);
  }
  for (int h = warp; h < G; h += NW) {                      // q rows: rotated (with cos), times 2^e
    float x[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) x[i] = q[(long long)n * ldq + (kh * G + h) * D + lane * DPL + i];
    if (cosT) rope_lanes<D>(x, lane, cs, sn);
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) amax = fmaxf(amax, fabsf(x[i]));
    amax = warp_max(amax);
    int e = amax > 0.0f ? 14 - ilogbf(amax) : 0;            // max * 2^e in [2^14, 2^15): f16 normal, < 65504
    float up = ldexpf(1.0f, e);
#pragma unroll
    for (int i = 0; i < DPL; ++i) sm_q[h][lane * DPL + i] = x[i] * up;
    if (lane == 0) sm_qf[h] = ldexpf(sm_scale * kse, -e);
  }
  __syncthreads();                                          // sm_q and the new row are block-visible
  // this lane's query parts: head g, dims 16 s + 2t + {0, 1} (a0) and + {8, 9} (a2), s < D / 16
  unsigned qa0[KS][3], qa2[KS][3];
  {
    int h = min(g, G - 1);
    float f = g < G ? 1.0f : 0.0f;
#pragma unroll
    for (int s = 0; s < KS; ++s) {
      int d = 16 * s + 2 * t;
      split_pair<KF>(sm_q[h][d] * f, sm_q[h][d + 1] * f, qa0[s]);
      split_pair<KF>(sm_q[h][d + 8] * f, sm_q[h][d + 9] * f, qa2[s]);
    }
  }
  float acc[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  if (threadIdx.x < GMAX) { sm_m[threadIdx.x] = -QT_INF; sm_l[threadIdx.x] = 0.0f; }
  for (int s0 = c0; s0 < c1; s0 += CMAX) {
    int np = min(CMAX, c1 - s0), np16 = (np + 15) & ~15;
    PagedRows rows = paged_rows(bt, bt_ld, bs, b, kh, Hkv, s0);
    for (int j = threadIdx.x; j < np; j += blockDim.x) sm_row[j] = rows.at(j);
    __syncthreads();
    constexpr int PR = RB::codes / 16;
    for (int i = threadIdx.x; i < np16 * PR; i += blockDim.x) {
      int j = i / PR, o = (i % PR) * 16;
      if (j < np) {
        long long r = sm_row[j] * RB::codes + o;
        cp_async<16>(sK + j * RS + o, (const u8*)kc + r);
        cp_async<16>(sV + j * RS + o, (const u8*)vc + r);
      } else {                                              // rows past the sub-chunk: zero (no NaN codes)
        *(uint4*)(sK + j * RS + o) = make_uint4(0u, 0u, 0u, 0u);
        *(uint4*)(sV + j * RS + o) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    if constexpr (SB > 0) {
      for (int i = threadIdx.x; i < np16 * (SB / 4); i += blockDim.x) {
        int j = i / (SB / 4), o = (i % (SB / 4)) * 4;
        if (j < np) {
          long long r = sm_row[j] * SB + o;
          cp_async<4>(sKs + j * SB + o, ks + r);
          cp_async<4>(sVs + j * SB + o, vs + r);
        } else {
          *(unsigned*)(sKs + j * SB + o) = 0u;
          *(unsigned*)(sVs + j * SB + o) = 0u;
        }
      }
    }
    cp_async_wait_all();
    __syncthreads();
    // scores: tiles of 8 positions, warp w takes tiles w, w + 4, ...
    for (int tile = warp; tile * 8 < np; tile += NW) {
      int j = tile * 8 + g;                                 // this lane's B column (position)
      float sc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int s = 0; s < KS; ++s) {
        unsigned b0, b1;
        int d = 16 * s + 2 * t;
        if (KF == KV_BF16) {
          b0 = *(const unsigned*)(sK + j * RS + 2 * d);
          b1 = *(const unsigned*)(sK + j * RS + 2 * (d + 8));
        } else if (KF == KV_FP8) {
          b0 = e4m3x2_to_h2(*(const unsigned short*)(sK + j * RS + d));
          b1 = e4m3x2_to_h2(*(const unsigned short*)(sK + j * RS + d + 8));
        } else {
          unsigned sbh = e4m3x2_to_h2(sKs[j * SB + s]) & 0xffffu;      // the block scale, f16
          sbh |= sbh << 16;
          unsigned c0b = sK[j * RS + d / 2], c1b = sK[j * RS + (d + 8) / 2];
          b0 = hmul2_(e2m1_h(c0b & 15u) | (e2m1_h(c0b >> 4) << 16), sbh);
          b1 = hmul2_(e2m1_h(c1b & 15u) | (e2m1_h(c1b >> 4) << 16), sbh);
        }
#pragma unroll
        for (int sp = 0; sp < NP; ++sp) mma_kf<KF>(sc, qa0[s][sp], qa2[s][sp], b0, b1);
      }
      int jj = tile * 8 + 2 * t;
      if (g < G) {
        float f = sm_qf[g];
        if (jj < np) sm_s[g][jj] = sc[0] * f;
        if (jj + 1 < np) sm_s[g][jj + 1] = sc[1] * f;
      }
    }
    __syncthreads();
    // softmax statistics per head (attn_partial_paged's), probabilities past np zeroed up to np16
    for (int h = warp; h < G; h += NW) {
      float mx = -QT_INF;
      for (int j = lane; j < np; j += 32) mx = fmaxf(mx, sm_s[h][j]);
      mx = fmaxf(warp_max(mx), sm_m[h]);
      float l = 0.0f;
      for (int j = lane; j < np16; j += 32) {
        float e = j < np ? expf(sm_s[h][j] - mx) : 0.0f;
        sm_s[h][j] = e;
        l += e;
      }
      l = warp_sum(l);
      if (lane == 0) {
        float c = expf(sm_m[h] - mx);
        sm_l[h] = sm_l[h] * c + l;
        sm_m[h] = mx;
        sm_c[h] = c;
      }
    }
    __syncthreads();
    // PV: warp w, head dims [w D / 4, (w + 1) D / 4) = DT tiles of 8; k-steps of 16 positions
    {
      float c = g < G ? sm_c[g] : 0.0f;
#pragma unroll
      for (int i = 0; i < DT; ++i) { acc[i][0] *= c; acc[i][1] *= c; }
    }
    for (int p0 = 0; p0 < np16; p0 += 16) {
      unsigned pa0[3], pa2[3];
      {
        int h = min(g, G - 1);
        float f = g < G ? 16384.0f : 0.0f;                  // p * 2^14: exact, f16 parts normal for p >= 2^-10
        split_pair<KF>(sm_s[h][p0 + 2 * t] * f, sm_s[h][p0 + 2 * t + 1] * f, pa0);
        split_pair<KF>(sm_s[h][p0 + 2 * t + 8] * f, sm_s[h][p0 + 2 * t + 9] * f, pa2);
      }
      int r0 = p0 + 2 * t;                                  // B rows (positions) r0, r0 + 1, r0 + 8, r0 + 9
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        int d = (D / 4) * warp + 8 * i + g;                 // this lane's B column (head dim)
        unsigned b0, b1;
        if (KF == KV_BF16) {
          const unsigned short* v16 = (const unsigned short*)sV;
          b0 = v16[(r0 * RS) / 2 + d] | ((unsigned)v16[((r0 + 1) * RS) / 2 + d] << 16);
          b1 = v16[((r0 + 8) * RS) / 2 + d] | ((unsigned)v16[((r0 + 9) * RS) / 2 + d] << 16);
        } else if (KF == KV_FP8) {
          b0 = e4m3x2_to_h2(sV[r0 * RS + d] | ((unsigned)sV[(r0 + 1) * RS + d] << 8));
          b1 = e4m3x2_to_h2(sV[(r0 + 8) * RS + d] | ((unsigned)sV[(r0 + 9) * RS + d] << 8));
        } else {
          int sh = 4 * (d & 1);
          unsigned e0 = e2m1_h((sV[r0 * RS + d / 2] >> sh) & 15u), e1 = e2m1_h((sV[(r0 + 1) * RS + d / 2] >> sh) & 15u);
          unsigned e8 = e2m1_h((sV[(r0 + 8) * RS + d / 2] >> sh) & 15u), e9 = e2m1_h((sV[(r0 + 9) * RS + d / 2] >> sh) & 15u);
          unsigned s01 = e4m3x2_to_h2(sVs[r0 * SB + d / 16] | ((unsigned)sVs[(r0 + 1) * SB + d / 16] << 8));
          unsigned s89 = e4m3x2_to_h2(sVs[(r0 + 8) * SB + d / 16] | ((unsigned)sVs[(r0 + 9) * SB + d / 16] << 8));
          b0 = hmul2_(e0 | (e1 << 16), s01);
          b1 = hmul2_(e8 | (e9 << 16), s89);
        }
#pragma unroll
        for (int sp = 0; sp < NP; ++sp) mma_kf<KF>(acc[i], pa0[sp], pa2[sp], b0, b1);
      }
    }
    __syncthreads();                                        // the staged rows and sm_s are rewritten next
  }
  if (g < G) {
    long long o = ((long long)n * Hq + kh * G + g) * S + split;
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      int d = (D / 4) * warp + 8 * i + 2 * t;
      part[o * D + d] = acc[i][0] * vse;
      part[o * D + d + 1] = acc[i][1] * vse;
    }
    if (warp == 0 && t == 0) { ml[o * 2] = sm_m[g]; ml[o * 2 + 1] = sm_l[g]; }
  }
}

#define QT_ATTN_TC(D) template __global__ void attn_tc_paged<D, KV_BF16>(QT_ATTN_PAGED_ARGS); \
  template __global__ void attn_tc_paged<D, KV_FP8>(QT_ATTN_PAGED_ARGS); \
  template __global__ void attn_tc_paged<D, KV_NVFP4>(QT_ATTN_PAGED_ARGS);
QT_ATTN_TC(64)
QT_ATTN_TC(128)
QT_ATTN_TC(256)
