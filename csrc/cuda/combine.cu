// The combine kernel: merges the partial results of sequences cut into several pieces (merge.cuh),
// one warp per (sequence, KV head, query row); sequences of one piece were written by the decode
// kernel directly and are skipped.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "combine.h"
#include "merge.cuh"
#include "pdl.cuh"

namespace flashmla {
namespace {

constexpr int kRowsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32) combine_kernel(const DecodeParams p) {
  const int b = blockIdx.z, hk = blockIdx.y;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  if (row >= p.rows_per_head_k) return;
  const PieceRange pr = piece_range(p, b);
  // Every block waits for the decode grid (its partial results complete and visible), even one with
  // nothing to merge: the combine grid then never finishes before the decode grid, so work queued
  // after it on the stream is ordered after the decode too.
  pdl_wait_primary();
  if (pr.count <= 1) return;
  merge_row<T>(p, b, hk, row, pr, threadIdx.x % 32);
}

}  // namespace

void launch_combine(const DecodeParams& p, bool is_bf16, bool programmatic, cudaStream_t stream) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3((p.rows_per_head_k + kRowsPerBlock - 1) / kRowsPerBlock, p.num_heads_k, p.batch);
  config.blockDim = dim3(kRowsPerBlock * 32);
  config.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attr;
  config.numAttrs = programmatic ? 1 : 0;
  C10_CUDA_CHECK(is_bf16 ? cudaLaunchKernelEx(&config, combine_kernel<__nv_bfloat16>, p)
                         : cudaLaunchKernelEx(&config, combine_kernel<__half>, p));
}

}  // namespace flashmla
