// act_quant.cu — activation quantization x -> x̂ (float32 out) for every recipe, docs/numerics.md and
// qtool/formats/activations.py. One kernel, one block (256..1024 threads) per row (grid M); for the dynamic
// per-tensor fallback (scheme fp8 or nvfp4 without input_scale) launch grid 1: the block covers all rows.
// x f32 [M, ldx]; out f32 [M, ldo]; pqs f32 [K] or null (x *= pqs first); in_scale f32 [1] or null.
// Optional f16 copy for linear.cu's gemv_h: outh f16 [M, K] = x̂ * 2^k per row (k = 8 - ceil(log2(amax x̂)),
// so |outh| <= 256), hscale f32 [M] = 2^-k, stored in pair order hperm (1: within each 4 [0,2,1,3];
// 2: within each 8 [0,4,1,5,2,6,3,7]), matching the weight decoders' pair order. Needs K % 8 == 0.
// scheme: 0 none (pqs only), 1 fp8 per-tensor static, 2 fp8 per token, 3 fp8 per token x 128-channel group,
//         4 nvfp4 (global g = in_scale, 16-blocks), 5 mxfp4 (32-blocks, E8M0).
// Group schemes need K % group == 0 except fp8-block (last group may be short).
#include "act_quant.cuh"

extern "C" __global__ void act_quant(const float* __restrict__ x, int ldx, float* __restrict__ out, int ldo, int M,
                                     int K, int scheme, const float* __restrict__ in_scale,
                                     const float* __restrict__ pqs, unsigned short* __restrict__ outh,
                                     float* __restrict__ hscale, int hperm) {
  QT_PDL_ENTRY
  __shared__ float red[32];
  int r0 = blockIdx.x, r1 = blockIdx.x + 1;
  float ts = 0.0f;
  if ((scheme == 1 || scheme == 4) && in_scale == nullptr) {
    r0 = 0; r1 = M;
    float a = 0.0f;
    for (int r = 0; r < M; ++r)
      for (int i = threadIdx.x; i < K; i += blockDim.x) {
        float v = x[(long long)r * ldx + i];
        if (pqs) v *= pqs[i];
        a = fmaxf(a, fabsf(v));
      }
    a = block_max(a, red);
    if (scheme == 1) ts = fmaxf(a, 1e-12f) / 448.0f;
    else { ts = a / 2688.0f; if (!(ts > 0.0f)) ts = 1e-12f; }
  } else if (scheme == 1 || scheme == 4) {
    ts = in_scale[0];
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int r = r0; r < r1; ++r) {
    const float* xr = x + (long long)r * ldx;
    float* orow = out + (long long)r * ldo;
    if (scheme <= 1) {
      for (int i = threadIdx.x; i < K; i += blockDim.x) {
        float v = xr[i];
        if (pqs) v *= pqs[i];
        orow[i] = scheme == 0 ? v : fake_fp8(v, ts);
      }
    } else if (scheme == 2) {
      float a = 0.0f;
      for (int i = threadIdx.x; i < K; i += blockDim.x) a = fmaxf(a, fabsf(pqs ? xr[i] * pqs[i] : xr[i]));
      float s = fmaxf(block_max(a, red), 1e-12f) / 448.0f;
      for (int i = threadIdx.x; i < K; i += blockDim.x) orow[i] = fake_fp8(pqs ? xr[i] * pqs[i] : xr[i], s);
    } else {
      int G = scheme == 3 ? 128 : (scheme == 4 ? 16 : 32);
      int ngroups = (K + G - 1) / G;
      for (int gi = warp; gi < ngroups; gi += nw) {
        float v[4];
        float a = 0.0f;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          int j = lane + 32 * t, i = gi * G + j;
          v[t] = 0.0f;
          if (j < G && i < K) { v[t] = pqs ? xr[i] * pqs[i] : xr[i]; a = fmaxf(a, fabsf(v[t])); }
        }
        a = warp_max(a);
        float S;
        if (scheme == 3) S = fmaxf(a, 1e-4f) / 448.0f;
        else if (scheme == 4) { S = e4m3_round(a / (6.0f * ts)) * ts; if (!(S >= 1e-5f)) S = 1.0f; }
        else S = mx_exp(a);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          int j = lane + 32 * t, i = gi * G + j;
          if (j < G && i < K) orow[i] = scheme == 3 ? fake_fp8(v[t], S) : nvfp4_q(v[t], S);
        }
      }
    }
    if (outh) {
      __syncthreads();  // this row of `out` was written by other threads of the block
      float a = 0.0f;
      for (int i = threadIdx.x; i < K; i += blockDim.x) a = fmaxf(a, fabsf(orow[i]));
      a = block_max(a, red);
      int ex = 0;
      if (a > 0.0f) frexpf(a, &ex);
      int k = 8 - ex;
      k = max(-60, min(60, k));
      float up = ldexpf(1.0f, k);
      if (threadIdx.x == 0) hscale[r] = ldexpf(1.0f, -k);
      unsigned short* hrow = outh + (long long)r * K;
      for (int p = threadIdx.x; p < K; p += blockDim.x) {
        int q = p & 7, src;
        if (hperm == 1) src = (p & ~3) + ((p & 3) == 1 ? 2 : ((p & 3) == 2 ? 1 : (p & 3)));
        else if (hperm == 2) src = (p & ~7) + ((q & 1) ? 4 + (q >> 1) : (q >> 1));
        else src = p;
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(orow[src] * up));
        hrow[p] = h;
      }
      __syncthreads();
    }
  }
}

// act_quant_fast: the same numerics for the common case (K % 16 == 0, K <= 16 * blockDim.x, scheme 0..5 with a
// static scale where one is expected), values in registers, 16 contiguous elements per thread (so a 16-group is
// one thread, a 32-group two, a 128-group eight: group amax by shuffles). grid M, block ceil(K/16) rounded to 32.
// Outputs (each optional): out f32 x̂ [M, K]; outh/hscale as above (hperm 1 or 2); outq e4m3 codes of x / s
// [M, K] with qscale (scheme 1, 2: [M] = s; scheme 3: [M, ceil(K/128)] = s per group), for linear.cu's gemv_mma.
// Schemes 4/5 with outh and qscale: outh holds the exact E2M1 values (no 2^k factor, hscale = 1) and qscale the
// block scales S [M, K/16] (nvfp4) or [M, K/32] (mxfp4), so gemv_h's f16 products and 8-term sums are exact.
// Scheme 4 with hperm 3 (gemv_4bit.cu's gemv_q4): outh = E2M1 * the e4m3 block scale value (exact in f16; 1 / g,
// capped at 8192, where S falls back to 1), hscale = g (the global scale), pair order as hperm 2; qscale unused.
extern "C" __global__ void act_quant_fast(const float* __restrict__ x, int ldx, float* __restrict__ out, int M,
                                          int K, int scheme, const float* __restrict__ in_scale,
                                          const float* __restrict__ pqs, unsigned short* __restrict__ outh,
                                          float* __restrict__ hscale, int hperm, u8* __restrict__ outq,
                                          float* __restrict__ qscale) {
  float ts = static_scale(scheme, in_scale);
  QT_PDL_ENTRY
  __shared__ float red[32];
  int r = blockIdx.x, t = threadIdx.x;
  int i0 = t * 16;
  bool live = i0 < K;
  const float* xr = x + (long long)r * ldx;
  float v[16];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float4 a = live ? *(const float4*)(xr + i0 + 4 * q) : make_float4(0.f, 0.f, 0.f, 0.f);
    v[4 * q] = a.x; v[4 * q + 1] = a.y; v[4 * q + 2] = a.z; v[4 * q + 3] = a.w;
  }
  if (pqs && live) {
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] *= pqs[i0 + j];
  }
  quant_row(v, r, t, live, red, out, K, scheme, ts, outh, hscale, hperm, outq, qscale);
}

// rmsnorm_quant: rmsnorm_residual (elementwise.cu) fused with act_quant_fast for the linear that reads its
// output: r = x + res; res_out = r; y = r * rsqrt(mean(r^2) + eps) * w; then y (* pqs) -> the quantized forms.
// y receives the normalised row (before pqs; y null: not stored, only the quantized forms). grid M, block ceil(H/16) rounded to 32; H % 16 == 0, H <= 16 * blockDim.
extern "C" __global__ void rmsnorm_quant(const float* __restrict__ x, const float* res, const float* __restrict__ w,
                                         float eps, float* __restrict__ y, float* res_out, int H, int scheme,
                                         const float* __restrict__ in_scale, const float* __restrict__ pqs,
                                         unsigned short* __restrict__ outh, float* __restrict__ hscale, int hperm,
                                         u8* __restrict__ outq, float* __restrict__ qscale) {
  __shared__ float red[32];
  int r = blockIdx.x, t = threadIdx.x;
  int i0 = t * 16;
  bool live = i0 < H;
  long long base = (long long)r * H + i0;
  // constants first (the norm weights, the static scale): read while the previous kernel may still run
  float wv[16];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float4 a = live ? *(const float4*)(w + i0 + 4 * q) : make_float4(0.f, 0.f, 0.f, 0.f);
    wv[4 * q] = a.x; wv[4 * q + 1] = a.y; wv[4 * q + 2] = a.z; wv[4 * q + 3] = a.w;
  }
  float ts = static_scale(scheme, in_scale);
  pdl_wait();   // the next GEMV is triggered once this kernel's loads are done (below): run 30, +0.7 %
  float v[16];
  float ss = 0.0f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float4 a = live ? *(const float4*)(x + base + 4 * q) : make_float4(0.f, 0.f, 0.f, 0.f);
    if (res && live) {
      float4 b = *(const float4*)(res + base + 4 * q);
      a.x += b.x; a.y += b.y; a.z += b.z; a.w += b.w;
    }
    v[4 * q] = a.x; v[4 * q + 1] = a.y; v[4 * q + 2] = a.z; v[4 * q + 3] = a.w;
    if (res_out && live) *(float4*)(res_out + base + 4 * q) = a;
  }
#pragma unroll
  for (int j = 0; j < 16; ++j) ss += v[j] * v[j];
  ss = block_sum(ss, red);
  pdl_trigger();
  float inv = rsqrtf(ss / (float)H + eps);
#pragma unroll
  for (int j = 0; j < 16; ++j) v[j] = live ? v[j] * inv * wv[j] : 0.0f;
  store_and_quant(v, y ? y + base : nullptr, pqs, r, t, live, red, H, scheme, ts, outh, hscale, hperm, outq, qscale);
}


// silu_mul_quant: elementwise.cu's silu_mul (out = silu(g) * u over gu f32 [M, 2I] = [gate | up]) fused with
// act_quant_fast for the linear that reads out (the down projection): the same expressions, so the same bits
// as silu_mul followed by act_quant_fast. Schemes whose scales are local to 16..128 elements (1, 3, 4 and 5 without outh)
// may run a row over several blocks (grid (M, nb), each block.x threads covering 16 * block.x elements). out f32 [M, I] receives silu(g) * u (before pqs; null: not stored); quantized forms as
// act_quant_fast. grid M, block ceil(I/16) rounded to 32; I % 16 == 0, I <= 16 * blockDim.
extern "C" __global__ void silu_mul_quant(const float* __restrict__ gu, float* __restrict__ out, int I, int scheme,
                                          const float* __restrict__ in_scale, const float* __restrict__ pqs,
                                          unsigned short* __restrict__ outh, float* __restrict__ hscale, int hperm,
                                          u8* __restrict__ outq, float* __restrict__ qscale) {
  float ts = static_scale(scheme, in_scale);
  QT_PDL_ENTRY
  __shared__ float red[32];
  int r = blockIdx.x, t = blockIdx.y * blockDim.x + threadIdx.x;  // t: 16-element slot of the row
  int i0 = t * 16;
  bool live = i0 < I;
  const float* gr = gu + (long long)r * 2 * I + i0;
  float v[16];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float4 a = live ? *(const float4*)(gr + 4 * q) : make_float4(0.f, 0.f, 0.f, 0.f);
    float4 b = live ? *(const float4*)(gr + I + 4 * q) : make_float4(0.f, 0.f, 0.f, 0.f);
    v[4 * q] = silu_mul1(a.x, b.x); v[4 * q + 1] = silu_mul1(a.y, b.y);
    v[4 * q + 2] = silu_mul1(a.z, b.z); v[4 * q + 3] = silu_mul1(a.w, b.w);
  }
  store_and_quant(v, out ? out + (long long)r * I + i0 : nullptr, pqs, r, t, live, red, I, scheme, ts, outh, hscale, hperm,
                  outq, qscale);
}
