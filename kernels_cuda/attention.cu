// attention.cu — split-sequence (flash-decoding style) attention over the KV cache, grouped-query heads.
// One kernel serves decode and prefill: query row n = b*T + t attends to cache positions [0, pos[n]] of batch
// row b = n / T (the causal mask).
//
// attn_partial<D, PU>(q f32 [N, Hq, D], pos int64 [N], T, K/V cache (kv_cache.cuh layout, L = max_len),
//     kv_fmt, k_scale, v_scale, part f32 [N, Hq, S, D], ml f32 [N, Hq, S, 2], Hq, Hkv, L, chunk, sm_scale)
//     grid (N * Hkv, S), block 128 (4 warps); block (n*Hkv + kh, s) covers positions [s*chunk, (s+1)*chunk)
//     (chunk <= 128) and all G = Hq/Hkv (<= 8) query heads of KV head kh. Three phases, no serial chain per
//     position: (1) scores: each warp takes every 4th position, PU positions' K rows loaded at once, the
//     PU x 8 dot products (position, head) reduced across the warp together (transpose-reduce), into shared memory; (2) per head: max m and e = exp(s - m), l = sum e;
//     (3) each warp accumulates e * V over its positions (PU V rows loaded at once), the 4 warps are summed
//     in shared memory. Writes unnormalised acc, m and l (m = -inf when its range is empty). D in {64, 128, 256}.
//     When the chunk is one round of the warps (chunk <= 4 * PU) each warp loads its V rows together with its K
//     rows (one dependent DRAM round trip instead of two).
//     Fused merge (cnt not null; v9): after writing its split, each block takes a ticket on cnt[blockIdx.x] (u32,
//     zero before the launch); the block that draws S - 1 merges the S splits of its G heads as attn_combine does
//     (same c = exp(m_s - M) weights; the splits are summed in P = 128 / (G*D/16) contiguous groups, then the
//     groups in order, so the bits may differ from attn_combine's sequential sum), normalises, writes out f32
//     [N, Hq*D] (null: not stored) and the quantized forms (scheme 0, 1 or 3 only: scales local to the block,
//     and for 3, G*D % 128 == 0; outq u8 [N, Hq*D], qscale as act_quant_fast), then resets its counter.
// attn_combine(part, ml, out f32 [N, Hq*D] or null, S, D, HD = Hq*D, scheme + act_quant_fast's outputs): grid N,
//     block ceil(HD/16) rounded to 32 (HD % 16 == 0, HD <= 16384): merges the splits, normalises; with scheme > 0
//     also quantizes the row for the o projection (act_quant.cuh), in the same launch (scheme 0: merge only).
//     Schemes whose scales are local to 16..128 elements (0, 1, 3) may spread a row over several blocks:
//     grid (N, nb), each block.x threads covering 16 * block.x elements (as silu_mul_quant).
#include "kv_cache.cuh"
#include "act_quant.cuh"

#define GMAX 8
#define CMAX 128

// rows j0 + u*4 (u < PU, those < np) of one KV head's cache (K or V), DPL elements per lane, into r[u]
template <int D, int PU>
__device__ __forceinline__ void load_rows(int kv_fmt, const void* codes, const u8* scales, long long rowbase,
                                          int j0, int np, int lane, float scale, float r[PU][D / 32]) {
#pragma unroll
  for (int u = 0; u < PU; ++u) {
    int j = j0 + u * 4;
    if (j < np) kv_load_vec<D / 32>(kv_fmt, codes, scales, rowbase + j, D, lane * (D / 32), scale, r[u]);
  }
}

// one step of the warp transpose-reduce over the first N values: keep the half picked by lane bit O, add the
// partner's copy of it (values N/2 .. N-1 are dead afterwards)
template <int N, int O>
__device__ __forceinline__ void bfly_step(float* val, int lane) {
  bool upper = (lane & O) != 0;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    float send = upper ? val[i] : val[i + N / 2];
    float keep = upper ? val[i + N / 2] : val[i];
    val[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
}

// one split of attn_partial: phases 1-3 over np >= 1 positions starting at cache row rowbase, then its part / ml
template <int D, int PU>
__device__ __forceinline__ void attn_split(const float* __restrict__ q, int n, int kh, int G, int Hq, const void* kc,
    const u8* ks, const void* vc, const u8* vs, int kv_fmt, float k_scale, float v_scale, long long rowbase, int np,
    float sm_scale, float* __restrict__ part, float* __restrict__ ml, int split, int S, float (*sm_s)[CMAX],
    float (*sm_acc)[GMAX][D], float* sm_m, float* sm_l) {
  constexpr int DPL = D / 32;
  constexpr int NW = 4;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  bool one = np <= NW * PU;       // one round: V rows load with the K rows
  float vv[PU][DPL];
  // phase 1: scores
  {
    float qv[GMAX][DPL];
#pragma unroll
    for (int g = 0; g < GMAX; ++g)
#pragma unroll
      for (int i = 0; i < DPL; ++i)
        qv[g][i] = g < G ? q[((long long)n * Hq + kh * G + g) * D + lane * DPL + i] * sm_scale : 0.0f;
    constexpr int V = PU * GMAX;   // partial dot products per lane: (position slot u, head g) -> u * GMAX + g
    for (int j0 = warp; j0 < np; j0 += NW * PU) {
      float kv[PU][DPL];
      load_rows<D, PU>(kv_fmt, kc, ks, rowbase, j0, np, lane, k_scale, kv);
      if (one) load_rows<D, PU>(kv_fmt, vc, vs, rowbase, j0, np, lane, v_scale, vv);
      float val[V];
#pragma unroll
      for (int u = 0; u < PU; ++u)
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          float a = 0.0f;
#pragma unroll
          for (int i = 0; i < DPL; ++i) a += qv[g][i] * kv[u][i];
          val[u * GMAX + g] = a;
        }
      // transpose-reduce across the warp (V - V/32 shuffles instead of 5 per sum): at each step a lane keeps
      // the half of its values selected by its lane bit and adds the partner's copy of that half; lane l ends
      // with the warp sums of values (V/32) l + i, i < V/32
      bfly_step<V, 16>(val, lane);
      bfly_step<V / 2, 8>(val, lane);
      bfly_step<V / 4, 4>(val, lane);
      bfly_step<V / 8, 2>(val, lane);
      bfly_step<V / 16, 1>(val, lane);
#pragma unroll
      for (int i = 0; i < V / 32; ++i) {
        int idx = (V / 32) * lane + i, g = idx % GMAX, j = j0 + (idx / GMAX) * NW;
        if (g < G && j < np) sm_s[g][j] = val[i];
      }
    }
  }
  __syncthreads();
  // phase 2: softmax statistics per head
  for (int g = warp; g < G; g += NW) {
    float mx = -QT_INF;
    for (int j = lane; j < np; j += 32) mx = fmaxf(mx, sm_s[g][j]);
    mx = warp_max(mx);
    float l = 0.0f;
    for (int j = lane; j < np; j += 32) {
      float e = expf(sm_s[g][j] - mx);
      sm_s[g][j] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) { sm_m[g] = mx; sm_l[g] = l; }
  }
  __syncthreads();
  // phase 3: e * V
  float acc[GMAX][DPL];
#pragma unroll
  for (int g = 0; g < GMAX; ++g)
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[g][i] = 0.0f;
  for (int j0 = warp; j0 < np; j0 += NW * PU) {
    if (!one) load_rows<D, PU>(kv_fmt, vc, vs, rowbase, j0, np, lane, v_scale, vv);
#pragma unroll
    for (int u = 0; u < PU; ++u) {
      int j = j0 + u * NW;
      if (j < np) {
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          if (g < G) {
            float e = sm_s[g][j];
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[g][i] += e * vv[u][i];
          }
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < G) {
#pragma unroll
      for (int i = 0; i < DPL; ++i) sm_acc[warp][g][lane * DPL + i] = acc[g][i];
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < G * D; t += blockDim.x) {
    int g = t / D, d = t % D;
    float a = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; ++w) a += sm_acc[w][g][d];
    long long o = ((long long)n * Hq + kh * G + g) * S + split;
    part[o * D + d] = a;
    if (d == 0) { ml[o * 2] = sm_m[g]; ml[o * 2 + 1] = sm_l[g]; }
  }
}

// the fused merge of attn_partial (header): the finishing block of KV head kh of row n merges the S splits of
// its G query heads. NS = G*D/16 slots of 16 elements; thread (slot sl, group p < P = 128/NS) sums the splits
// [p S / P, (p+1) S / P) with weights exp(m_s - M) (M the max over all S), the groups are added in order p = 0..P-1
// through shared memory (sv >= 128 * 16 floats, sls >= 128), then the first ceil(NS/32) warps normalise and hand
// their slot to store_and_quant (slot t = kh*NS + sl of the row of Hq*D). part / ml are read through L2 (other
// blocks wrote them in this launch).
template <int D>
__device__ __forceinline__ void merge_group(const float* part, const float* ml, float* __restrict__ out, int n, int kh,
    int G, int Hq, int S, float* sv, float* sls, float* red, int scheme, float ts, const float* __restrict__ pqs,
    u8* __restrict__ outq, float* __restrict__ qscale) {
  int NS = G * D / 16, P = blockDim.x / NS;
  int tid = threadIdx.x, sl = tid % NS, p = tid / NS;
  float v[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) v[j] = 0.0f;
  float ls = 0.0f;
  if (p < P) {
    int g = sl * 16 / D, d0 = sl * 16 % D;
    long long nh = (long long)n * Hq + kh * G + g;
    const float* mlr = ml + nh * S * 2;
    float M = -QT_INF;
#pragma unroll 8
    for (int s = 0; s < S; ++s) M = fmaxf(M, ld_cg(mlr + 2 * s));
    int sa = p * S / P, sb = (p + 1) * S / P;
    for (int s0 = sa; s0 < sb; s0 += 4) {
      float ms[4], lv[4];
      float4 pv[4][4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        int s = min(s0 + u, sb - 1);
        ms[u] = ld_cg(mlr + 2 * s); lv[u] = ld_cg(mlr + 2 * s + 1);
        const float* ps = part + (nh * S + s) * D + d0;
#pragma unroll
        for (int q4 = 0; q4 < 4; ++q4)
          pv[u][q4] = ld_cg4(ps + 4 * q4);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (s0 + u < sb && ms[u] != -QT_INF) {
          float c = expf(ms[u] - M);
#pragma unroll
          for (int q4 = 0; q4 < 4; ++q4) {
            v[4 * q4] += c * pv[u][q4].x; v[4 * q4 + 1] += c * pv[u][q4].y;
            v[4 * q4 + 2] += c * pv[u][q4].z; v[4 * q4 + 3] += c * pv[u][q4].w;
          }
          ls += c * lv[u];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) sv[tid * 16 + j] = v[j];
    sls[tid] = ls;
  }
  __syncthreads();
  if (tid >= ((NS + 31) & ~31)) return;
  bool live = tid < NS;
  if (live) {
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = sv[tid * 16 + j];
    ls = sls[tid];
    for (int q = 1; q < P; ++q) {
#pragma unroll
      for (int j = 0; j < 16; ++j) v[j] += sv[(q * NS + tid) * 16 + j];
      ls += sls[q * NS + tid];
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = v[j] / ls;
  }
  int t = kh * NS + tid, HD = Hq * D;
  store_and_quant(v, (out && live) ? out + (long long)n * HD + 16 * t : nullptr, pqs, n, t, live, red, HD, scheme, ts,
                  nullptr, nullptr, 0, outq, qscale);
}

template <int D, int PU>
__global__ void __launch_bounds__(128) attn_partial(const float* __restrict__ q, const long long* __restrict__ pos,
    int T, const void* kc, const u8* ks, const void* vc, const u8* vs, int kv_fmt, float k_scale, float v_scale,
    float* __restrict__ part, float* __restrict__ ml, int Hq, int Hkv, int L, int chunk, float sm_scale,
    unsigned* __restrict__ cnt, float* __restrict__ out, int scheme, const float* __restrict__ in_scale,
    const float* __restrict__ pqs, u8* __restrict__ outq, float* __restrict__ qscale) {
  float ts = static_scale(scheme, in_scale);
  QT_PDL_ENTRY
  constexpr int NW = 4;
  __shared__ float sm_s[GMAX][CMAX];      // scores, then exp(s - m)
  __shared__ float sm_acc[NW][GMAX][D];
  __shared__ float sm_m[GMAX], sm_l[GMAX];
  int n = blockIdx.x / Hkv, kh = blockIdx.x % Hkv, split = blockIdx.y, S = gridDim.y;
  int G = Hq / Hkv;
  int len = (int)pos[n] + 1;
  int c0 = split * chunk, c1 = min(c0 + chunk, len);
  if (c0 >= len) {
    if (threadIdx.x < G) {
      long long o = ((long long)n * Hq + kh * G + threadIdx.x) * S + split;
      ml[o * 2] = -QT_INF; ml[o * 2 + 1] = 0.0f;
    }
  } else {
    attn_split<D, PU>(q, n, kh, G, Hq, kc, ks, vc, vs, kv_fmt, k_scale, v_scale, ((long long)(n / T) * Hkv + kh) * L + c0,
                      c1 - c0, sm_scale, part, ml, split, S, sm_s, sm_acc, sm_m, sm_l);
  }
  if (cnt == nullptr) return;
  __shared__ unsigned is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&cnt[blockIdx.x], 1u) == (unsigned)(S - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  merge_group<D>(part, ml, out, n, kh, G, Hq, S, &sm_acc[0][0][0], &sm_s[0][0], &sm_s[GMAX - 1][CMAX - 32], scheme, ts, pqs, outq, qscale);
  if (threadIdx.x == 0) cnt[blockIdx.x] = 0u;
}

// attn_combine: merge the S splits of every head of row r (16 elements per thread, thread t covers elements
// [16t, 16t + 16) of the row = head 16t / D), normalise, and hand the row to store_and_quant: out (if not
// null) receives it, and with scheme > 0 its quantized forms for the o projection as act_quant_fast writes them
// (scheme 0, no outputs: a plain merge). Loads are batched 4 splits at a time (part of an empty split is read
// but not used), so a row costs ~S/4 dependent L2 round trips instead of S.
extern "C" __global__ void attn_combine(const float* __restrict__ part, const float* __restrict__ ml,
                                        float* __restrict__ out, int S, int D, int HD, int scheme,
                                        const float* __restrict__ in_scale, const float* __restrict__ pqs,
                                        unsigned short* __restrict__ outh, float* __restrict__ hscale,
                                        int hperm, u8* __restrict__ outq, float* __restrict__ qscale) {
  float ts = static_scale(scheme, in_scale);
  QT_PDL_ENTRY
  __shared__ float red[32];
  int r = blockIdx.x, t = blockIdx.y * blockDim.x + threadIdx.x;  // t: 16-element slot of the row
  int i0 = t * 16;
  bool live = i0 < HD;
  float v[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) v[j] = 0.0f;
  if (live) {
    int h = i0 / D, d0 = i0 % D;
    long long nh = (long long)r * (HD / D) + h;
    const float* mlr = ml + nh * S * 2;
    float M = -QT_INF;
#pragma unroll 8
    for (int s = 0; s < S; ++s) M = fmaxf(M, mlr[2 * s]);
    float ls = 0.0f;
    for (int s0 = 0; s0 < S; s0 += 4) {
      float ms[4], lv[4];
      float4 pv[4][4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        int s = min(s0 + u, S - 1);
        ms[u] = mlr[2 * s]; lv[u] = mlr[2 * s + 1];
        const float4* ps = (const float4*)(part + (nh * S + s) * D + d0);
#pragma unroll
        for (int q4 = 0; q4 < 4; ++q4) pv[u][q4] = ps[q4];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (s0 + u < S && ms[u] != -QT_INF) {
          float c = expf(ms[u] - M);
#pragma unroll
          for (int q4 = 0; q4 < 4; ++q4) {
            v[4 * q4] += c * pv[u][q4].x; v[4 * q4 + 1] += c * pv[u][q4].y;
            v[4 * q4 + 2] += c * pv[u][q4].z; v[4 * q4 + 3] += c * pv[u][q4].w;
          }
          ls += c * lv[u];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = v[j] / ls;
  }
  store_and_quant(v, out ? out + (long long)r * HD + i0 : nullptr, pqs, r, t, live, red, HD, scheme, ts, outh,
                  hscale, hperm, outq, qscale);
}

#define QT_ATTN_ARGS const float*, const long long*, int, const void*, const u8*, const void*, const u8*, int, float, \
  float, float*, float*, int, int, int, int, float, unsigned*, float*, int, const float*, const float*, u8*, float*
template __global__ void attn_partial<64, 8>(QT_ATTN_ARGS);
template __global__ void attn_partial<128, 8>(QT_ATTN_ARGS);
template __global__ void attn_partial<256, 4>(QT_ATTN_ARGS);
