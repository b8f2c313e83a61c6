// act_quant.cuh — activation quantization of one row held in registers (16 contiguous elements per thread),
// shared by act_quant.cu (act_quant_fast and the fused rmsnorm / silu_mul kernels) and attention.cu (the
// split-combine fused with the o-projection's input quantization). Schemes as in act_quant.cu's header.
#pragma once
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

// quantize one row held in registers (16 contiguous elements per thread starting at i0 = 16 t); the shared body of
// act_quant_fast and rmsnorm_quant. All threads of the block must call it (block reductions inside).
__device__ __forceinline__ void quant_row(float v[16], int r, int t, bool live, float* red, float* __restrict__ out,
                                          int K, int scheme, float ts,
                                          unsigned short* __restrict__ outh, float* __restrict__ hscale, int hperm,
                                          u8* __restrict__ outq, float* __restrict__ qscale) {
  int i0 = t * 16;
  float a16 = 0.0f;
#pragma unroll
  for (int j = 0; j < 16; ++j) a16 = fmaxf(a16, fabsf(v[j]));
  float S = 1.0f;  // the scale of this thread's elements (fp8 schemes: s; fp4: block scale)
  float sbv = 1.0f;  // nvfp4: S / g, the e4m3 block scale's value (1 / g where S falls back to 1)
  if (scheme == 1) S = ts;
  else if (scheme == 2) S = fmaxf(block_max(a16, red), 1e-12f) / 448.0f;
  else if (scheme == 3) {
    float a = a16;
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    S = fmaxf(a, 1e-4f) / 448.0f;  // groups past K only reach threads that are not live
  } else if (scheme == 4) {
    float g = ts;
    sbv = e4m3_round(a16 / (6.0f * g));
    S = sbv * g;
    if (!(S >= 1e-5f)) { S = 1.0f; sbv = fminf(1.0f / g, 8192.0f); }
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
  // hperm 3 (nvfp4, gemv_4bit.cu): outh = E2M1 * the e4m3 block scale (exact in f16), hscale = g, no qscale
  bool fold = outh && scheme == 4 && hperm == 3;
  bool fp4codes = outh && qscale && scheme >= 4 && !fold;
  if (fp4codes && live) {
    if (scheme == 4) qscale[(long long)r * (K / 16) + t] = S;
    else if ((t & 1) == 0) qscale[(long long)r * (K / 32) + t / 2] = S;
  }
  if (outh) {
    float up = 1.0f;
    if (fold) {
      if (t == 0) hscale[r] = ts;
#pragma unroll
      for (int j = 0; j < 16; ++j) v[j] = v[j] / S * sbv;  // exact: v = e2m1 * S
    } else if (fp4codes) {
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

// the static scale of schemes 1 and 4 (in_scale[0]); callers read it before pdl_wait (a constant)
__device__ __forceinline__ float static_scale(int scheme, const float* in_scale) {
  return (scheme == 1 || scheme == 4) && in_scale ? in_scale[0] : 1.0f;
}

// the tail of the fused kernels: dst[0..16) = v (the unquantized row part; dst null: not stored), v *= pqs, then
// quant_row
__device__ __forceinline__ void store_and_quant(float v[16], float* __restrict__ dst, const float* __restrict__ pqs,
                                                int r, int t, bool live, float* red, int K, int scheme,
                                                float ts, unsigned short* __restrict__ outh,
                                                float* __restrict__ hscale, int hperm, u8* __restrict__ outq,
                                                float* __restrict__ qscale) {
  int i0 = t * 16;
  if (live && dst) {
#pragma unroll
    for (int q = 0; q < 4; ++q) *(float4*)(dst + 4 * q) = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  }
  if (pqs && live) {
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] *= pqs[i0 + j];
  }
  quant_row(v, r, t, live, red, nullptr, K, scheme, ts, outh, hscale, hperm, outq, qscale);
}
