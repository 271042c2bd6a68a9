// Launches the Hopper kernel when the call fits it; returns false (launching nothing) otherwise.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include "decode_launchers.h"
#include "decode_sm90.cuh"

namespace flashmla {
namespace sm90 {

template <typename T, int D>
void launch(const DecodeParams& p, cudaStream_t stream) {
  auto kernel = mla_decode_sm90_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem<D>::total));
  const int m_blocks = (p.rows_per_head_k + kRows - 1) / kRows;
  kernel<<<dim3(p.num_sm_parts, p.num_heads_k * m_blocks), kThreads, Smem<D>::total, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
bool launch_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.head_dim_v != kDimV || !p.vec16) return false;
  if (p.head_dim == 576) launch<T, 576>(p, stream);
  else if (p.head_dim == 512) launch<T, 512>(p, stream);
  else return false;
  return true;
}

}  // namespace sm90
}  // namespace flashmla
