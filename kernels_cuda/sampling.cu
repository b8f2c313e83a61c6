// sampling.cu — next-token choice on the GPU; only the token id leaves the device.
// sample_tokens(logits f32 [B, ldl] (first V used), V, out int64 [B], temperature, top_k, top_p, u f32 [B] or null,
//   rng u64 [1] or null): ONE block of 1024 threads loops over the B rows.
//   temperature <= 0: greedy (argmax, lowest index on ties).
//   else l = logits / temperature; top_k > 0 keeps tokens whose logit >= the k-th largest; top_p in (0,1) then
//   keeps the smallest top set whose probability mass (renormalised over the top-k set) is >= top_p (HF
//   TopPLogitsWarper rule; ties at a threshold are all kept); a token is drawn with probability proportional to
//   exp(l - max) over the kept set, by inverse CDF in index order at u[b] (or, when u is null, at a counter-based
//   hash of rng[0] + b; rng[0] is then advanced by B, so a captured graph draws fresh numbers every replay).
#include "common.cuh"

__device__ __forceinline__ unsigned okey(float f) {
  unsigned b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float hash_uniform(unsigned long long z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return (float)(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
}

extern "C" __global__ void __launch_bounds__(1024) sample_tokens(const float* __restrict__ logits, int ldl, int V,
    long long* __restrict__ out, int B, float temperature, int top_k, float top_p, const float* __restrict__ u,
    unsigned long long* rng) {
  QT_PDL_ENTRY
  __shared__ float redf[32];
  __shared__ int redi[32];
  __shared__ float wsum[32];
  __shared__ int chosen;
  int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  for (int b = 0; b < B; ++b) {
    const float* l = logits + (long long)b * ldl;
    // argmax (also the fallback of sampling)
    float bv = -QT_INF; int bi = 0x7fffffff;
    for (int i = tid; i < V; i += blockDim.x) { float v = l[i]; if (v > bv) { bv = v; bi = i; } }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      float ov = __shfl_xor_sync(0xffffffffu, bv, o); int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    __syncthreads();
    if (lane == 0) { redf[wid] = bv; redi[wid] = bi; }
    __syncthreads();
    if (wid == 0) {
      bv = redf[lane]; bi = redi[lane];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o); int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
      }
      if (lane == 0) { chosen = bi; redf[0] = bv; }
    }
    __syncthreads();
    int amax_i = chosen;
    float lmax = redf[0] / temperature;
    __syncthreads();
    if (temperature <= 0.0f) { if (tid == 0) out[b] = amax_i; __syncthreads(); continue; }
    float invT = 1.0f / temperature;
    unsigned tk = 0;  // keep key >= tk
    if (top_k > 0 && top_k < V) {
      for (int bit = 31; bit >= 0; --bit) {
        unsigned cand = tk | (1u << bit);
        float cnt = 0.0f;
        for (int i = tid; i < V; i += blockDim.x) cnt += okey(l[i] * invT) >= cand ? 1.0f : 0.0f;
        cnt = block_sum(cnt, redf);
        if (cnt >= (float)top_k) tk = cand;
      }
    }
    float Z = 0.0f;
    for (int i = tid; i < V; i += blockDim.x) { float v = l[i] * invT; if (okey(v) >= tk) Z += expf(v - lmax); }
    Z = block_sum(Z, redf);
    unsigned tp = tk;
    if (top_p > 0.0f && top_p < 1.0f) {
      float target = top_p * Z;
      unsigned t = 0;
      for (int bit = 31; bit >= 0; --bit) {
        unsigned cand = t | (1u << bit);
        float m = 0.0f;
        for (int i = tid; i < V; i += blockDim.x) {
          float v = l[i] * invT; unsigned k = okey(v);
          if (k >= cand && k >= tk) m += expf(v - lmax);
        }
        m = block_sum(m, redf);
        if (m >= target) t = cand;
      }
      tp = t > tk ? t : tk;
    }
    float Zk = 0.0f;
    int chunk = (V + blockDim.x - 1) / blockDim.x, i0 = tid * chunk, i1 = min(V, i0 + chunk);
    for (int i = i0; i < i1; ++i) { float v = l[i] * invT; if (okey(v) >= tp) Zk += expf(v - lmax); }
    // exclusive scan of Zk over threads
    float incl = Zk;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) { float n = __shfl_up_sync(0xffffffffu, incl, o); if (lane >= o) incl += n; }
    __syncthreads();
    if (lane == 31) wsum[wid] = incl;
    if (tid == 0) chosen = amax_i;
    __syncthreads();
    float wpre = 0.0f, tot = 0.0f;
    for (int w2 = 0; w2 < (int)(blockDim.x >> 5); ++w2) { if (w2 < wid) wpre += wsum[w2]; tot += wsum[w2]; }
    float excl = wpre + incl - Zk;
    float uu = u ? u[b] : hash_uniform(rng[0] + b);
    float target = uu * tot;
    if (Zk > 0.0f && target >= excl && target < excl + Zk) {
      float c = excl; int pick = -1;
      for (int i = i0; i < i1; ++i) {
        float v = l[i] * invT;
        if (okey(v) >= tp) { c += expf(v - lmax); pick = i; if (target < c) break; }
      }
      if (pick >= 0) chosen = pick;
    }
    __syncthreads();
    if (tid == 0) out[b] = chosen;
    __syncthreads();
  }
  if (rng && tid == 0) rng[0] += (unsigned long long)B;
}
