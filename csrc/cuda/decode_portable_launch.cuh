// Picks the portable kernel's configuration and launches it.
//
// A configuration is (MG, MW, N, STAGES, WN): 16 MG query rows per block, MW m16 row groups per
// warp ((MG / MW) x WN warps), N tokens per tile, STAGES cp.async stages, WN warps along tokens /
// channels (see decode_portable.cuh).
// The block's rows decide MG (the fewest 16-row groups that hold the rows, up to 64); for that MG
// the first configuration of its list whose shared memory fits the device's opt-in limit is
// launched, else the next smaller MG's list is tried. Sizes for head_dim 576 (swizzled rows of
// 1152 bytes), bf16/fp16, in KiB:
//   MG = 1 (rows <= 16)  (1,1,64,2,8) 164.6; (1,1,32,4,4) 163.6; (1,1,32,3,4) 127.6; (1,1,32,2,4) 91.6
//   MG = 2 (rows <= 32)  (2,2,64,2,8) 185.1; (2,2,32,4,4) 183.1; (2,2,32,3,4) 147.1; (2,2,32,2,4) 111.1
//   MG = 4 (rows > 32)   (4,2,64,2,4) 225.1 (H100's 227 KiB: needs the swizzled, unpadded Q/K rows);
//                        (4,2,32,2,4) 150.1; then MG = 2, MG = 1
//   nothing fits -> error (head_dim too large).
// The order within a list is measured (docs/KERNEL_NOTES.md). FLASHMLA_PORTABLE_CONFIG="MG,MW,N,STAGES,WN"
// (WN may be left out: 4; read per call; for tuning and tests) launches exactly that configuration
// of the lists, for any rows, or raises if it is not in the lists or does not fit.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <cstdlib>

#include "decode_portable.cuh"

namespace flashmla {
namespace portable {

struct ConfigChoice {
  bool forced = false;  // FLASHMLA_PORTABLE_CONFIG is set: launch only the configuration it names
  int mg = 0, mw = 0, n = 0, stages = 0, wn = 4;
};

inline ConfigChoice config_choice() {
  ConfigChoice c;
  const char* v = std::getenv("FLASHMLA_PORTABLE_CONFIG");
  if (v == nullptr || *v == '\0') return c;
  int end = 0;
  const int fields = std::sscanf(v, "%d,%d,%d,%d%n,%d%n", &c.mg, &c.mw, &c.n, &c.stages, &end, &c.wn, &end);
  TORCH_CHECK((fields == 4 || fields == 5) && v[end] == '\0',
              "FLASHMLA_PORTABLE_CONFIG must be 'MG,MW,N,STAGES[,WN]', got '", v, "'");
  c.forced = true;
  return c;
}

template <typename T, int MG, int MW, int N, int STAGES, int WN>
bool try_launch(const DecodeParams& p, int smem_limit, const ConfigChoice& choice, cudaStream_t stream) {
  if (choice.forced &&
      (choice.mg != MG || choice.mw != MW || choice.n != N || choice.stages != STAGES || choice.wn != WN))
    return false;
  const size_t smem = SmemLayout<T, MG, N, STAGES, WN>::total(p.head_dim_padded);
  if (smem > size_t(smem_limit)) return false;
  auto kernel = mla_decode_portable_kernel<T, MG, MW, N, STAGES, WN>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  constexpr int M = 16 * MG;
  const int m_blocks = (p.rows_per_head_k + M - 1) / M;
  const dim3 grid(p.num_sm_parts, p.num_heads_k * m_blocks, (p.head_dim_v + kColsPerBlock - 1) / kColsPerBlock);
  DecodeParams kp = p;
  kp.kv_evict_first = p.kv_evict_first && m_blocks == 1 && grid.z == 1;  // else blocks share KV through L2
  kernel<<<grid, (MG / MW) * WN * 32, smem, stream>>>(kp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Tries MG's list, then the smaller MGs'. Returns false when nothing was launched.
template <typename T, int MG>
bool launch_rows(const DecodeParams& p, int smem_limit, const ConfigChoice& c, cudaStream_t stream) {
  if constexpr (MG == 4) {
    if (try_launch<T, 4, 2, 64, 2, 4>(p, smem_limit, c, stream)) return true;
    if (try_launch<T, 4, 2, 32, 2, 4>(p, smem_limit, c, stream)) return true;
    return launch_rows<T, 2>(p, smem_limit, c, stream);
  } else if constexpr (MG == 2) {
    if (try_launch<T, 2, 2, 64, 2, 8>(p, smem_limit, c, stream)) return true;
    if (try_launch<T, 2, 2, 32, 4, 4>(p, smem_limit, c, stream)) return true;
    if (try_launch<T, 2, 2, 32, 3, 4>(p, smem_limit, c, stream)) return true;
    if (try_launch<T, 2, 2, 32, 2, 4>(p, smem_limit, c, stream)) return true;
    return launch_rows<T, 1>(p, smem_limit, c, stream);
  } else {
    static_assert(MG == 1, "MG is 1, 2 or 4");
    if (try_launch<T, 1, 1, 64, 2, 8>(p, smem_limit, c, stream)) return true;
    if (try_launch<T, 1, 1, 32, 4, 4>(p, smem_limit, c, stream)) return true;
    if (try_launch<T, 1, 1, 32, 3, 4>(p, smem_limit, c, stream)) return true;
    return try_launch<T, 1, 1, 32, 2, 4>(p, smem_limit, c, stream);
  }
}

template <typename T>
void launch_decode(const DecodeParams& p, int smem_limit, cudaStream_t stream) {
  const ConfigChoice choice = config_choice();
  bool launched;
  if (choice.forced)
    launched = launch_rows<T, 4>(p, smem_limit, choice, stream);
  else if (p.rows_per_head_k <= 16)
    launched = launch_rows<T, 1>(p, smem_limit, choice, stream);
  else if (p.rows_per_head_k <= 32)
    launched = launch_rows<T, 2>(p, smem_limit, choice, stream);
  else
    launched = launch_rows<T, 4>(p, smem_limit, choice, stream);
  TORCH_CHECK(launched || !choice.forced, "FLASHMLA_PORTABLE_CONFIG=", choice.mg, ",", choice.mw, ",", choice.n, ",",
              choice.stages, ",", choice.wn, " is not a configuration of the portable kernel or does not fit ",
              smem_limit, " bytes of shared memory for head_dim ", p.head_dim);
  TORCH_CHECK(launched, "flash_mla_with_kvcache: head_dim ", p.head_dim,
              " is too large for the CUDA kernel's shared memory (", smem_limit, " bytes per block)");
}

}  // namespace portable
}  // namespace flashmla
