// Picks the portable kernel's configuration and launches it.
//
// A configuration is (MG, MW, N, STAGES): 16 MG query rows per block, MW m16 row groups per warp
// ((MG / MW) x 4 warps), N tokens per tile, STAGES cp.async stages (see decode_portable.cuh).
// The block's rows decide MG (the fewest 16-row groups that hold the rows, up to 64); for that MG
// the first configuration whose shared memory fits the device's opt-in limit is launched, else the
// next smaller MG is tried. Sizes below for head_dim 576 (swizzled rows of 1152 bytes), bf16/fp16:
//   MG = 1 (rows <= 16, memory-latency bound: depth of the pipeline matters most)
//     (1, 1, 32, 4)  167552 B  H100 (227 KB): 3 tiles of 32 tokens in flight during compute
//     (1, 1, 32, 3)  130656 B  A100 (163 KB)
//     (1, 1, 32, 2)   93760 B  smaller GPUs / large head_dim
//   MG = 2 (rows <= 32; 4 warps of 32 rows: K and V fragments feed two mma's)
//     (2, 2, 32, 4)  187520 B  H100
//     (2, 2, 32, 3)  150624 B  A100
//     (2, 2, 32, 2)  113728 B
//   MG = 4 (rows > 32, shared-memory bound: 8 warps of 32 rows, 64-token tiles halve the Q re-reads
//          and barriers per token)
//     (4, 2, 64, 2)  231552 B  H100 (needs the swizzled, unpadded rows to fit)
//     (4, 2, 32, 2)  153664 B  A100
//   then MG = 2, MG = 1; nothing fits -> error (head_dim too large).
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include "decode_portable.cuh"

namespace flashmla {
namespace portable {

template <typename T, int MG, int MW, int N, int STAGES>
bool try_launch(const DecodeParams& p, int smem_limit, cudaStream_t stream) {
  const size_t smem = SmemLayout<T, MG, N, STAGES>::total(p.head_dim_padded);
  if (smem > size_t(smem_limit)) return false;
  auto kernel = mla_decode_portable_kernel<T, MG, MW, N, STAGES>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  constexpr int M = 16 * MG;
  const int m_blocks = (p.rows_per_head_k + M - 1) / M;
  const dim3 grid(p.num_sm_parts, p.num_heads_k * m_blocks, (p.head_dim_v + kColsPerBlock - 1) / kColsPerBlock);
  kernel<<<grid, (MG / MW) * kWarpsN * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T, int MG>
void launch_rows(const DecodeParams& p, int smem_limit, cudaStream_t stream) {
  if constexpr (MG == 4) {
    if (try_launch<T, 4, 2, 64, 2>(p, smem_limit, stream)) return;
    if (try_launch<T, 4, 2, 32, 2>(p, smem_limit, stream)) return;
    launch_rows<T, 2>(p, smem_limit, stream);
  } else if constexpr (MG == 2) {
    if (try_launch<T, 2, 2, 32, 4>(p, smem_limit, stream)) return;
    if (try_launch<T, 2, 2, 32, 3>(p, smem_limit, stream)) return;
    if (try_launch<T, 2, 2, 32, 2>(p, smem_limit, stream)) return;
    launch_rows<T, 1>(p, smem_limit, stream);
  } else {
    static_assert(MG == 1, "MG is 1, 2 or 4");
    if (try_launch<T, 1, 1, 32, 4>(p, smem_limit, stream)) return;
    if (try_launch<T, 1, 1, 32, 3>(p, smem_limit, stream)) return;
    if (try_launch<T, 1, 1, 32, 2>(p, smem_limit, stream)) return;
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
