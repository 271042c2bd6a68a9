// Launches the Hopper kernel when the call fits it; returns false (launching nothing) otherwise.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>
#include <cudaTypedefs.h>

#include <type_traits>

#include "decode_launchers.h"
#include "decode_sm90.cuh"

namespace flashmla {
namespace sm90 {

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status));
    TORCH_CHECK(status == cudaDriverEntryPointSuccess && ptr != nullptr, "cuTensorMapEncodeTiled is not available");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// 4-D view of k_cache for TMA: (channel, token in page, kv head, block), boxes of 64 x 64 x 1 x 1
// landing in the 128-byte swizzle the kernel reads. L2 promotion 128 bytes: a box row is one 128-byte line (one
// 64-channel slice of a token), so a miss fetches just that line. The 256-byte promotion (until the tenth session)
// also fetched the token's next slice ahead of its own box; measured on the H200 (docs/KERNEL_NOTES.md v11, one build,
// host-side switch): 128-byte 0.989-1.026x against it, 6 of 7 rows at 1.003x or more, memory-bound rows +0.3-1.4%.
template <typename T>
CUtensorMap make_kv_map(const DecodeParams& p) {
  CUtensorMap map;
  const cuuint64_t dims[4] = {cuuint64_t(p.head_dim), cuuint64_t(p.page_block_size), cuuint64_t(p.num_heads_k),
                              cuuint64_t(p.num_blocks)};
  const cuuint64_t strides[3] = {cuuint64_t(p.k_stride_token) * sizeof(T), cuuint64_t(p.k_stride_head) * sizeof(T),
                                 cuuint64_t(p.k_stride_block) * sizeof(T)};
  const cuuint32_t box[4] = {64, kTokens, 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const auto dtype =
      std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult rc = tensor_map_encoder()(&map, dtype, 4, const_cast<void*>(p.k_cache), dims, strides, box,
                                           elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                           CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(rc == CUDA_SUCCESS, "flash_mla_with_kvcache: cuTensorMapEncodeTiled failed with error ", int(rc));
  return map;
}

template <typename T, int D>
void launch(const DecodeParams& p, cudaStream_t stream) {
  const int m_blocks = (p.rows_per_head_k + kRows - 1) / kRows;
  Args args{};
  args.p = p;
  args.p.partials_in_l2 = p.partials_in_l2 && m_blocks == 1;  // l2_policy.cuh
  // TMA needs whole 64-token tiles inside one page; other page sizes gather with cp.async.
  const bool use_tma = p.page_block_size % kTokens == 0;
  if (use_tma) args.kv_map = make_kv_map<T>(p);
  auto run = [&](auto seesaw, auto tma) {
    constexpr bool kSeesaw = decltype(seesaw)::value;
    constexpr int smem_bytes = Smem<D, kSeesaw>::total;
    auto kernel = mla_decode_sm90_kernel<T, D, kSeesaw, decltype(tma)::value>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    kernel<<<dim3(p.num_sm_parts, p.num_heads_k * m_blocks), kThreads, smem_bytes, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto run_pages = [&](auto seesaw) {
    if (use_tma)
      run(seesaw, std::true_type{});
    else
      run(seesaw, std::false_type{});
  };
  if (p.sm90_seesaw)
    run_pages(std::true_type{});
  else
    run_pages(std::false_type{});
}

template <typename T>
bool launch_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.head_dim_v != kDimV || !p.vec16) return false;
  if (p.head_dim == 576)
    launch<T, 576>(p, stream);
  else if (p.head_dim == 512)
    launch<T, 512>(p, stream);
  else
    return false;
  return true;
}

}  // namespace sm90
}  // namespace flashmla
