#include "decode_sm90_launch.cuh"

namespace flashmla {
bool launch_sm90_decode_fp16(const DecodeParams& p, cudaStream_t stream) {
  return sm90::launch_decode<__half>(p, stream);
}
}  // namespace flashmla
