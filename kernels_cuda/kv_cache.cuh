// kv_cache.cuh — KV-cache layout and element access shared by rope_kv.cu and attention.cu.
// Writes quantize as rope_kv.cu's header states (kv_store there per element; kv_store_vec here per lane).
// Cache per layer, per K and V: codes [B, Hkv, L, D] (bf16 bits | e4m3 bytes) or, for nvfp4,
// codes u8 [B, Hkv, L, D/2] (element 2k = low nibble) + block scales e4m3 u8 [B, Hkv, L, D/16].
// Paged (serving): the same per-row layout over a pool of blocks, [num_blocks, Hkv, bs, ...]; position p of batch
// row b lives in block bt[b * bt_ld + p / bs] (an int32 block table), slot p % bs (PagedRows below).
// kv_fmt: 0 = bf16, 1 = fp8 (value = code * scale), 2 = nvfp4 (value = E2M1[c] * (sb * g), g = scale / 6).
#pragma once
#include "common.cuh"

#define KV_BF16 0
#define KV_FP8 1
#define KV_NVFP4 2

// the cache rows of positions c0 + j of one (batch row, KV head) pair of a paged cache (bt: that row's table)
struct PagedRows {
  const int* bt;
  int c0, bs, Hkv, h;
  __device__ __forceinline__ long long at(int j) const {
    int p = c0 + j;
    return ((long long)bt[p / bs] * Hkv + h) * bs + p % bs;
  }
};
__device__ __forceinline__ PagedRows paged_rows(const int* bt, int bt_ld, int bs, long long b, int h, int Hkv,
                                                int c0) {
  PagedRows r;
  r.bt = bt + b * bt_ld; r.c0 = c0; r.bs = bs; r.Hkv = Hkv; r.h = h;
  return r;
}

// value of element d of the cache row starting at `row` (row index = (b*Hkv + h)*L + p)
__device__ __forceinline__ float kv_load(int fmt, const void* codes, const u8* scales, long long row, int D, int d,
                                         float scale) {
  if (fmt == KV_BF16) return bf16_to_f32(((const bf16_t*)codes)[row * D + d]);
  if (fmt == KV_FP8) return e4m3_to_f32(((const u8*)codes)[row * D + d]) * scale;
  unsigned byte = ((const u8*)codes)[row * (D / 2) + d / 2];
  float sb = e4m3_to_f32(scales[row * (D / 16) + d / 16]);
  float g = scale / 6.0f;
  return e2m1_to_f32((byte >> (4 * (d & 1))) & 15u) * (sb * g);
}

// the DPL contiguous elements [d0, d0 + DPL) of a cache row with one vector load (DPL in {2, 4, 8}, d0 % DPL == 0)
template <int DPL>
__device__ __forceinline__ void kv_load_vec(int fmt, const void* codes, const u8* scales, long long row, int D,
                                            int d0, float scale, float out[DPL]) {
  if (fmt == KV_BF16) {
    const bf16_t* p = (const bf16_t*)codes + row * D + d0;
    unsigned w[DPL / 2];
    if (DPL == 2) w[0] = *(const unsigned*)p;
    else if (DPL == 4) { uint2 t = *(const uint2*)p; w[0] = t.x; w[1] = t.y; }
    else { uint4 t = *(const uint4*)p; w[0] = t.x; w[1] = t.y; w[2] = t.z; w[3] = t.w; }
#pragma unroll
    for (int i = 0; i < DPL / 2; ++i) { out[2 * i] = __uint_as_float(w[i] << 16); out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u); }
  } else if (fmt == KV_FP8) {
    const u8* p = (const u8*)codes + row * D + d0;
    unsigned w[2];
    if (DPL == 2) w[0] = *(const unsigned short*)p;
    else if (DPL == 4) w[0] = *(const unsigned*)p;
    else { uint2 t = *(const uint2*)p; w[0] = t.x; w[1] = t.y; }
    // v12: the f16 bit decode (value * 2^-8, exact, subnormals included) instead of the scalar decoder's
    // branches; (v * 2^-8) * (scale * 2^8) rounds as v * scale does, so the same bits as kv_load
    float s8 = scale * 256.0f;
#pragma unroll
    for (int j = 0; j < (DPL + 3) / 4; ++j) {
      unsigned h02, h13;
      fp8x4_to_h2(w[j], h02, h13);
      float e0, e1, e2, e3;
      h2x2f(h02, e0, e2); h2x2f(h13, e1, e3);
      out[4 * j] = e0 * s8; out[4 * j + 1] = e1 * s8;
      if (4 * j + 2 < DPL) { out[4 * j + 2] = e2 * s8; out[4 * j + 3] = e3 * s8; }
    }
  } else {
    const u8* p = (const u8*)codes + row * (D / 2) + d0 / 2;
    unsigned w = DPL == 2 ? (unsigned)*p : (DPL == 4 ? (unsigned)*(const unsigned short*)p : *(const unsigned*)p);
    float sg = e4m3_to_f32(scales[row * (D / 16) + d0 / 16]) * (scale / 6.0f);
    // v12: the f16 bit decode (pairs (k, k + 4), value * 2^-14, exact), folded into the scale as above
    float s14 = sg * 16384.0f;
    unsigned h[4];
    fp4x8_to_h2(w, h);
#pragma unroll
    for (int i = 0; i < DPL; ++i) out[i] = h2f((unsigned short)(i < 4 ? h[i] & 0xffffu : h[i - 4] >> 16)) * s14;
  }
}

// store DPL contiguous elements x = row[d0, d0 + DPL) (DPL in {2, 4, 8}, d0 % DPL == 0), the lanes holding one row
// in order (lane l: d0 = l * DPL); rope_kv.cu's kv_store quantization, bit for bit. nvfp4: the 16-element
// block's amax is reduced over the 16 / DPL lanes sharing it (all 32 lanes must call it).
template <int DPL>
__device__ __forceinline__ void kv_store_vec(int fmt, void* codes, u8* scales, long long row, int D, int d0,
                                             const float x[DPL], float scale) {
  if (fmt == KV_BF16) {
    unsigned w[DPL / 2];
#pragma unroll
    for (int i = 0; i < DPL / 2; ++i) w[i] = (unsigned)f32_to_bf16(x[2 * i]) | ((unsigned)f32_to_bf16(x[2 * i + 1]) << 16);
    bf16_t* p = (bf16_t*)codes + row * D + d0;
    if (DPL == 2) *(unsigned*)p = w[0];
    else if (DPL == 4) *(uint2*)p = make_uint2(w[0], w[DPL > 2 ? 1 : 0]);
    else *(uint4*)p = make_uint4(w[0], w[DPL > 2 ? 1 : 0], w[DPL > 4 ? 2 : 0], w[DPL > 4 ? 3 : 0]);
    return;
  }
  if (fmt == KV_FP8) {
    unsigned w[2] = {0u, 0u};
#pragma unroll
    for (int i = 0; i < DPL; ++i) w[i / 4] |= f32_to_e4m3(x[i] / scale) << (8 * (i % 4));
    u8* p = (u8*)codes + row * D + d0;
    if (DPL == 2) *(unsigned short*)p = (unsigned short)w[0];
    else if (DPL == 4) *(unsigned*)p = w[0];
    else *(uint2*)p = make_uint2(w[0], w[1]);
    return;
  }
  float g = scale / 6.0f;
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < DPL; ++i) amax = fmaxf(amax, fabsf(x[i]));
#pragma unroll
  for (int o = 1; o < 16 / DPL; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  unsigned sbc = f32_to_e4m3(amax / (6.0f * g));
  float S = e4m3_to_f32(sbc) * g;
  unsigned w = 0u;
#pragma unroll
  for (int i = 0; i < DPL; ++i) w |= (S >= 1e-5f ? f32_to_e2m1(x[i] / S) : 0u) << (4 * i);
  u8* p = (u8*)codes + row * (D / 2) + d0 / 2;
  if (DPL == 2) *p = (u8)w;
  else if (DPL == 4) *(unsigned short*)p = (unsigned short)w;
  else *(unsigned*)p = w;
  if (d0 % 16 == 0) scales[row * (D / 16) + d0 / 16] = (u8)sbc;
}
