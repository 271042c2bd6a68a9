// Picks the portable kernel's configuration (rows per block, tokens per tile) and launches it.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include "decode_portable.cuh"

namespace flashmla {
namespace portable {

template <typename T, int MG, int N>
bool try_launch(const DecodeParams& p, int smem_limit, cudaStream_t stream) {
  const size_t smem = SmemLayout<T, MG, N>::total(p.head_dim_padded);
  if (smem > size_t(smem_limit)) return false;
  auto kernel = mla_decode_portable_kernel<T, MG, N>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  constexpr int M = 16 * MG;
  const int m_blocks = (p.rows_per_head_k + M - 1) / M;
  const dim3 grid(p.num_sm_parts, p.num_heads_k * m_blocks, (p.head_dim_v + kColsPerBlock - 1) / kColsPerBlock);
  kernel<<<grid, MG * kWarpsN * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Rows per block: the fewest 16-row groups that hold the rows (up to 64); tokens per tile: 64 when
// shared memory allows, else 32.
template <typename T, int MG>
void launch_rows(const DecodeParams& p, int smem_limit, cudaStream_t stream) {
  if (try_launch<T, MG, 64>(p, smem_limit, stream)) return;
  if (try_launch<T, MG, 32>(p, smem_limit, stream)) return;
  if constexpr (MG > 1) {
    launch_rows<T, MG / 2>(p, smem_limit, stream);
  } else {
    TORCH_CHECK(false, "flash_mla_with_kvcache: head_dim ", p.head_dim,
                " is too large for the CUDA kernel's shared memory (", smem_limit, " bytes per block)");
  }
}

template <typename T>
void launch_decode(const DecodeParams& p, int smem_limit, cudaStream_t stream) {
  if (p.rows_per_head_k <= 16)
    launch_rows<T, 1>(p, smem_limit, stream);
  else if (p.rows_per_head_k <= 32)
    launch_rows<T, 2>(p, smem_limit, stream);
  else
    launch_rows<T, 4>(p, smem_limit, stream);
}

}  // namespace portable
}  // namespace flashmla
