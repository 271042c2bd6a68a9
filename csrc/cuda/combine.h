#pragma once
#include <cuda_runtime.h>

#include "decode_params.h"

namespace flashmla {
// Merges the partial pieces of split sequences into p.out / p.lse (see combine.cu). programmatic:
// launch it as a programmatic dependent of the decode kernel just launched (sm_90+, pdl.cuh).
void launch_combine(const DecodeParams& p, bool is_bf16, bool programmatic, cudaStream_t stream);
}  // namespace flashmla
