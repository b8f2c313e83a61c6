// dequant.cu — a linear's weights decoded once into a scratch buffer for the cuBLAS prefill / batched-decode
// GEMMs (qtool/kernels/gemm.py). Formats and scale grids as linear.cu's header (F = 1 fp8, 2 nvfp4, 3 mxfp4,
// 4 int4, 5 mma-tiled fp8); the decoded value is wload1's float32 expression (the reference decode), rounded
// once to bf16 (round to nearest even).
// dequant_bf16<F>(..., O, K, ..., o0): rows o0 .. o0 + O - 1 of the weight into out bf16 [O, K] (row o0 at out row 0:
//   gemm.py decodes large layers in row chunks that stay in L2); one thread per 8 consecutive elements of a row (one
//   16-byte store). Needs K % 8 == 0 and, for fp8 / int4, scale blocks along K (sbi) that are multiples of 8.
// untile_fp8: mma-tiled fp8 codes (F = 5) -> row-major codes u8 [O, K]; one thread per 16 bytes.
#include "common.cuh"

__device__ __forceinline__ long long tiled_off(int o, int k, int K) {   // linear.cu's tiled_fp8_offset
  return (((long long)(o >> 4) * (K >> 6) + (k >> 6)) * 2 + ((o >> 3) & 1)) * 512 + ((o & 7) * 4 + ((k & 63) >> 4)) * 16
         + (k & 15);
}

template <int F>
__global__ void __launch_bounds__(256) dequant_bf16(const u8* __restrict__ w, const void* __restrict__ sc,
                                                    const float* __restrict__ zp, float gs, float s2,
                                                    bf16_t* __restrict__ out, int O, int K, int sld, int sbo,
                                                    int sbi, int o0) {
  pdl_wait();
  long long idx = (long long)blockIdx.x * 256 + threadIdx.x;
  int k8 = K >> 3;
  if (idx >= (long long)O * k8) return;
  int r = (int)(idx / k8), o = o0 + r, k = (int)(idx % k8) * 8;
  float v[8];
  if (F == 1 || F == 5) {
    uint2 raw = *(const uint2*)(w + (F == 1 ? (long long)o * K + k : tiled_off(o, k, K)));
    float s = ((const float*)sc)[(long long)(o / sbo) * sld + k / sbi];
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = e4m3_to_f32(((i < 4 ? raw.x : raw.y) >> (8 * (i & 3))) & 0xffu) * s;
  } else {
    unsigned raw = *(const unsigned*)(w + (long long)o * (K / 2) + k / 2);
    if (F == 2) {
      float s = e4m3_to_f32(((const u8*)sc)[(long long)o * (K / 16) + k / 16]);
#pragma unroll
      for (int i = 0; i < 8; i++) v[i] = e2m1_to_f32((raw >> (4 * i)) & 15u) * (s * gs);
    } else if (F == 3) {
      float s = e8m0_to_f32(((const u8*)sc)[(long long)o * (K / 32) + k / 32]);
#pragma unroll
      for (int i = 0; i < 8; i++) v[i] = e2m1_to_f32((raw >> (4 * i)) & 15u) * s;
    } else {
      long long g = (long long)o * sld + k / sbi;
      float s = ((const float*)sc)[g], z = zp[g];
#pragma unroll
      for (int i = 0; i < 8; i++) {
        float t = ((float)((raw >> (4 * i)) & 15u) - z) * s;
        v[i] = s2 != 0.0f ? e4m3_round(t / s2) * s2 : t;
      }
    }
  }
  uint4 st;
  st.x = (unsigned)f32_to_bf16(v[0]) | ((unsigned)f32_to_bf16(v[1]) << 16);
  st.y = (unsigned)f32_to_bf16(v[2]) | ((unsigned)f32_to_bf16(v[3]) << 16);
  st.z = (unsigned)f32_to_bf16(v[4]) | ((unsigned)f32_to_bf16(v[5]) << 16);
  st.w = (unsigned)f32_to_bf16(v[6]) | ((unsigned)f32_to_bf16(v[7]) << 16);
  *(uint4*)(out + (long long)r * K + k) = st;
}

template __global__ void dequant_bf16<1>(const u8*, const void*, const float*, float, float, bf16_t*, int, int, int,
                                         int, int, int);
template __global__ void dequant_bf16<2>(const u8*, const void*, const float*, float, float, bf16_t*, int, int, int,
                                         int, int, int);
template __global__ void dequant_bf16<3>(const u8*, const void*, const float*, float, float, bf16_t*, int, int, int,
                                         int, int, int);
template __global__ void dequant_bf16<4>(const u8*, const void*, const float*, float, float, bf16_t*, int, int, int,
                                         int, int, int);
template __global__ void dequant_bf16<5>(const u8*, const void*, const float*, float, float, bf16_t*, int, int, int,
                                         int, int, int);

extern "C" __global__ void __launch_bounds__(256) untile_fp8(const u8* __restrict__ w, u8* __restrict__ out, int O,
                                                             int K) {
  pdl_wait();
  long long idx = (long long)blockIdx.x * 256 + threadIdx.x;
  int k16 = K >> 4;
  if (idx >= (long long)O * k16) return;
  int o = (int)(idx / k16), k = (int)(idx % k16) * 16;
  *(uint4*)(out + (long long)o * K + k) = *(const uint4*)(w + tiled_off(o, k, K));
}
