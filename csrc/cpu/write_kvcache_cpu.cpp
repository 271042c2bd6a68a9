// CPU kernel of write_kvcache: token i is copied whole (kv_c[i] then k_pe[i]) into the cache row at
// flat slot slot_mapping[i] = block * page_block_size + offset; slot -1 skips the token.
//
// Every slot is checked before anything is written, so a bad slot_mapping raises and leaves k_cache
// unchanged. Tokens are then copied in parallel (at::parallel_for over tokens).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../write_kvcache_shapes.h"

namespace flashmla {
namespace {

template <typename Index>
void check_slots_on_host(const Index* slots, const WriteKvcacheShapes& s) {
  for (int64_t i = 0; i < s.num_tokens; ++i) {
    const int64_t slot = slots[i * s.slot_stride];
    TORCH_CHECK(slot >= -1 && slot < s.num_slots, "write_kvcache: slot_mapping[", i, "] = ", slot,
                " is outside [-1, num_blocks * page_block_size = ", s.num_slots, ") (-1 skips a token)");
  }
}

// Copies `count` elements from a source with element stride `stride` to contiguous `dst`.
template <typename T>
void copy_channels(T* dst, const T* src, int64_t count, int64_t stride) {
  if (stride == 1) {
    std::copy(src, src + count, dst);
  } else {
    for (int64_t c = 0; c < count; ++c) dst[c] = src[c * stride];
  }
}

template <typename T, typename Index>
void write_tokens(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& k_cache, const Index* slots,
                  const WriteKvcacheShapes& s) {
  const T* kv_c_ptr = kv_c.const_data_ptr<T>();
  const T* k_pe_ptr = k_pe.const_data_ptr<T>();
  T* cache = k_cache.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.d_c + s.d_pe));
  at::parallel_for(0, s.num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = slots[i * s.slot_stride];
      if (slot < 0) continue;  // -1: padding token, nothing to write
      T* dst =
          cache + (slot / s.page_block_size) * s.cache_stride_block + (slot % s.page_block_size) * s.cache_stride_token;
      copy_channels(dst, kv_c_ptr + i * s.kv_c_stride_token, s.d_c, s.kv_c_stride_channel);
      copy_channels(dst + s.d_c, k_pe_ptr + i * s.k_pe_stride_token, s.d_pe, s.k_pe_stride_channel);
    }
  });
}

void write_kvcache_cpu(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& k_cache,
                       const at::Tensor& slot_mapping) {
  const WriteKvcacheShapes s = check_write_kvcache_args(kv_c, k_pe, k_cache, slot_mapping);
  if (s.num_tokens == 0) return;
  AT_DISPATCH_INDEX_TYPES(slot_mapping.scalar_type(), "write_kvcache_cpu", [&] {
    const index_t* slot_ptr = slot_mapping.const_data_ptr<index_t>();
    check_slots_on_host(slot_ptr, s);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "write_kvcache_cpu",
                                    [&] { write_tokens<scalar_t>(kv_c, k_pe, k_cache, slot_ptr, s); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(flashmla, CPU, m) { m.impl("write_kvcache", &write_kvcache_cpu); }

}  // namespace flashmla
