// L2 eviction priority of the KV stream (cache-policy operands of cp.async / TMA, sm_80+).
// When no two blocks read the same KV bytes (one row tile per KV head and one output-channel chunk:
// DecodeParams::kv_evict_first, decided by the launchers), the decode marks its KV and q loads
// evict-first. The KV stream (hundreds of MB, each byte used once) then gives way in L2 to the fp32
// partial results the blocks write, which the combine kernel reads right after the decode.
// Which calls ask for it: kv_evict_first() in mla_cuda.cu.
#pragma once
#include <cstdint>

namespace flashmla {

__device__ __forceinline__ uint64_t kv_l2_policy(bool evict_first) {
  uint64_t policy;
  if (evict_first)
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  else
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

}  // namespace flashmla
