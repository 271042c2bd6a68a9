#include "write_kvcache_shapes.h"

#include "arg_checks.h"

namespace flashmla {
constexpr const char* kOp = "write_kvcache";

WriteKvcacheShapes check_write_kvcache_args(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& k_cache,
                                            const at::Tensor& slot_mapping) {
  check_rank(kOp, kv_c, "kv_c", 2, "(num_tokens, d_c)");
  check_rank(kOp, k_pe, "k_pe", 2, "(num_tokens, d_pe)");
  check_rank(kOp, k_cache, "k_cache", 4, "(num_blocks, page_block_size, 1, d_c + d_pe)");
  check_rank(kOp, slot_mapping, "slot_mapping", 1, "(num_tokens,)");

  const auto dt = k_cache.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat,
              "write_kvcache: k_cache must be bfloat16, float16 or float32, got ", dt);
  TORCH_CHECK(kv_c.scalar_type() == dt, "write_kvcache: kv_c dtype (", kv_c.scalar_type(),
              ") must equal k_cache dtype (", dt, ")");
  TORCH_CHECK(k_pe.scalar_type() == dt, "write_kvcache: k_pe dtype (", k_pe.scalar_type(),
              ") must equal k_cache dtype (", dt, ")");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt,
              "write_kvcache: slot_mapping must be int64 or int32, got ", slot_mapping.scalar_type());

  check_same_device(kOp, kv_c, "kv_c", k_cache, "k_cache");
  check_same_device(kOp, k_pe, "k_pe", k_cache, "k_cache");
  check_same_device(kOp, slot_mapping, "slot_mapping", k_cache, "k_cache");

  const int64_t n = kv_c.size(0);
  TORCH_CHECK(k_pe.size(0) == n, "write_kvcache: k_pe.size(0) (", k_pe.size(0), ") must equal kv_c.size(0) (", n,
              "), the number of tokens");
  TORCH_CHECK(slot_mapping.size(0) == n, "write_kvcache: slot_mapping.size(0) (", slot_mapping.size(0),
              ") must equal kv_c.size(0) (", n, "), the number of tokens");
  TORCH_CHECK(k_cache.size(2) == 1, "write_kvcache: k_cache.size(2) (num_heads_k) must be 1, got shape ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.size(3) == kv_c.size(1) + k_pe.size(1), "write_kvcache: k_cache.size(3) (", k_cache.size(3),
              ") must equal kv_c.size(1) + k_pe.size(1) (", kv_c.size(1), " + ", k_pe.size(1), ")");
  TORCH_CHECK(k_cache.stride(3) == 1, "write_kvcache: k_cache must have stride 1 in its last dimension, got ",
              k_cache.stride(3));

  WriteKvcacheShapes s{};
  s.num_tokens = n;
  s.d_c = kv_c.size(1);
  s.d_pe = k_pe.size(1);
  s.page_block_size = k_cache.size(1);
  s.num_slots = k_cache.size(0) * k_cache.size(1);
  s.kv_c_stride_token = kv_c.stride(0);
  s.kv_c_stride_channel = kv_c.stride(1);
  s.k_pe_stride_token = k_pe.stride(0);
  s.k_pe_stride_channel = k_pe.stride(1);
  s.cache_stride_block = k_cache.stride(0);
  s.cache_stride_token = k_cache.stride(1);
  s.slot_stride = slot_mapping.stride(0);
  return s;
}

}  // namespace flashmla
