// attention.cu — split-sequence (flash-decoding style) attention over the KV cache, grouped-query heads.
// One kernel serves decode and prefill: query row n = b*T + t attends to cache positions [0, pos[n]] of batch
// row b = n / T (the causal mask).
//
// attn_partial<D, PU, GM, KF>(q f32 rows [N, ldq] holding Hq*D, ldq, pos int64 [N], T, K/V cache (kv_cache.cuh
//     layout, L = max_len), kv_fmt (== KF, the cache format the instantiation is compiled for), k_scale, v_scale, part f32 [N, Hq, S, D], ml f32 [N, Hq, S, 2], Hq, Hkv, L,
//     chunk, sm_scale, rope: kr [N, ldk] / vr [N, ldv] / cos / sin or null)
//     With cos non-null (decode, T = 1; v10): q is the unrotated query; every block applies RoPE to its G query
//     heads in registers (rope_kv_write's expression), and the block whose split holds position p = pos[n] first
//     writes rope(k) and v of its KV head at p into the cache (rope_kv_write's quantization, kv_store_vec) and
//     reads them back after a block barrier, so rope_kv_write is not launched. kr / vr: the unrotated k / v rows
//     (views of the qkv output are fine). Without: q is rope_kv_write's rotated q_out (ldq = Hq * D).
//     early (with cos; v10): pos, each warp's first PU K and V rows and the RoPE factors are loaded before the PDL
//     wait (overlapping the qkv GEMV): legal only when the kernel before it writes none of them (pos not
//     converted by a copy kernel; the cache rows < p written by earlier steps); row p is re-read after its write.
//     grid (N * Hkv, S), block 128 (4 warps); block (n*Hkv + kh, s) covers positions [s*chunk, (s+1)*chunk)
//     (chunk <= 128) and all G = Hq/Hkv (<= GM, GM in {4, 8}, PU * GM >= 32) query heads of KV head kh (GM: the
//     unrolled head count; GM = 4 carries half the registers and FMAs of 8 where G <= 4). Three phases, no serial chain per
//     position: (1) scores: each warp takes every 4th position, PU positions' K rows loaded at once, the
//     PU x 8 dot products (position, head) reduced across the warp together (transpose-reduce), into shared memory; (2) per head: max m and e = exp(s - m), l = sum e;
//     (3) each warp accumulates e * V over its positions (PU V rows loaded at once), the 4 warps are summed
//     in shared memory. Writes unnormalised acc, m and l (m = -inf when its range is empty). D in {64, 128, 256}.
// attn_combine(part, ml, out f32 [N, Hq*D] or null, S, D, HD = Hq*D, scheme + act_quant_fast's outputs): grid N,
//     block ceil(HD/16) rounded to 32 (HD % 16 == 0, HD <= 16384): merges the splits, normalises; with scheme > 0
//     also quantizes the row for the o projection (act_quant.cuh), in the same launch (scheme 0: merge only).
//     Schemes whose scales are local to 16..128 elements (0, 1, 3) may spread a row over several blocks:
//     grid (N, nb), each block.x threads covering 16 * block.x elements (as silu_mul_quant).
// attn_combine_heads (v9; same arguments): the merge for schemes local to one head (0, 1; 3 when D % 128 == 0),
//     parallel over splits: grid (N, Hq), block 128 = NS = D/16 slots of 16 elements x P = 128/NS groups of
//     splits. Thread (group p, slot) merges splits [p S / P, (p+1) S / P) with a running max (m_s loaded with
//     the part values: one L2 round trip per 4 splits, no separate max pass); the groups meet in shared memory
//     (max, rescale, summed in order p = 0..P-1); warp 0 normalises the head's NS slots and hands them to
//     store_and_quant (slot h*NS + lane of the row). Same math as attn_combine, another summation order.
#include "kv_cache.cuh"
#include "act_quant.cuh"

#define CMAX 128

// cp.async (sm_80+): N bytes global -> shared without a register round trip; .cg (L2 only) for 16-byte pieces
template <int N>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
  unsigned s;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(smem));
  if (N == 16) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(s), "l"(gmem) : "memory");
  else asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" :: "r"(s), "l"(gmem), "n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// code / scale bytes of one cache row of D elements in format KF (kv_cache.cuh's layout)
template <int D, int KF> struct RowBytes {
  static constexpr int codes = KF == KV_BF16 ? 2 * D : (KF == KV_FP8 ? D : D / 2);
  static constexpr int scales = KF == KV_NVFP4 ? D / 16 : 0;
};

// rows j0 + u*4 (u < PU, those < np) of one KV head's cache (K or V), DPL elements per lane, into r[u]
template <int D, int PU>
__device__ __forceinline__ void load_rows(int kv_fmt, const void* codes, const u8* scales, long long rowbase,
                                          int j0, int np, int lane, float scale, float r[PU][D / 32]) {
#pragma unroll
  for (int u = 0; u < PU; ++u) {
    int j = j0 + u * 4;
    if (j < np) kv_load_vec<D / 32>(kv_fmt, codes, scales, rowbase + j, D, lane * (D / 32), scale, r[u]);
  }
}

// load_rows, or (pre: the rows this warp loaded before the PDL wait, attn_partial's early) a copy of pre
template <int D, int PU>
__device__ __forceinline__ void rows_or_pre(bool use_pre, const float pre[PU][D / 32], int kv_fmt, const void* codes,
                                            const u8* scales, long long rowbase, int j0, int np, int lane,
                                            float scale, float r[PU][D / 32]) {
  if (use_pre) {
#pragma unroll
    for (int u = 0; u < PU; ++u)
#pragma unroll
      for (int i = 0; i < D / 32; ++i) r[u][i] = pre[u][i];
  } else {
    load_rows<D, PU>(kv_fmt, codes, scales, rowbase, j0, np, lane, scale, r);
  }
}

// one step of the warp transpose-reduce over the first N values: keep the half picked by lane bit O, add the
// partner's copy of it (values N/2 .. N-1 are dead afterwards)
template <int N, int O>
__device__ __forceinline__ void bfly_step(float* val, int lane) {
  bool upper = (lane & O) != 0;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    float send = upper ? val[i] : val[i + N / 2];
    float keep = upper ? val[i + N / 2] : val[i];
    val[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
}

// RoPE (HF rotate-half) of the DPL elements [lane * DPL, +DPL) of one head held by each lane: the partner of
// element d is d +- D/2, element i of lane ^ 16 (all 32 lanes must call it). rope_factors: cos / sin of position p
// for those elements; rope_lanes applies them (rope_kv_write's expression)
template <int D>
__device__ __forceinline__ void rope_factors(float cs[D / 32], float sn[D / 32], int lane,
                                             const float* __restrict__ cosT, const float* __restrict__ sinT,
                                             long long p) {
  constexpr int DPL = D / 32, half = D / 2;
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    int d = lane * DPL + i, j = d < half ? d : d - half;
    cs[i] = cosT[p * half + j]; sn[i] = sinT[p * half + j];
  }
}
template <int D>
__device__ __forceinline__ void rope_lanes(float x[D / 32], int lane, const float cs[D / 32], const float sn[D / 32]) {
  constexpr int DPL = D / 32, half = D / 2;
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    float xp = __shfl_xor_sync(0xffffffffu, x[i], 16);
    int d = lane * DPL + i;
    x[i] = d < half ? x[i] * cs[i] - xp * sn[i] : x[i] * cs[i] + xp * sn[i];
  }
}

template <int D, int PU, int GMAX, int KF>
__global__ void __launch_bounds__(128, 1) attn_partial(const float* __restrict__ q, int ldq,
    const long long* __restrict__ pos, int T, void* kc, u8* ks, void* vc, u8* vs, int kv_fmt, float k_scale,
    float v_scale, float* __restrict__ part, float* __restrict__ ml, int Hq, int Hkv, int L, int chunk,
    float sm_scale, const float* __restrict__ kr, int ldk, const float* __restrict__ vr, int ldv,
    const float* __restrict__ cosT, const float* __restrict__ sinT, int early) {
  kv_fmt = KF;   // v15: one instantiation per cache format (the argument must equal KF; ops passes both)
  constexpr int DPL = D / 32;
  constexpr int NW = 4;
  __shared__ float sm_s[GMAX][CMAX];      // scores, then exp(s - m)
  __shared__ float sm_acc[NW][GMAX][D];
  __shared__ float sm_m[GMAX], sm_l[GMAX];
  int n = blockIdx.x / Hkv, kh = blockIdx.x % Hkv, split = blockIdx.y, S = gridDim.y;
  int G = Hq / Hkv;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // early (fused decode only): pos, this warp's first K / V rows and the RoPE factors are read before the PDL
  // wait; no kernel of this step writes them (the new row p is written below, by this kernel, and re-read)
  float k0[PU][DPL], v0[PU][DPL], cs[DPL], sn[DPL];
  int len = early ? (int)pos[n] + 1 : 0;
  if (early) {
    int e0 = split * chunk, enp = min(e0 + chunk, len) - e0;
    long long rb = ((long long)n * Hkv + kh) * L + e0;
    load_rows<D, PU>(kv_fmt, kc, ks, rb, warp, enp, lane, k_scale, k0);
    load_rows<D, PU>(kv_fmt, vc, vs, rb, warp, enp, lane, v_scale, v0);
    rope_factors<D>(cs, sn, lane, cosT, sinT, len - 1);
  }
  QT_PDL_ENTRY
  if (!early) len = (int)pos[n] + 1;
  int c0 = split * chunk, c1 = min(c0 + chunk, len);
  if (c0 >= len) {
    if (threadIdx.x < G) {
      long long o = ((long long)n * Hq + kh * G + threadIdx.x) * S + split;
      ml[o * 2] = -QT_INF; ml[o * 2 + 1] = 0.0f;
    }
    return;
  }
  int np = c1 - c0;
  long long rowbase = ((long long)(n / T) * Hkv + kh) * L + c0;
  long long p = len - 1;
  if (cosT && !early) rope_factors<D>(cs, sn, lane, cosT, sinT, p);
  if (cosT && p < c1 && warp < 2) {   // this block's split holds p: K (warp 0) and V (warp 1) of the new token
    float x[DPL];
    const float* src = (warp == 0 ? kr + (long long)n * ldk : vr + (long long)n * ldv) + kh * D + lane * DPL;
#pragma unroll
    for (int i = 0; i < DPL; ++i) x[i] = src[i];
    if (warp == 0) rope_lanes<D>(x, lane, cs, sn);
    kv_store_vec<DPL>(kv_fmt, warp == 0 ? kc : vc, warp == 0 ? ks : vs, rowbase + (p - c0), D, lane * DPL, x,
                      warp == 0 ? k_scale : v_scale);
  }
  if (cosT) __syncthreads();          // the new row is read back below (block-visible after the barrier)
  if (early && p < c1) {              // the early copy of row p is stale: its owner warp reloads it
#pragma unroll
    for (int u = 0; u < PU; ++u) {
      if (warp + u * NW == p - c0) {
        kv_load_vec<DPL>(kv_fmt, kc, ks, rowbase + (p - c0), D, lane * DPL, k_scale, k0[u]);
        kv_load_vec<DPL>(kv_fmt, vc, vs, rowbase + (p - c0), D, lane * DPL, v_scale, v0[u]);
      }
    }
  }
  // phase 1: scores
  {
    float qv[GMAX][DPL];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
#pragma unroll
      for (int i = 0; i < DPL; ++i)
        qv[g][i] = g < G ? q[(long long)n * ldq + (kh * G + g) * D + lane * DPL + i] : 0.0f;
      if (cosT) rope_lanes<D>(qv[g], lane, cs, sn);
#pragma unroll
      for (int i = 0; i < DPL; ++i) qv[g][i] *= sm_scale;
    }
    constexpr int V = PU * GMAX;   // partial dot products per lane: (position slot u, head g) -> u * GMAX + g
    for (int j0 = warp; j0 < np; j0 += NW * PU) {
      float kv[PU][DPL];
      rows_or_pre<D, PU>(early && j0 == warp, k0, kv_fmt, kc, ks, rowbase, j0, np, lane, k_scale, kv);
      float val[V];
#pragma unroll
      for (int u = 0; u < PU; ++u)
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          float a = 0.0f;
#pragma unroll
          for (int i = 0; i < DPL; ++i) a += qv[g][i] * kv[u][i];
          val[u * GMAX + g] = a;
        }
      // transpose-reduce across the warp (V - V/32 shuffles instead of 5 per sum): at each step a lane keeps
      // the half of its values selected by its lane bit and adds the partner's copy of that half; lane l ends
      // with the warp sums of values (V/32) l + i, i < V/32
      bfly_step<V, 16>(val, lane);
      bfly_step<V / 2, 8>(val, lane);
      bfly_step<V / 4, 4>(val, lane);
      bfly_step<V / 8, 2>(val, lane);
      bfly_step<V / 16, 1>(val, lane);
#pragma unroll
      for (int i = 0; i < V / 32; ++i) {
        int idx = (V / 32) * lane + i, g = idx % GMAX, j = j0 + (idx / GMAX) * NW;
        if (g < G && j < np) sm_s[g][j] = val[i];
      }
    }
  }
  __syncthreads();
  // phase 2: softmax statistics per head
  for (int g = warp; g < G; g += NW) {
    float mx = -QT_INF;
    for (int j = lane; j < np; j += 32) mx = fmaxf(mx, sm_s[g][j]);
    mx = warp_max(mx);
    float l = 0.0f;
    for (int j = lane; j < np; j += 32) {
      float e = expf(sm_s[g][j] - mx);
      sm_s[g][j] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) { sm_m[g] = mx; sm_l[g] = l; }
  }
  __syncthreads();
  // phase 3: e * V
  float acc[GMAX][DPL];
#pragma unroll
  for (int g = 0; g < GMAX; ++g)
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[g][i] = 0.0f;
  for (int j0 = warp; j0 < np; j0 += NW * PU) {
    float vv[PU][DPL];
    rows_or_pre<D, PU>(early && j0 == warp, v0, kv_fmt, vc, vs, rowbase, j0, np, lane, v_scale, vv);
#pragma unroll
    for (int u = 0; u < PU; ++u) {
      int j = j0 + u * NW;
      if (j < np) {
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          if (g < G) {
            float e = sm_s[g][j];
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[g][i] += e * vv[u][i];
          }
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < G) {
#pragma unroll
      for (int i = 0; i < DPL; ++i) sm_acc[warp][g][lane * DPL + i] = acc[g][i];
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < G * D; t += blockDim.x) {
    int g = t / D, d = t % D;
    float a = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; ++w) a += sm_acc[w][g][d];
    long long o = ((long long)n * Hq + kh * G + g) * S + split;
    part[o * D + d] = a;
    if (d == 0) { ml[o * 2] = sm_m[g]; ml[o * 2 + 1] = sm_l[g]; }
  }
}

// attn_partial_paged<D, PU, GM, KF>: attn_partial over a paged cache (kv_cache.cuh's PagedRows: batch row b's
//     position p at block bt[b * bt_ld + p / bs], slot p % bs), for decode (T = 1, any rows, different lengths;
//     with cos: RoPE + the KV write of the new token fused as in attn_partial) and prefill (T > 1). The split
//     length follows each row's length (the grid's S splits are static for CUDA graphs, the rows are not): split s
//     of a row of len positions covers [s * span, (s + 1) * span) with span = max(min_span, ceil(len / S) rounded
//     up to 32); a split is walked in sub-chunks of SUB positions with a running softmax (the head's max m, sum l
//     and each warp's e * V sums, kept in shared memory between sub-chunks, rescaled by exp(m_old - m_new) when
//     the max grows). Each sub-chunk's K / V rows (and nvfp4 scales) are staged in the dynamic shared memory by
//     cp.async first; SUB = what that memory holds for K and V (ops.paged_stage_bytes: CMAX where the GPU allows,
//     else a smaller multiple of 32), read from %dynamic_smem_size. Writes
//     part / ml as attn_partial (m = -inf for an empty split), so attn_combine / attn_combine_heads merge them.
//     No loads before the PDL wait. grid (N * Hkv, S), block 128. Its phases repeat attn_partial's code on
//     purpose: sharing them as device functions changed attn_partial's machine code (nvcc 13, sm_90a), and the
//     contiguous decode path is the measured one (docs/performance.md); this way its cubin is byte-identical.
template <int D, int PU, int GMAX, int KF>
__global__ void __launch_bounds__(128, 1) attn_partial_paged(const float* __restrict__ q, int ldq,
    const long long* __restrict__ pos, int T, void* kc, u8* ks, void* vc, u8* vs, int kv_fmt, float k_scale,
    float v_scale, float* __restrict__ part, float* __restrict__ ml, int Hq, int Hkv, int min_span,
    float sm_scale, const float* __restrict__ kr, int ldk, const float* __restrict__ vr, int ldv,
    const float* __restrict__ cosT, const float* __restrict__ sinT, const int* __restrict__ bt, int bt_ld,
    int bs) {
  kv_fmt = KF;
  constexpr int DPL = D / 32;
  constexpr int NW = 4;
  __shared__ float sm_s[GMAX][CMAX];      // scores, then exp(s - m)
  __shared__ float sm_acc[NW][GMAX][D];
  __shared__ float sm_m[GMAX], sm_l[GMAX], sm_c[GMAX];
  __shared__ long long sm_row[CMAX];      // cache row of each position of the sub-chunk
  using RB = RowBytes<D, KF>;
  extern __shared__ __align__(16) u8 stage[];   // K codes, V codes, K scales, V scales of SUB positions
  // SUB: the positions staged at once, what the launch's dynamic shared memory holds (ops.paged_stage_bytes: CMAX,
  // or fewer multiples of 32 where the GPU's per-block limit is smaller, e.g. head_dim 256 on 99 KB GPUs)
  unsigned dyn;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
  const int SUB = min(CMAX, (int)(dyn / (2 * (RB::codes + RB::scales))) / 32 * 32);
  if (SUB == 0) __trap();                 // launched without room for 32 positions: fail loudly, never loop
  u8* sKc = stage;
  u8* sVc = stage + SUB * RB::codes;
  u8* sKs = stage + 2 * SUB * RB::codes;
  u8* sVs = sKs + SUB * RB::scales;
  int n = blockIdx.x / Hkv, kh = blockIdx.x % Hkv, split = blockIdx.y, S = gridDim.y;
  int G = Hq / Hkv;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  QT_PDL_ENTRY
  int len = (int)pos[n] + 1;
  int span = max(min_span, ((len + S - 1) / S + 31) / 32 * 32);
  int c0 = split * span, c1 = min(c0 + span, len);
  if (c0 >= len) {
    if (threadIdx.x < G) {
      long long o = ((long long)n * Hq + kh * G + threadIdx.x) * S + split;
      ml[o * 2] = -QT_INF; ml[o * 2 + 1] = 0.0f;
    }
    return;
  }
  long long b = n / T;
  long long p = len - 1;
  float cs[DPL], sn[DPL];
  if (cosT) rope_factors<D>(cs, sn, lane, cosT, sinT, p);
  if (cosT && p < c1 && warp < 2) {   // this block's split holds p: K (warp 0) and V (warp 1) of the new token
    float x[DPL];
    const float* src = (warp == 0 ? kr + (long long)n * ldk : vr + (long long)n * ldv) + kh * D + lane * DPL;
#pragma unroll
    for (int i = 0; i < DPL; ++i) x[i] = src[i];
    if (warp == 0) rope_lanes<D>(x, lane, cs, sn);
    PagedRows rp = paged_rows(bt, bt_ld, bs, b, kh, Hkv, c0);
    kv_store_vec<DPL>(kv_fmt, warp == 0 ? kc : vc, warp == 0 ? ks : vs, rp.at(p - c0), D, lane * DPL, x,
                      warp == 0 ? k_scale : v_scale);
  }
  if (threadIdx.x < GMAX) { sm_m[threadIdx.x] = -QT_INF; sm_l[threadIdx.x] = 0.0f; }
  __syncthreads();                    // the new row and the running statistics are block-visible
  for (int s0 = c0; s0 < c1; s0 += SUB) {
    int np = min(SUB, c1 - s0);
    // stage the sub-chunk's K and V rows (and nvfp4 scales) in shared memory with cp.async: every piece of
    // both is in flight at once (v16; the register loads of PU rows per warp kept ~1.0 TB/s at batch 32)
    {
      PagedRows rows = paged_rows(bt, bt_ld, bs, b, kh, Hkv, s0);
      for (int j = threadIdx.x; j < np; j += blockDim.x) sm_row[j] = rows.at(j);
      __syncthreads();
      constexpr int PR = RB::codes / 16;
      for (int i = threadIdx.x; i < np * PR; i += blockDim.x) {
        int j = i / PR, o = (i % PR) * 16;
        long long r = sm_row[j] * RB::codes + o;
        cp_async<16>(sKc + j * RB::codes + o, (const u8*)kc + r);
        cp_async<16>(sVc + j * RB::codes + o, (const u8*)vc + r);
      }
      if constexpr (RB::scales > 0) {
        constexpr int SP = RB::scales >= 16 ? 16 : RB::scales, NP = RB::scales / SP;
        for (int i = threadIdx.x; i < np * NP; i += blockDim.x) {
          int j = i / NP, o = (i % NP) * SP;
          long long r = sm_row[j] * RB::scales + o;
          cp_async<SP>(sKs + j * RB::scales + o, ks + r);
          cp_async<SP>(sVs + j * RB::scales + o, vs + r);
        }
      }
      cp_async_wait_all();
      __syncthreads();
    }
    // phase 1: scores (attn_partial's)
    {
      float qv[GMAX][DPL];
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
#pragma unroll
        for (int i = 0; i < DPL; ++i)
          qv[g][i] = g < G ? q[(long long)n * ldq + (kh * G + g) * D + lane * DPL + i] : 0.0f;
        if (cosT) rope_lanes<D>(qv[g], lane, cs, sn);
#pragma unroll
        for (int i = 0; i < DPL; ++i) qv[g][i] *= sm_scale;
      }
      constexpr int V = PU * GMAX;
      for (int j0 = warp; j0 < np; j0 += NW * PU) {
        float kv[PU][DPL];
        load_rows<D, PU>(kv_fmt, sKc, sKs, 0LL, j0, np, lane, k_scale, kv);
        float val[V];
#pragma unroll
        for (int u = 0; u < PU; ++u)
#pragma unroll
          for (int g = 0; g < GMAX; ++g) {
            float a = 0.0f;
#pragma unroll
            for (int i = 0; i < DPL; ++i) a += qv[g][i] * kv[u][i];
            val[u * GMAX + g] = a;
          }
        bfly_step<V, 16>(val, lane);
        bfly_step<V / 2, 8>(val, lane);
        bfly_step<V / 4, 4>(val, lane);
        bfly_step<V / 8, 2>(val, lane);
        bfly_step<V / 16, 1>(val, lane);
#pragma unroll
        for (int i = 0; i < V / 32; ++i) {
          int idx = (V / 32) * lane + i, g = idx % GMAX, j = j0 + (idx / GMAX) * NW;
          if (g < G && j < np) sm_s[g][j] = val[i];
        }
      }
    }
    __syncthreads();
    // phase 2: the running softmax statistics per head
    for (int g = warp; g < G; g += NW) {
      float mx = -QT_INF;
      for (int j = lane; j < np; j += 32) mx = fmaxf(mx, sm_s[g][j]);
      mx = fmaxf(warp_max(mx), sm_m[g]);
      float l = 0.0f;
      for (int j = lane; j < np; j += 32) {
        float e = expf(sm_s[g][j] - mx);
        sm_s[g][j] = e;
        l += e;
      }
      l = warp_sum(l);
      if (lane == 0) {
        float c = expf(sm_m[g] - mx);   // 0 on the first sub-chunk (m = -inf)
        sm_l[g] = sm_l[g] * c + l;
        sm_m[g] = mx;
        sm_c[g] = c;
      }
    }
    __syncthreads();
    // phase 3: this sub-chunk's e * V per warp, then the warp's running sums sm_acc[warp] = sm_acc * c + acc
    float acc[GMAX][DPL];
#pragma unroll
    for (int g = 0; g < GMAX; ++g)
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[g][i] = 0.0f;
    for (int j0 = warp; j0 < np; j0 += NW * PU) {
      float vv[PU][DPL];
      load_rows<D, PU>(kv_fmt, sVc, sVs, 0LL, j0, np, lane, v_scale, vv);
#pragma unroll
      for (int u = 0; u < PU; ++u) {
        int j = j0 + u * NW;
        if (j < np) {
#pragma unroll
          for (int g = 0; g < GMAX; ++g) {
            if (g < G) {
              float e = sm_s[g][j];
#pragma unroll
              for (int i = 0; i < DPL; ++i) acc[g][i] += e * vv[u][i];
            }
          }
        }
      }
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g < G) {
        float c = sm_c[g];
        float* a = &sm_acc[warp][g][lane * DPL];   // this lane's own slots: no other thread touches them
#pragma unroll
        for (int i = 0; i < DPL; ++i) a[i] = s0 == c0 ? acc[g][i] : a[i] * c + acc[g][i];
      }
    }
    __syncthreads();                  // sm_s is rewritten by the next sub-chunk; sm_acc is read below
  }
  for (int t = threadIdx.x; t < G * D; t += blockDim.x) {
    int g = t / D, d = t % D;
    float a = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; ++w) a += sm_acc[w][g][d];
    long long o = ((long long)n * Hq + kh * G + g) * S + split;
    part[o * D + d] = a;
    if (d == 0) { ml[o * 2] = sm_m[g]; ml[o * 2 + 1] = sm_l[g]; }
  }
}

// the merge's batch of 4 splits s0.. of one 16-element slot (split s of the slot at slot + s * D; indices past
// sb - 1 read split sb - 1, unused): m, l and the 16 partial sums, all loads issued together
struct Splits4 {
  float ms[4], lv[4];
  float4 pv[4][4];
};
__device__ __forceinline__ void load_splits4(const float* mlr, const float* slot, int D, int s0, int sb, Splits4& b) {
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    int s = min(s0 + u, sb - 1);
    b.ms[u] = mlr[2 * s]; b.lv[u] = mlr[2 * s + 1];
    const float4* ps = (const float4*)(slot + (long long)s * D);
#pragma unroll
    for (int q4 = 0; q4 < 4; ++q4) b.pv[u][q4] = ps[q4];
  }
}
// v += exp(m_s - M) * part_s, ls += exp(m_s - M) * l_s over the batch's live splits (s < sb, m_s > -inf)
__device__ __forceinline__ void add_splits4(const Splits4& b, int s0, int sb, float M, float v[16], float& ls) {
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    if (s0 + u < sb && b.ms[u] != -QT_INF) {
      float c = expf(b.ms[u] - M);
#pragma unroll
      for (int q4 = 0; q4 < 4; ++q4) {
        v[4 * q4] += c * b.pv[u][q4].x; v[4 * q4 + 1] += c * b.pv[u][q4].y;
        v[4 * q4 + 2] += c * b.pv[u][q4].z; v[4 * q4 + 3] += c * b.pv[u][q4].w;
      }
      ls += c * b.lv[u];
    }
  }
}

// attn_combine: merge the S splits of every head of row r (16 elements per thread, thread t covers elements
// [16t, 16t + 16) of the row = head 16t / D), normalise, and hand the row to store_and_quant: out (if not
// null) receives it, and with scheme > 0 its quantized forms for the o projection as act_quant_fast writes them
// (scheme 0, no outputs: a plain merge). Loads are batched 4 splits at a time (part of an empty split is read
// but not used), so a row costs ~S/4 dependent L2 round trips instead of S.
extern "C" __global__ void attn_combine(const float* __restrict__ part, const float* __restrict__ ml,
                                        float* __restrict__ out, int S, int D, int HD, int scheme,
                                        const float* __restrict__ in_scale, const float* __restrict__ pqs,
                                        unsigned short* __restrict__ outh, float* __restrict__ hscale,
                                        int hperm, u8* __restrict__ outq, float* __restrict__ qscale) {
  float ts = static_scale(scheme, in_scale);
  QT_PDL_ENTRY
  __shared__ float red[32];
  int r = blockIdx.x, t = blockIdx.y * blockDim.x + threadIdx.x;  // t: 16-element slot of the row
  int i0 = t * 16;
  bool live = i0 < HD;
  float v[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) v[j] = 0.0f;
  if (live) {
    int h = i0 / D, d0 = i0 % D;
    long long nh = (long long)r * (HD / D) + h;
    const float* mlr = ml + nh * S * 2;
    float M = -QT_INF;
#pragma unroll 8
    for (int s = 0; s < S; ++s) M = fmaxf(M, mlr[2 * s]);
    float ls = 0.0f;
    for (int s0 = 0; s0 < S; s0 += 4) {
      Splits4 b;
      load_splits4(mlr, part + nh * S * D + d0, D, s0, S, b);
      add_splits4(b, s0, S, M, v, ls);
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = v[j] / ls;
  }
  store_and_quant(v, out ? out + (long long)r * HD + i0 : nullptr, pqs, r, t, live, red, HD, scheme, ts, outh,
                  hscale, hperm, outq, qscale);
}

extern "C" __global__ void __launch_bounds__(128) attn_combine_heads(const float* __restrict__ part,
    const float* __restrict__ ml, float* __restrict__ out, int S, int D, int HD, int scheme,
    const float* __restrict__ in_scale, const float* __restrict__ pqs, unsigned short* __restrict__ outh,
    float* __restrict__ hscale, int hperm, u8* __restrict__ outq, float* __restrict__ qscale) {
  float ts = static_scale(scheme, in_scale);
  pdl_wait();   // the next GEMV is triggered once this kernel's loads are done (below): run 30, +0.7 %
  __shared__ float sv[128 * 16];
  __shared__ float smx[128], sls[128];
  __shared__ float red[32];
  int r = blockIdx.x, h = blockIdx.y, Hq = gridDim.y;
  int NS = D / 16, P = blockDim.x / NS;
  int tid = threadIdx.x, slot = tid % NS, p = tid / NS;
  long long nh = (long long)r * Hq + h;
  const float* mlr = ml + nh * S * 2;
  float v[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) v[j] = 0.0f;
  float M = -QT_INF, ls = 0.0f;
  if (p < P) {
    int sa = p * S / P, sb = (p + 1) * S / P;
    for (int s0 = sa; s0 < sb; s0 += 4) {
      Splits4 b;
      load_splits4(mlr, part + nh * S * D + slot * 16, D, s0, sb, b);
      float bm = M;
#pragma unroll
      for (int u = 0; u < 4; ++u) if (s0 + u < sb) bm = fmaxf(bm, b.ms[u]);
      if (bm > M) {                  // rescale what this group summed so far to the new max
        float c = expf(M - bm);
#pragma unroll
        for (int j = 0; j < 16; ++j) v[j] *= c;
        ls *= c;
        M = bm;
      }
      add_splits4(b, s0, sb, M, v, ls);
    }
  }
#pragma unroll
  for (int j = 0; j < 16; ++j) sv[tid * 16 + j] = v[j];
  smx[tid] = M; sls[tid] = ls;
  __syncthreads();
  pdl_trigger();
  if (tid >= 32) return;
  bool live = tid < NS;
#pragma unroll
  for (int j = 0; j < 16; ++j) v[j] = 0.0f;
  if (live) {
    float Mx = -QT_INF;
    for (int q = 0; q < P; ++q) Mx = fmaxf(Mx, smx[q * NS + tid]);
    float L = 0.0f;
    for (int q = 0; q < P; ++q) {
      float mq = smx[q * NS + tid];
      if (mq != -QT_INF) {
        float c = expf(mq - Mx);
        L += c * sls[q * NS + tid];
#pragma unroll
        for (int j = 0; j < 16; ++j) v[j] += c * sv[(q * NS + tid) * 16 + j];
      }
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = v[j] / L;
  }
  int t = h * NS + tid;
  store_and_quant(v, (out && live) ? out + (long long)r * HD + 16 * t : nullptr, pqs, r, t, live, red, HD, scheme,
                  ts, outh, hscale, hperm, outq, qscale);
}

#define QT_ATTN_ARGS const float*, int, const long long*, int, void*, u8*, void*, u8*, int, float, float, float*, \
  float*, int, int, int, int, float, const float*, int, const float*, int, const float*, const float*, int
#define QT_ATTN_KF(D, PU, GM) template __global__ void attn_partial<D, PU, GM, KV_BF16>(QT_ATTN_ARGS); \
  template __global__ void attn_partial<D, PU, GM, KV_FP8>(QT_ATTN_ARGS); \
  template __global__ void attn_partial<D, PU, GM, KV_NVFP4>(QT_ATTN_ARGS);
#define QT_ATTN_PAGED_ARGS const float*, int, const long long*, int, void*, u8*, void*, u8*, int, float, float, \
  float*, float*, int, int, int, float, const float*, int, const float*, int, const float*, const float*, \
  const int*, int, int
#define QT_ATTN_PAGED(D, PU, GM) template __global__ void attn_partial_paged<D, PU, GM, KV_BF16>(QT_ATTN_PAGED_ARGS); \
  template __global__ void attn_partial_paged<D, PU, GM, KV_FP8>(QT_ATTN_PAGED_ARGS); \
  template __global__ void attn_partial_paged<D, PU, GM, KV_NVFP4>(QT_ATTN_PAGED_ARGS);
QT_ATTN_PAGED(64, 8, 4)
QT_ATTN_PAGED(64, 8, 8)
QT_ATTN_PAGED(128, 8, 4)
QT_ATTN_PAGED(128, 8, 8)
QT_ATTN_PAGED(256, 4, 8)
QT_ATTN_KF(64, 8, 4)
QT_ATTN_KF(64, 8, 8)
QT_ATTN_KF(128, 8, 4)
QT_ATTN_KF(128, 8, 8)
QT_ATTN_KF(256, 4, 8)
