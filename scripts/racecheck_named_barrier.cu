// Does compute-sanitizer racecheck understand a named barrier that two warpgroups execute at
// different code places? The pattern of the Hopper kernel's seesaw handshake (decode_sm90.cuh),
// alone: warpgroup 0 writes a shared row, arrives on barrier 2; warpgroup 1 syncs on 2, reads it,
// arrives on barrier 3; warpgroup 0 syncs on 3 before its next write. Every access is ordered by the
// barriers, so a hazard report here is the tool's, not the kernel's. SYNC_ONLY=1 makes every arrive a
// sync. Built and run by `scripts/gpu_run.sh racecheck_repro` (both variants, under racecheck).
#include <cstdio>

#ifndef SYNC_ONLY
#define SYNC_ONLY 0
#endif

template <int kId>
__device__ __forceinline__ void publish() {  // the writer's side of a handshake
  if (SYNC_ONLY)
    asm volatile("bar.sync %0, 256;\n" ::"n"(kId) : "memory");
  else
    asm volatile("bar.arrive %0, 256;\n" ::"n"(kId) : "memory");
}
template <int kId>
__device__ __forceinline__ void await() {  // the reader's side
  asm volatile("bar.sync %0, 256;\n" ::"n"(kId) : "memory");
}

__global__ void handshake(float* out, int rounds) {
  __shared__ float row_a[128], row_b[128];  // as sM[tile A], sM[tile B]: one writer warpgroup each
  const int t = threadIdx.x % 128;
  float acc = 0.f;
  for (int r = 0; r < rounds; ++r) {
    if (threadIdx.x < 128) {
      row_a[t] = float(r * 128 + t);
      publish<2>();
      await<3>();
      acc += row_b[t];
    } else {
      await<2>();
      acc += row_a[t];
      row_b[t] = acc;
      publish<3>();
    }
  }
  out[threadIdx.x] = acc;
}

int main() {
  float* out;
  cudaMalloc(&out, 256 * sizeof(float));
  handshake<<<1, 256>>>(out, 8);
  const cudaError_t err = cudaDeviceSynchronize();
  std::printf("handshake (SYNC_ONLY=%d): %s\n", SYNC_ONLY, cudaGetErrorString(err));
  cudaFree(out);
  return err == cudaSuccess ? 0 : 1;
}
