// Entry points of the separately compiled decode kernels (one .cu per dtype, built in parallel).
#pragma once
#include <cuda_runtime.h>

#include "decode_params.h"

namespace flashmla {
void launch_portable_decode_bf16(const DecodeParams& p, int smem_limit, cudaStream_t stream);
void launch_portable_decode_fp16(const DecodeParams& p, int smem_limit, cudaStream_t stream);
}  // namespace flashmla
