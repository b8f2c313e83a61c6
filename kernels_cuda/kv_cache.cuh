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
