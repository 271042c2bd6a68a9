#include "decode_portable_launch.cuh"
#include "decode_launchers.h"

namespace flashmla {
void launch_portable_decode_fp16(const DecodeParams& p, int smem_limit, cudaStream_t stream) {
  portable::launch_decode<__half>(p, smem_limit, stream);
}
}  // namespace flashmla
