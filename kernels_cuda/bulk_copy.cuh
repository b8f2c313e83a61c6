// bulk_copy.cuh — the bulk-copy engine (TMA, sm_90+) and shared-memory mbarriers, as thin PTX wrappers.
// Contract: header-only, no CUDA headers. Addresses of shared memory are 32-bit shared-window addresses
// (smem_u32). bulk_g2s copies `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared
// memory and signals completion on an mbarrier as transaction bytes; the issuing thread first announces them
// with mbar_expect_tx on the same barrier (which also counts as its one arrival). mbar_wait(bar, parity)
// returns once the barrier's phase of that parity has completed (uses n = 0, 1, 2, ... of a barrier wait for
// parity n & 1). After 2 s without completion it traps instead of hanging forever: the launch fails, and so does
// every later CUDA call of the process (a trap leaves a sticky error), so it is a tripwire, not a fallback.
#pragma once

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
// make the initialised barriers visible to the bulk-copy engine (then __syncthreads before any use)
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(unsigned bar, unsigned parity) {
  unsigned ok;
  asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
               : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
  return ok != 0u;
}
__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t;
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  if (mbar_try_wait(bar, parity)) return;
  unsigned long long t0 = globaltimer_ns();
  while (!mbar_try_wait(bar, parity))
    if (globaltimer_ns() - t0 > 2000000000ull) __trap();
}
// order this thread's earlier generic-proxy accesses of shared memory before its later bulk copies into it
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void bulk_g2s(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
