// kv_cache.cuh — KV-cache layout and element access shared by rope_kv.cu and attention.cu.
// Cache per layer, per K and V: codes [B, Hkv, L, D] (bf16 bits | e4m3 bytes) or, for nvfp4,
// codes u8 [B, Hkv, L, D/2] (element 2k = low nibble) + block scales e4m3 u8 [B, Hkv, L, D/16].
// kv_fmt: 0 = bf16, 1 = fp8 (value = code * scale), 2 = nvfp4 (value = E2M1[c] * (sb * g), g = scale / 6).
#pragma once
#include "common.cuh"

#define KV_BF16 0
#define KV_FP8 1
#define KV_NVFP4 2

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
#pragma unroll
    for (int i = 0; i < DPL; ++i) out[i] = e4m3_to_f32((w[i / 4] >> (8 * (i % 4))) & 0xffu) * scale;
  } else {
    const u8* p = (const u8*)codes + row * (D / 2) + d0 / 2;
    unsigned w = DPL == 2 ? (unsigned)*p : (DPL == 4 ? (unsigned)*(const unsigned short*)p : *(const unsigned*)p);
    float sg = e4m3_to_f32(scales[row * (D / 16) + d0 / 16]) * (scale / 6.0f);
#pragma unroll
    for (int i = 0; i < DPL; ++i) out[i] = e2m1_to_f32((w >> (4 * i)) & 15u) * sg;
  }
}
