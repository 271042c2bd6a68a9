// Entry points of the separately compiled decode kernels (one .cu per dtype, built in parallel).
#pragma once
#include <cuda_runtime.h>

#include "decode_params.h"

namespace flashmla {
void launch_portable_decode_bf16(const DecodeParams& p, int smem_limit, cudaStream_t stream);
void launch_portable_decode_fp16(const DecodeParams& p, int smem_limit, cudaStream_t stream);
// Hopper kernel (sm_90a builds only): head_dim 576 or 512, head_dim_v 512, 16-byte aligned rows.
// Returns false, launching nothing, for calls outside that.
bool launch_sm90_decode_bf16(const DecodeParams& p, cudaStream_t stream);
bool launch_sm90_decode_fp16(const DecodeParams& p, cudaStream_t stream);
}  // namespace flashmla
