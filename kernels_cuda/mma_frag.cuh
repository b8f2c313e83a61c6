// mma_frag.cuh — the pieces the decode GEMVs on the tensor cores share (linear.cu's gemv_mma* / gemv_h and
// gemv_4bit.cu): streaming 16-byte weight loads, L2 prefetch, f16x2 subtract / fma, the mma.sync m16n8 wrappers and the
// store of one accumulator fragment.
// Contract: header-only, no CUDA headers; the loader inlines it. Fragment layout of mma.sync m16n8k16 (lane = 4 g + t):
// A a0 = (row g, k 2t, 2t+1), a1 = (row g+8, same k), a2 = (row g, k 2t+8, 2t+9), a3 = (row g+8, same k);
// B b0 = (k 2t, 2t+1; column g), b1 = (k 2t+8, 2t+9; column g); D d0, d1 = (row g; columns 2t, 2t+1), d2, d3 = row g+8.
#pragma once
#include "common.cuh"

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ unsigned hsub2(unsigned a, unsigned b) {
  unsigned r; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r;
}
__device__ __forceinline__ unsigned hfma2(unsigned a, unsigned b, unsigned c) {
  unsigned r; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r;
}
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" :: "l"(p)); }

// d += A (16 x k, fragments a0..a3) x B (k x 8, b0, b1), f32 accumulators; SHAPE_TYPES names the mma.sync form
#define QT_MMA_16X8(NAME, SHAPE_TYPES)                                                                         \
  __device__ __forceinline__ void NAME(float d[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,        \
                                       unsigned b0, unsigned b1) {                                            \
    asm volatile("mma.sync.aligned." SHAPE_TYPES " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"    \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                            \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));                                    \
  }
QT_MMA_16X8(mma_f16, "m16n8k16.row.col.f32.f16.f16.f32")

// the 4 accumulators of an mma fragment, rows (ra, rb) x columns (m0, m1), + a per-row offset, into p [M, ld]
__device__ __forceinline__ void store_frag(float* p, int ld, int ra, int rb, bool va, bool vb, int m0, int m1,
                                           int M, const float acc[4], float ba, float bb) {
  if (va && m0 < M) p[(long long)m0 * ld + ra] = ba + acc[0];
  if (va && m1 < M) p[(long long)m1 * ld + ra] = ba + acc[1];
  if (vb && m0 < M) p[(long long)m0 * ld + rb] = bb + acc[2];
  if (vb && m1 < M) p[(long long)m1 * ld + rb] = bb + acc[3];
}

__device__ __forceinline__ unsigned e4m3x2_to_h2(unsigned v) {  // bytes 0, 1 of v -> f16x2 (exact)
  unsigned r;
  asm("{ .reg .b16 lo; cvt.u16.u32 lo, %1; cvt.rn.f16x2.e4m3x2 %0, lo; }" : "=r"(r) : "r"(v));
  return r;
}
