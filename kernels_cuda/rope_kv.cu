// rope_kv.cu — optional per-head RMSNorm (qwen3 q_norm/k_norm), RoPE (HF rotate-half), and the KV-cache write.
// q f32 rows [N, ldq] holding Hq*D, k rows [N, ldk] holding Hkv*D, v rows [N, ldv] (views of one fused qkv
// output are fine); pos int64 [N] (absolute positions of tokens n = b*T + t; cache row b = n / T); cos/sin f32 [P, D/2] (host-precomputed, llama3 scaling included);
// qn/kn f32 [D] or null; q_out f32 [N, Hq, D] (rotated q); cache as in kv_cache.cuh with L = max_len.
// K written = rope(norm(k)), V written = v, both quantized per kv_fmt (fp8: e4m3(x / scale);
// nvfp4: g = scale/6, per 16 elements sb = e4m3(amax16 / (6 g)), S = sb*g, codes e2m1(x / S), S < 1e-5 -> codes 0).
// Paged cache (bt non-null): position p of batch row b = n / T is stored in block bt[b * bt_ld + p / bs], slot
// p % bs (kv_cache.cuh); else in row b of L positions.
// grid (N, Hq + 2*Hkv), block D threads (D in {32..1024}, D % 32 == 0).
#include "kv_cache.cuh"

__device__ __forceinline__ void kv_store(int fmt, void* codes, u8* scales, long long row, int D, int d, float v,
                                         float scale) {
  if (fmt == KV_BF16) { ((bf16_t*)codes)[row * D + d] = f32_to_bf16(v); return; }
  if (fmt == KV_FP8) { ((u8*)codes)[row * D + d] = (u8)f32_to_e4m3(v / scale); return; }
  float g = scale / 6.0f;
  float amax = fabsf(v);
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  unsigned sbc = f32_to_e4m3(amax / (6.0f * g));
  float sb = e4m3_to_f32(sbc);
  float S = sb * g;
  unsigned c = S >= 1e-5f ? f32_to_e2m1(v / S) : 0u;
  unsigned other = __shfl_xor_sync(0xffffffffu, c, 1);
  if ((d & 1) == 0) ((u8*)codes)[row * (D / 2) + d / 2] = (u8)(c | (other << 4));
  if ((d & 15) == 0) scales[row * (D / 16) + d / 16] = (u8)sbc;
}

extern "C" __global__ void rope_kv_write(const float* __restrict__ qs, int ldq, const float* __restrict__ ks_in,
                                         int ldk, const float* __restrict__ vs_in, int ldv,
                                         const long long* __restrict__ pos, int T, const float* __restrict__ cosT,
                                         const float* __restrict__ sinT, const float* __restrict__ qn,
                                         const float* __restrict__ kn, float eps, float* __restrict__ q_out,
                                         void* kc, u8* ks, void* vc, u8* vs, int kv_fmt, float k_scale,
                                         float v_scale, int Hq, int Hkv, int D, int L, const int* __restrict__ bt,
                                         int bt_ld, int bs) {
  QT_PDL_ENTRY
  __shared__ float buf[1024];
  __shared__ float red[32];
  int n = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  int kind = h < Hq ? 0 : (h < Hq + Hkv ? 1 : 2);  // 0 q, 1 k, 2 v
  int kvh = kind == 1 ? h - Hq : h - Hq - Hkv;
  const float* src = kind == 0 ? qs + (long long)n * ldq + (long long)h * D
                   : (kind == 1 ? ks_in + (long long)n * ldk + (long long)kvh * D
                                : vs_in + (long long)n * ldv + (long long)kvh * D);
  float x = src[d];
  long long p = pos[n];
  long long row = bt ? ((long long)bt[(long long)(n / T) * bt_ld + p / bs] * Hkv + kvh) * bs + p % bs
                     : ((long long)(n / T) * Hkv + kvh) * L + p;
  if (kind == 2) {  // V: store only
    kv_store(kv_fmt, vc, vs, row, D, d, x, v_scale);
    return;
  }
  const float* nw = kind == 0 ? qn : kn;
  if (nw) {
    float ss = block_sum(x * x, red);
    x = x * rsqrtf(ss / (float)D + eps) * nw[d];
  }
  buf[d] = x;
  __syncthreads();
  int half = D / 2, j = d < half ? d : d - half;
  float c = cosT[(long long)p * half + j], s = sinT[(long long)p * half + j];
  float y = d < half ? x * c - buf[d + half] * s : x * c + buf[d - half] * s;
  if (kind == 0) q_out[((long long)n * Hq + h) * D + d] = y;
  else kv_store(kv_fmt, kc, ks, row, D, d, y, k_scale);
}
