// common.cuh — device helpers shared by every qtool kernel.
// Contract: header-only, no CUDA headers (NVRTC and nvcc both build it bare); the loader inlines it.
// bf16 is carried as raw bits (unsigned short). fp8 = float8_e4m3fn, fp4 = e2m1; numerics per docs/numerics.md.
// Fast weight decoders ("fast_*") map packed codes to f32 values times a fixed power of two
// (fp8: 2^-8, e2m1: 2^-14), which the caller folds into its scale; scalar decoders are exact.
#pragma once

typedef unsigned short bf16_t;
typedef unsigned char u8;

#define QT_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16_t)(u >> 16);
}
__device__ __forceinline__ float h2f(unsigned short h) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ void h2x2f(unsigned v, float& lo, float& hi) {
  lo = h2f((unsigned short)(v & 0xffffu)); hi = h2f((unsigned short)(v >> 16));
}

// Programmatic dependent launch (sm_90+; no-ops when the kernel was launched without the attribute, and on
// older GPUs). Every qtool kernel calls pdl_wait() in every block before it reads anything an earlier kernel
// wrote or writes anything (so a kernel launched early by qtool/kernels/pdl.py is ordered as if it were not),
// and pdl_trigger() to let the next kernel be scheduled once all of its blocks have started (rmsnorm_quant
// and attn_combine_heads: once their loads are done).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#define QT_PDL_ENTRY pdl_wait(); pdl_trigger();
// exact scalar e4m3fn decode
__device__ __forceinline__ float e4m3_to_f32(unsigned c) {
  unsigned e = (c >> 3) & 15u, m = c & 7u;
  float v;
  if (e == 0) v = (float)m * (1.0f / 512.0f);
  else if (e == 15u && m == 7u) v = __int_as_float(0x7fc00000);
  else v = __uint_as_float(((e + 120u) << 23) | (m << 20));
  return (c & 0x80u) ? -v : v;
}
// e4m3(v): saturate to +-448, round to nearest even (sm_89+ cvt); returns the code byte
__device__ __forceinline__ unsigned f32_to_e4m3(float v) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(v));
  return (unsigned)(r & 0xffu);
}
__device__ __forceinline__ float e4m3_round(float v) { return e4m3_to_f32(f32_to_e4m3(v)); }

// E2M1 table value of a 4-bit code (exact)
__device__ __forceinline__ float e2m1_to_f32(unsigned c) {
  unsigned e = (c >> 1) & 3u, m = c & 1u;
  float v = e == 0 ? 0.5f * (float)m : __uint_as_float(((e + 126u) << 23) | (m << 22));
  return (c & 8u) ? -v : v;
}
// e2m1(v): nearest of {0,.5,1,1.5,2,3,4,6}, ties to even code, saturating at 6; returns the 4-bit code
__device__ __forceinline__ unsigned f32_to_e2m1(float v) {
  float a = fabsf(v);
  unsigned c;
  if (a <= 0.25f) c = 0; else if (a < 0.75f) c = 1; else if (a <= 1.25f) c = 2; else if (a < 1.75f) c = 3;
  else if (a <= 2.5f) c = 4; else if (a < 3.5f) c = 5; else if (a <= 5.0f) c = 6; else c = 7;
  return c | ((__float_as_uint(v) >> 28) & 8u);
}
__device__ __forceinline__ float e8m0_to_f32(unsigned s) {  // 2^(s-127)
  if (s == 0) return __uint_as_float(0x00400000u);
  return __uint_as_float(s << 23);
}

// fast decode: 4 fp8 codes in w -> f16x2 pairs (elements 0,2) and (1,3), value * 2^-8
__device__ __forceinline__ void fp8x4_to_h2(unsigned w, unsigned& h02, unsigned& h13) {
  h02 = ((w << 7) & 0x3f803f80u) | ((w << 8) & 0x80008000u);
  h13 = ((w >> 1) & 0x3f803f80u) | (w & 0x80008000u);
}
// fast decode: 8 e2m1 codes in w (element k = nibble k) -> pairs (k, k+4) for k=0..3, value * 2^-14
__device__ __forceinline__ void fp4x8_to_h2(unsigned w, unsigned h[4]) {
  h[0] = ((w << 9) & 0x0e000e00u) | ((w << 12) & 0x80008000u);
  h[1] = ((w << 5) & 0x0e000e00u) | ((w << 8) & 0x80008000u);
  h[2] = ((w << 1) & 0x0e000e00u) | ((w << 4) & 0x80008000u);
  h[3] = ((w >> 3) & 0x0e000e00u) | (w & 0x80008000u);
}
// fast decode: 8 unsigned int4 codes in w -> pairs (k, k+4) as f16 (1024 + u)
__device__ __forceinline__ void u4x8_to_h2(unsigned w, unsigned h[4]) {
  h[0] = (w & 0x000f000fu) | 0x64006400u;
  h[1] = ((w >> 4) & 0x000f000fu) | 0x64006400u;
  h[2] = ((w >> 8) & 0x000f000fu) | 0x64006400u;
  h[3] = ((w >> 12) & 0x000f000fu) | 0x64006400u;
}

// silu(g) * u, the one expression of silu_mul, silu_mul_quant and gemv_mma4's fused epilogue (same bits everywhere)
__device__ __forceinline__ float silu_mul1(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// block-wide reductions; `red` is >= 32 floats of shared memory; all threads get the result
__device__ __forceinline__ float block_sum(float v, float* red) {
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[wid] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : 0.0f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* red) {
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[wid] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : -QT_INF;
  return warp_max(v);
}
