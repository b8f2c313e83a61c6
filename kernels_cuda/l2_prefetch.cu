// l2_prefetch.cu — warm the L2 with bytes a later kernel will stream (a layer's weights), launched on a branch
// of the decode graph that runs while the critical path leaves DRAM idle (rope + attention + merge at short
// context). Reads nothing into registers and writes nothing: it cannot change any result, only timing.
// l2_prefetch(base u8*, stride (bytes between rows), rows, row_bytes, mode): the first row_bytes of each of
//     `rows` rows (row r at base + r * stride) go to L2 (addresses 16-byte aligned for mode 1). mode 0: one
//     prefetch.global.L2 per 128-byte line; mode 1: one cp.async.bulk.prefetch.L2 per 4 KB piece of a row
//     (sm_90+). grid and block any (grid-stride over the lines / pieces). Not PDL-launched, no pdl_wait: its
//     graph node depends fully on the kernel it forks from.
extern "C" __global__ void l2_prefetch(const unsigned char* __restrict__ base, long long stride, int rows,
                                       long long row_bytes, int mode) {
  const long long piece = mode == 1 ? 4096 : 128;
  long long per_row = (row_bytes + piece - 1) / piece;
  long long total = (long long)rows * per_row;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    long long r = i / per_row, off = (i % per_row) * piece;
    const unsigned char* p = base + r * stride + off;
    if (mode == 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      unsigned n = (unsigned)min(piece, row_bytes - off);
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"(n) : "memory");
#endif
    } else {
      asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
    }
  }
}
