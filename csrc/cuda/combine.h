#pragma once
#include <cuda_runtime.h>

#include "decode_params.h"

namespace flashmla {
// Merges the partial pieces of split sequences into p.out / p.lse (see combine.cu).
void launch_combine(const DecodeParams& p, bool is_bf16, cudaStream_t stream);
}  // namespace flashmla
