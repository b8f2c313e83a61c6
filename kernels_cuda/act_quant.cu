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
#include "common.cuh"

__device__ __forceinline__ float fake_fp8(float x, float s) { return e4m3_to_f32(f32_to_e4m3(x / s)) * s; }

__device__ __forceinline__ float nvfp4_q(float x, float S) { return e2m1_to_f32(f32_to_e2m1(x / S)) * S; }

__device__ __forceinline__ float mx_exp(float amax) {  // clamp(ceil(log2(amax/6)), -127, 127) as 2^e
  float ratio = amax / 6.0f;
  if (!(ratio > 0.0f)) return e8m0_to_f32(0);
  int ex; float mant = frexpf(ratio, &ex);
  int e = mant == 0.5f ? ex - 1 : ex;
  e = max(-127, min(127, e));
  return e8m0_to_f32((unsigned)(e + 127));
}

extern "C" __global__ void act_quant(const float* __restrict__ x, int ldx, float* __restrict__ out, int ldo, int M,
                                     int K, int scheme, const float* __restrict__ in_scale,
                                     const float* __restrict__ pqs, unsigned short* __restrict__ outh,
                                     float* __restrict__ hscale, int hperm) {
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
// quantize one row held in registers (16 contiguous elements per thread starting at i0 = 16 t); the shared body of
// act_quant_fast and rmsnorm_quant. All threads of the block must call it (block reductions inside).
__device__ __forceinline__ void quant_row(float v[16], int r, int t, bool live, float* red, float* __restrict__ out,
                                          int K, int scheme, const float* __restrict__ in_scale,
                                          unsigned short* __restrict__ outh, float* __restrict__ hscale, int hperm,
                                          u8* __restrict__ outq, float* __restrict__ qscale) {
  int i0 = t * 16;
  float a16 = 0.0f;
#pragma unroll
  for (int j = 0; j < 16; ++j) a16 = fmaxf(a16, fabsf(v[j]));
  float S = 1.0f;  // the scale of this thread's elements (fp8 schemes: s; fp4: block scale)
  if (scheme == 1) S = in_scale[0];
  else if (scheme == 2) S = fmaxf(block_max(a16, red), 1e-12f) / 448.0f;
  else if (scheme == 3) {
    float a = a16;
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    S = fmaxf(a, 1e-4f) / 448.0f;  // groups past K only reach threads that are not live
  } else if (scheme == 4) {
    float g = in_scale[0];
    S = e4m3_round(a16 / (6.0f * g)) * g;
    if (!(S >= 1e-5f)) S = 1.0f;
  } else if (scheme == 5) {
    S = mx_exp(fmaxf(a16, __shfl_xor_sync(0xffffffffu, a16, 1)));
  }
  unsigned codes[4] = {0, 0, 0, 0};
  float amax_hat = 0.0f;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    float q = v[j];
    if (scheme == 1 || scheme == 2 || scheme == 3) {
      unsigned c = f32_to_e4m3(v[j] / S);
      codes[j >> 2] |= c << (8 * (j & 3));
      q = e4m3_to_f32(c) * S;
    } else if (scheme >= 4) {
      q = nvfp4_q(v[j], S);
    }
    v[j] = q;
    amax_hat = fmaxf(amax_hat, fabsf(q));
  }
  long long ob = (long long)r * K + i0;
  if (out && live) {
#pragma unroll
    for (int q = 0; q < 4; ++q) *(float4*)(out + ob + 4 * q) = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  }
  if (outq) {
    if (live) *(uint4*)(outq + ob) = make_uint4(codes[0], codes[1], codes[2], codes[3]);
    if (scheme == 3) { if (live && (t & 7) == 0) qscale[(long long)r * ((K + 127) / 128) + t / 8] = S; }
    else if (t == 0) qscale[r] = S;
  }
  bool fp4codes = outh && qscale && scheme >= 4;
  if (fp4codes && live) {
    if (scheme == 4) qscale[(long long)r * (K / 16) + t] = S;
    else if ((t & 1) == 0) qscale[(long long)r * (K / 32) + t / 2] = S;
  }
  if (outh) {
    float up = 1.0f;
    if (fp4codes) {
      if (t == 0) hscale[r] = 1.0f;
#pragma unroll
      for (int j = 0; j < 16; ++j) v[j] = v[j] / S;  // exact: v = e2m1 * S
    } else {
      float a = block_max(amax_hat, red);
      int ex = 0;
      if (a > 0.0f) frexpf(a, &ex);
      int k = max(-60, min(60, 8 - ex));
      up = ldexpf(1.0f, k);
      if (t == 0) hscale[r] = ldexpf(1.0f, -k);
    }
    unsigned hw[8];
#pragma unroll
    for (int p = 0; p < 16; p += 2) {
      int s0, s1;
      if (hperm == 1) { s0 = (p & ~3) + ((p & 3) == 0 ? 0 : 1); s1 = (p & ~3) + ((p & 3) == 0 ? 2 : 3); }
      else { s0 = (p & ~7) + ((p & 7) >> 1); s1 = s0 + 4; }
      unsigned short h0, h1;
      asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h0) : "f"(v[s0] * up));
      asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h1) : "f"(v[s1] * up));
      hw[p >> 1] = (unsigned)h0 | ((unsigned)h1 << 16);
    }
    if (live) {
      *(uint4*)(outh + ob) = make_uint4(hw[0], hw[1], hw[2], hw[3]);
      *(uint4*)(outh + ob + 8) = make_uint4(hw[4], hw[5], hw[6], hw[7]);
    }
  }
}

extern "C" __global__ void act_quant_fast(const float* __restrict__ x, int ldx, float* __restrict__ out, int M,
                                          int K, int scheme, const float* __restrict__ in_scale,
                                          const float* __restrict__ pqs, unsigned short* __restrict__ outh,
                                          float* __restrict__ hscale, int hperm, u8* __restrict__ outq,
                                          float* __restrict__ qscale) {
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
  quant_row(v, r, t, live, red, out, K, scheme, in_scale, outh, hscale, hperm, outq, qscale);
}

// the tail of the fused kernels: dst[0..16) = v (the unquantized row part), v *= pqs, then quant_row
__device__ __forceinline__ void store_and_quant(float v[16], float* __restrict__ dst, const float* __restrict__ pqs,
                                                int r, int t, bool live, float* red, int K, int scheme,
                                                const float* __restrict__ in_scale, unsigned short* __restrict__ outh,
                                                float* __restrict__ hscale, int hperm, u8* __restrict__ outq,
                                                float* __restrict__ qscale) {
  int i0 = t * 16;
  if (live) {
#pragma unroll
    for (int q = 0; q < 4; ++q) *(float4*)(dst + 4 * q) = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  }
  if (pqs && live) {
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] *= pqs[i0 + j];
  }
  quant_row(v, r, t, live, red, nullptr, K, scheme, in_scale, outh, hscale, hperm, outq, qscale);
}

// rmsnorm_quant: rmsnorm_residual (elementwise.cu) fused with act_quant_fast for the linear that reads its
// output: r = x + res; res_out = r; y = r * rsqrt(mean(r^2) + eps) * w; then y (* pqs) -> the quantized forms.
// out receives y (before pqs). grid M, block ceil(H/16) rounded to 32; H % 16 == 0, H <= 16 * blockDim.
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
  float inv = rsqrtf(ss / (float)H + eps);
#pragma unroll
  for (int j = 0; j < 16; ++j) v[j] = live ? v[j] * inv * w[i0 + j] : 0.0f;
  store_and_quant(v, y + base, pqs, r, t, live, red, H, scheme, in_scale, outh, hscale, hperm, outq, qscale);
}


// silu_mul_quant: elementwise.cu's silu_mul (out = silu(g) * u over gu f32 [M, 2I] = [gate | up]) fused with
// act_quant_fast for the linear that reads out (the down projection): the same expressions, so the same bits
// as silu_mul followed by act_quant_fast. out f32 [M, I] receives silu(g) * u (before pqs); quantized forms as
// act_quant_fast. grid M, block ceil(I/16) rounded to 32; I % 16 == 0, I <= 16 * blockDim.
extern "C" __global__ void silu_mul_quant(const float* __restrict__ gu, float* __restrict__ out, int I, int scheme,
                                          const float* __restrict__ in_scale, const float* __restrict__ pqs,
                                          unsigned short* __restrict__ outh, float* __restrict__ hscale, int hperm,
                                          u8* __restrict__ outq, float* __restrict__ qscale) {
  __shared__ float red[32];
  int r = blockIdx.x, t = threadIdx.x;
  int i0 = t * 16;
  bool live = i0 < I;
  const float* gr = gu + (long long)r * 2 * I + i0;
  float v[16];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float4 a = live ? *(const float4*)(gr + 4 * q) : make_float4(0.f, 0.f, 0.f, 0.f);
    float4 b = live ? *(const float4*)(gr + I + 4 * q) : make_float4(0.f, 0.f, 0.f, 0.f);
    v[4 * q] = a.x / (1.0f + expf(-a.x)) * b.x; v[4 * q + 1] = a.y / (1.0f + expf(-a.y)) * b.y;
    v[4 * q + 2] = a.z / (1.0f + expf(-a.z)) * b.z; v[4 * q + 3] = a.w / (1.0f + expf(-a.w)) * b.w;
  }
  store_and_quant(v, out + (long long)r * I + i0, pqs, r, t, live, red, I, scheme, in_scale, outh, hscale, hperm,
                  outq, qscale);
}
