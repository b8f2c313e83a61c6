// elementwise.cu — embedding gather, RMSNorm fused with the residual add, SiLU*mul.
// Activations and the residual stream are float32, row-major [rows, cols], contiguous.
//
// embed_gather(ids int32 [N], table bf16 [V,H], out f32 [N,H], H)           grid N, block 256
// embed_gather_f32(ids, table f32 [V,H], out, H)                           grid N, block 256
// rmsnorm_residual(x f32 [N,H], res f32 [N,H] or null, w f32 [H], y f32 [N,H], res_out f32 [N,H], H, eps)
//     r = x + res (or x); res_out = r; y = r * rsqrt(mean(r^2) + eps) * w.   grid N, block ceil(H/16) rounded to 32
//     (res_out may alias res; y may not alias x.) Needs H <= 16 * blockDim.x.
// silu_mul(gu f32 [N, 2I] = [gate | up], out f32 [N, I], I): out = silu(g) * u.  grid (ceil(I/256), N), block 256
#include "common.cuh"

__device__ __forceinline__ float to_f32(bf16_t v) { return bf16_to_f32(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

// out row n = table row ids[n], as f32 (the body of both embed_gather kernels)
template <typename T>
__device__ __forceinline__ void gather_rows(const int* __restrict__ ids, const T* __restrict__ table,
                                            float* __restrict__ out, int H) {
  QT_PDL_ENTRY
  long long row = ids[blockIdx.x];
  const T* src = table + row * H;
  float* dst = out + (long long)blockIdx.x * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) dst[i] = to_f32(src[i]);
}

extern "C" __global__ void embed_gather(const int* __restrict__ ids, const bf16_t* __restrict__ table,
                                        float* __restrict__ out, int H) { gather_rows(ids, table, out, H); }
extern "C" __global__ void embed_gather_f32(const int* __restrict__ ids, const float* __restrict__ table,
                                            float* __restrict__ out, int H) { gather_rows(ids, table, out, H); }

extern "C" __global__ void rmsnorm_residual(const float* __restrict__ x, const float* res, const float* __restrict__ w,
                                            float* __restrict__ y, float* res_out, int H, float eps) {
  QT_PDL_ENTRY
  // values stay in registers between the two passes: up to 16 per thread (H <= 16 * blockDim.x)
  __shared__ float red[32];
  long long base = (long long)blockIdx.x * H;
  float v[16];
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    int i = threadIdx.x + j * blockDim.x;
    v[j] = 0.0f;
    if (i < H) {
      v[j] = x[base + i];
      if (res) v[j] += res[base + i];
      ss += v[j] * v[j];
    }
  }
  ss = block_sum(ss, red);
  float inv = rsqrtf(ss / (float)H + eps);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    int i = threadIdx.x + j * blockDim.x;
    if (i < H) {
      if (res_out) res_out[base + i] = v[j];
      y[base + i] = v[j] * inv * w[i];
    }
  }
}

extern "C" __global__ void silu_mul(const float* __restrict__ gu, float* __restrict__ out, int I) {
  QT_PDL_ENTRY
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= I) return;
  long long r = blockIdx.y;
  float g = gu[r * 2 * I + i], u = gu[r * 2 * I + I + i];
  out[r * I + i] = silu_mul1(g, u);
}
