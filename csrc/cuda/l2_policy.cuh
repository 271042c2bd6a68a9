// L2 eviction priority of the KV stream (cache-policy operands of cp.async / TMA, sm_80+).
// With DecodeParams::kv_evict_first the decode marks its KV and q loads evict-first. The KV stream
// (hundreds of MB, each byte read by one block, or by the two row-tile blocks of a KV head on the
// Hopper kernel at 65-128 rows) then gives way in L2 to the fp32 partial results the blocks write,
// which the combine kernel reads right after the decode. Which calls ask for it, per kernel, and what
// was measured: kv_evict_first() in mla_cuda.cu.
#pragma once
#include <cstdint>

namespace flashmla {

enum class L2Evict { kFirst, kLast };

// A cache-policy operand (for every line an access brings into L2): priority `kPriority` when `on`,
// evict-normal (the default priority) otherwise.
template <L2Evict kPriority>
__device__ __forceinline__ uint64_t l2_policy_if(bool on) {
  uint64_t policy;
  if (on) {
    if constexpr (kPriority == L2Evict::kFirst)
      asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    else
      asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
  }
  return policy;
}

// Partial results (fp32, written by the Hopper kernel for cut sequences, read once by the combine
// kernel) with DecodeParams::partials_in_l2: stored evict-last, so that the KV stream does not push them out
// of L2 before the combine reads them, and the combine discards each 128-byte line it has read
// (discard.global.L2: the dead line is dropped without being written back to DRAM). The host sets
// it only where partial rows are whole 128-byte lines (head_dim_v % 32 == 0), which is all the
// combine's discards need; the launchers keep the evict-last stores to one row tile per KV head (at
// 64 rows the partials of a step are ~33 MB of the 50 MB L2; with two row tiles they would crowd out
// the KV that the two tiles share through L2). Metadata not built by get_mla_metadata (num_splits not
// increasing) can make two sequences share partial rows; their results are unspecified then anyway,
// and the discards stay inside the partial buffer.
__device__ __forceinline__ uint64_t partials_l2_policy(bool in_l2) { return l2_policy_if<L2Evict::kLast>(in_l2); }

// dst[0], dst[1] = a, b (8-byte aligned) with an L2 cache policy.
__device__ __forceinline__ void store_float2_policy(float* dst, float a, float b, uint64_t policy) {
  asm volatile("st.global.L2::cache_hint.v2.f32 [%0], {%1, %2}, %3;\n" ::"l"(dst), "f"(a), "f"(b), "l"(policy)
               : "memory");
}

// Drops the 128-byte L2 line at `line` (128-byte aligned) without writing it back; its contents are
// undefined afterwards. Only for lines no one reads again.
__device__ __forceinline__ void discard_l2_line(const void* line) {
  asm volatile("discard.global.L2 [%0], 128;\n" ::"l"(line) : "memory");
}

__device__ __forceinline__ uint64_t kv_l2_policy(bool evict_first) {
  return l2_policy_if<L2Evict::kFirst>(evict_first);
}

}  // namespace flashmla
