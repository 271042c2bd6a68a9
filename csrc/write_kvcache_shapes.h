// Argument checking for write_kvcache, written once and used by the CPU and CUDA kernels.
// flashmla_ops/fake.py (_write_kvcache_fake) mirrors these rules for tracing; tests/test_write_kvcache.py
// holds the two equal.
#pragma once
#include <ATen/ATen.h>

namespace flashmla {

// Sizes and strides (in elements) of one write_kvcache call, after every argument was checked.
struct WriteKvcacheShapes {
  int64_t num_tokens;       // n = kv_c.size(0) = k_pe.size(0) = slot_mapping.size(0)
  int64_t d_c, d_pe;        // kv_c.size(1), k_pe.size(1); d_c + d_pe = k_cache.size(3)
  int64_t page_block_size;  // k_cache.size(1)
  int64_t num_slots;        // num_blocks * page_block_size: valid slots are [0, num_slots)
  int64_t kv_c_stride_token, kv_c_stride_channel;
  int64_t k_pe_stride_token, k_pe_stride_channel;
  int64_t cache_stride_block, cache_stride_token;  // dims 0 and 1 of k_cache; dim 3 has stride 1
  int64_t slot_stride;                             // slot_mapping.stride(0)
};

// Checks everything that can be checked without reading tensor values: ranks, dtypes (kv_c, k_pe and
// k_cache all bfloat16, float16 or float32 alike; slot_mapping int64 or int32), devices (all on
// k_cache's), sizes, and stride 1 in k_cache's last dim. Errors name the argument and say expected vs
// actual. Slot values are checked by the kernels (CPU: raise; CUDA: skip on the device).
WriteKvcacheShapes check_write_kvcache_args(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& k_cache,
                                            const at::Tensor& slot_mapping);

}  // namespace flashmla
