// attention.cu — split-sequence (flash-decoding style) attention over the KV cache, grouped-query heads.
// One kernel serves decode and prefill: query row n = b*T + t attends to cache positions [0, pos[n]] of batch
// row b = n / T (the causal mask).
//
// attn_partial<D>(q f32 [N, Hq, D], pos int64 [N], T, K/V cache (kv_cache.cuh layout, L = max_len),
//     kv_fmt, k_scale, v_scale, part f32 [N, Hq, S, D], ml f32 [N, Hq, S, 2], Hq, Hkv, L, chunk, sm_scale)
//     grid (N * Hkv, S), block 128 (4 warps); block (n*Hkv + kh, s) covers positions [s*chunk, (s+1)*chunk) and
//     all G = Hq/Hkv (<= 8) query heads of KV head kh; writes unnormalised acc, running max m, sum l
//     (m = -inf when its range is empty). D in {64, 128, 256}.
// attn_combine(part, ml, out f32 [N, Hq*D], S, D): grid N*Hq, block D; merges the splits, normalises.
#include "kv_cache.cuh"

#define GMAX 8

template <int D>
__global__ void attn_partial(const float* __restrict__ q, const long long* __restrict__ pos, int T,
                             const void* kc, const u8* ks, const void* vc, const u8* vs, int kv_fmt, float k_scale,
                             float v_scale, float* __restrict__ part, float* __restrict__ ml, int Hq, int Hkv, int L,
                             int chunk, float sm_scale) {
  constexpr int DPL = D / 32;
  const int NW = 4;
  __shared__ float sm_m[NW][GMAX], sm_l[NW][GMAX];
  __shared__ float sm_acc[NW][GMAX][D];
  int n = blockIdx.x / Hkv, kh = blockIdx.x % Hkv, split = blockIdx.y, S = gridDim.y;
  int G = Hq / Hkv;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int len = (int)pos[n] + 1;
  int c0 = split * chunk, c1 = min(c0 + chunk, len);
  if (c0 >= len) {
    if (threadIdx.x < G) {
      long long o = ((long long)n * Hq + kh * G + threadIdx.x) * S + split;
      ml[o * 2] = -QT_INF; ml[o * 2 + 1] = 0.0f;
    }
    return;
  }
  float qv[GMAX][DPL], acc[GMAX][DPL], m[GMAX], l[GMAX];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -QT_INF; l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      acc[g][i] = 0.0f;
      qv[g][i] = g < G ? q[((long long)n * Hq + kh * G + g) * D + lane * DPL + i] * sm_scale : 0.0f;
    }
  }
  long long rowbase = ((long long)(n / T) * Hkv + kh) * L;
  constexpr int PU = 1;  // positions per warp per step (4 measured slower at ctx 8192: 158 registers)
  for (int p0 = c0 + warp; p0 < c1; p0 += NW * PU) {
    float kv[PU][DPL], vv[PU][DPL];
#pragma unroll
    for (int u = 0; u < PU; ++u) {
      int p = p0 + u * NW;
      if (p < c1) {
        kv_load_vec<DPL>(kv_fmt, kc, ks, rowbase + p, D, lane * DPL, k_scale, kv[u]);
        kv_load_vec<DPL>(kv_fmt, vc, vs, rowbase + p, D, lane * DPL, v_scale, vv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < PU; ++u) {
      if (p0 + u * NW >= c1) break;
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        if (g < G) {
          float s = 0.0f;
#pragma unroll
          for (int i = 0; i < DPL; ++i) s += qv[g][i] * kv[u][i];
          s = warp_sum(s);
          float mn = fmaxf(m[g], s);
          float corr = expf(m[g] - mn), e = expf(s - mn);
          l[g] = l[g] * corr + e;
#pragma unroll
          for (int i = 0; i < DPL; ++i) acc[g][i] = acc[g][i] * corr + e * vv[u][i];
          m[g] = mn;
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < G) {
      if (lane == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
#pragma unroll
      for (int i = 0; i < DPL; ++i) sm_acc[warp][g][lane * DPL + i] = acc[g][i];
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < G * D; t += blockDim.x) {
    int g = t / D, d = t % D;
    float M = -QT_INF;
    for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w][g]);
    float a = 0.0f, ls = 0.0f;
    for (int w = 0; w < NW; ++w) {
      if (sm_m[w][g] == -QT_INF) continue;
      float c = expf(sm_m[w][g] - M);
      a += c * sm_acc[w][g][d];
      ls += c * sm_l[w][g];
    }
    long long o = ((long long)n * Hq + kh * G + g) * S + split;
    part[o * D + d] = a;
    if (d == 0) { ml[o * 2] = M; ml[o * 2 + 1] = ls; }
  }
}

extern "C" __global__ void attn_combine(const float* __restrict__ part, const float* __restrict__ ml,
                                        float* __restrict__ out, int S, int D) {
  long long nh = blockIdx.x;
  int d = threadIdx.x;
  float M = -QT_INF;
  for (int s = 0; s < S; ++s) M = fmaxf(M, ml[(nh * S + s) * 2]);
  float a = 0.0f, ls = 0.0f;
  for (int s = 0; s < S; ++s) {
    float ms = ml[(nh * S + s) * 2];
    if (ms == -QT_INF) continue;
    float c = expf(ms - M);
    a += c * part[(nh * S + s) * D + d];
    ls += c * ml[(nh * S + s) * 2 + 1];
  }
  out[nh * D + d] = a / ls;
}

template __global__ void attn_partial<64>(const float*, const long long*, int, const void*, const u8*, const void*,
                                          const u8*, int, float, float, float*, float*, int, int, int, int, float);
template __global__ void attn_partial<128>(const float*, const long long*, int, const void*, const u8*, const void*,
                                           const u8*, int, float, float, float*, float*, int, int, int, int, float);
template __global__ void attn_partial<256>(const float*, const long long*, int, const void*, const u8*, const void*,
                                           const u8*, int, float, float, float*, float*, int, int, int, int, float);
