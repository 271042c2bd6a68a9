#include "decode_sm90_launch.cuh"

namespace flashmla {
bool launch_sm90_decode_bf16(const DecodeParams& p, cudaStream_t stream) {
  return sm90::launch_decode<__nv_bfloat16>(p, stream);
}
}  // namespace flashmla
