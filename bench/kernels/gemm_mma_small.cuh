// gemm_mma_small<NT>: a prototype (not in the product) of the batched-decode fp8 linear for M = 9 .. 8 NT rows
// (NT = 2, 4, 8: up to 16, 32, 64): kernels_cuda/linear.cu's gemv_mma4p (FP8 weights x FP8 activations on the
// tensor cores, mma.sync m16n8k32 e4m3, f32 accumulate, the mma-tiled weight layout) with NT n-tiles of 8 batch rows
// instead of one, so every weight byte is read once for all M rows. Same fragments as gemv_mma4p: lane (g, t) loads
// 16 B of weight rows g and g + 8 at k = 16 t (+ 64 per round) and, per n-tile j, 16 B of x row 8 j + g at the same
// k; each (A, B) pair of registers feeds NT mma pairs. U = 4 rounds in flight for NT <= 2, else 2 (registers).
// Scales: per-tensor or per-row weight scale (ws[(o / sbo) * sld]) times per-row activation scale xs[m]: one
// multiply per accumulator at the end (the fp8 / fp8-rowwise recipes; fp8-block's per-128 groups are not handled
// here). Block = S warps (S K slices of one 16-row tile; dynamic shared memory S * NT * 512 B when S > 1), grid
// ceil(O / 16); warp 0 sums the slices in a fixed order (bias first) and writes y [M, ldy] (f32).
// Contract: include after common.cuh and mma_frag.cuh, with mma_e4m3 defined (linear.cu's QT_MMA_16X8 line).
#pragma once

template <int NT>
__global__ void __launch_bounds__(256) gemm_mma_small(const u8* __restrict__ xq, const float* __restrict__ xs,
    const u8* __restrict__ wq, const float* __restrict__ ws, const float* __restrict__ bias, float* __restrict__ y,
    int ldy, int M, int O, int K, int sld, int sbo, int kslice) {
  constexpr int U = NT <= 2 ? 4 : 2;
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, S = blockDim.x >> 5;
  int g = lane >> 2, t = lane & 3;
  int r0 = blockIdx.x * 16;
  int k0 = warp * kslice, k1 = min(K, k0 + kslice);
  int ra = r0 + g, rb = r0 + g + 8;
  bool va = ra < O, vb = rb < O;
  const u8* tw = wq + (long long)(r0 >> 4) * (K >> 6) * 1024 + lane * 16;
  QT_PDL_ENTRY
  float d[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) d[j][0] = d[j][1] = d[j][2] = d[j][3] = 0.f;
  if (r0 < O) {
    for (int kb = k0; kb < k1; kb += 64 * U) {
      uint4 A[U], B[U], X[U][NT];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        int k = kb + 64 * u + 16 * t;
        bool in = k < k1;
        uint4 z = make_uint4(0, 0, 0, 0);
        const u8* wa = tw + (long long)(k >> 6) * 1024;
        A[u] = (va && in) ? ld_stream((const uint4*)wa) : z;
        B[u] = (vb && in) ? ld_stream((const uint4*)(wa + 512)) : z;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          int m = 8 * j + g;
          X[u][j] = (m < M && in) ? *(const uint4*)(xq + (long long)m * K + k) : z;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          mma_e4m3(d[j], A[u].x, B[u].x, A[u].y, B[u].y, X[u][j].x, X[u][j].y);
          mma_e4m3(d[j], A[u].z, B[u].z, A[u].w, B[u].w, X[u][j].z, X[u][j].w);
        }
    }
  }
  float wa = va ? ws[(long long)(ra / sbo) * sld] : 0.f, wb = vb ? ws[(long long)(rb / sbo) * sld] : 0.f;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    int m0 = 8 * j + 2 * t, m1 = m0 + 1;
    float x0 = m0 < M ? xs[m0] : 0.f, x1 = m1 < M ? xs[m1] : 0.f;
    d[j][0] *= wa * x0; d[j][1] *= wa * x1; d[j][2] *= wb * x0; d[j][3] *= wb * x1;
  }
  float ba = (bias && va) ? bias[ra] : 0.0f, bb = (bias && vb) ? bias[rb] : 0.0f;
  if (S > 1) {                         // fixed order: bias first, then slices s = 0..S-1
    extern __shared__ float red[];     // [S][NT * 4][32]
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[(warp * NT * 4 + j * 4 + i) * 32 + lane] = d[j][i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float a4[4] = {ba, ba, bb, bb};
      for (int s = 0; s < S; ++s)
#pragma unroll
        for (int i = 0; i < 4; ++i) a4[i] += red[(s * NT * 4 + j * 4 + i) * 32 + lane];
#pragma unroll
      for (int i = 0; i < 4; ++i) d[j][i] = a4[i];
    }
    ba = bb = 0.0f;
  }
#pragma unroll
  for (int j = 0; j < NT; ++j) store_frag(y, ldy, ra, rb, va, vb, 8 * j + 2 * t, 8 * j + 2 * t + 1, M, d[j], ba, bb);
}

#define QT_GMS_ARGS const u8*, const float*, const u8*, const float*, const float*, float*, int, int, int, int, int, \
  int, int
template __global__ void gemm_mma_small<2>(QT_GMS_ARGS);
template __global__ void gemm_mma_small<4>(QT_GMS_ARGS);
template __global__ void gemm_mma_small<8>(QT_GMS_ARGS);
