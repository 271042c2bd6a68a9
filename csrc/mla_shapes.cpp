#include "mla_shapes.h"

#include "arg_checks.h"
#include "schedule.h"

namespace flashmla {
constexpr const char* kOp = "flash_mla_with_kvcache";

MlaShapes check_fwd_args(const at::Tensor& q, const at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache,
                         int64_t head_dim_v, const at::Tensor& cache_seqlens, const at::Tensor& block_table,
                         double softmax_scale, const at::Tensor& tile_scheduler_metadata,
                         const at::Tensor& num_splits) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat,
              "flash_mla_with_kvcache: q must be bfloat16, float16 or float32, got ", dt);
  TORCH_CHECK(k_cache.scalar_type() == dt, "flash_mla_with_kvcache: k_cache dtype (", k_cache.scalar_type(),
              ") must equal q dtype (", dt, ")");
  TORCH_CHECK(!v_cache.has_value(),
              "flash_mla_with_kvcache: v_cache must be None: in MLA, V is the first head_dim_v "
              "channels of k_cache");
  check_rank(kOp, q, "q", 4, "(batch, seq_len_q, num_heads_q, head_dim)");
  check_rank(kOp, k_cache, "k_cache", 4, "(num_blocks, page_block_size, num_heads_k, head_dim)");
  check_rank(kOp, block_table, "block_table", 2, "(batch, max_num_blocks_per_seq)");
  check_rank(kOp, cache_seqlens, "cache_seqlens", 1, "(batch,)");
  check_rank(kOp, tile_scheduler_metadata, "tile_scheduler_metadata", 2, "(num_sm_parts, 8)");
  check_rank(kOp, num_splits, "num_splits", 1, "(batch + 1,)");
  check_same_device(kOp, k_cache, "k_cache", q, "q");
  check_same_device(kOp, block_table, "block_table", q, "q");
  check_same_device(kOp, cache_seqlens, "cache_seqlens", q, "q");
  check_same_device(kOp, tile_scheduler_metadata, "tile_scheduler_metadata", q, "q");
  check_same_device(kOp, num_splits, "num_splits", q, "q");
  check_int32(kOp, block_table, "block_table");
  check_int32(kOp, cache_seqlens, "cache_seqlens");
  check_int32(kOp, tile_scheduler_metadata, "tile_scheduler_metadata");
  check_int32(kOp, num_splits, "num_splits");

  MlaShapes s{};
  s.batch = q.size(0);
  s.seqlen_q = q.size(1);
  s.num_heads_q = q.size(2);
  s.head_dim = q.size(3);
  s.num_blocks = k_cache.size(0);
  s.page_block_size = k_cache.size(1);
  s.num_heads_k = k_cache.size(2);
  s.max_blocks_per_seq = block_table.size(1);
  s.head_dim_v = head_dim_v;
  s.num_sm_parts = tile_scheduler_metadata.size(0);

  TORCH_CHECK(s.batch >= 1, "flash_mla_with_kvcache: q has batch size 0; the batch must not be empty");
  TORCH_CHECK(s.seqlen_q >= 1, "flash_mla_with_kvcache: q must have seq_len_q >= 1, got ", s.seqlen_q);
  TORCH_CHECK(s.num_heads_q >= 1, "flash_mla_with_kvcache: q must have num_heads_q >= 1, got ", s.num_heads_q);
  TORCH_CHECK(s.head_dim >= 1, "flash_mla_with_kvcache: q must have head_dim >= 1, got ", s.head_dim);
  TORCH_CHECK(k_cache.size(3) == s.head_dim, "flash_mla_with_kvcache: k_cache head_dim (", k_cache.size(3),
              ") must equal q head_dim (", s.head_dim, ")");
  TORCH_CHECK(s.num_blocks >= 1 && s.page_block_size >= 1,
              "flash_mla_with_kvcache: k_cache must have num_blocks >= 1 and page_block_size >= 1, got shape ",
              k_cache.sizes());
  TORCH_CHECK(s.num_heads_k >= 1 && s.num_heads_q % s.num_heads_k == 0, "flash_mla_with_kvcache: num_heads_q (",
              s.num_heads_q, ") must be a multiple of num_heads_k (k_cache.size(2) = ", s.num_heads_k, ")");
  TORCH_CHECK(head_dim_v >= 1 && head_dim_v <= s.head_dim, "flash_mla_with_kvcache: head_dim_v (", head_dim_v,
              ") must be in [1, head_dim = ", s.head_dim, "]");
  TORCH_CHECK(q.stride(3) == 1, "flash_mla_with_kvcache: q must have stride 1 in its last dimension, got ",
              q.stride(3));
  TORCH_CHECK(k_cache.stride(3) == 1, "flash_mla_with_kvcache: k_cache must have stride 1 in its last dimension, got ",
              k_cache.stride(3));
  TORCH_CHECK(block_table.size(0) == s.batch, "flash_mla_with_kvcache: block_table batch size (", block_table.size(0),
              ") must equal q batch size (", s.batch, ")");
  TORCH_CHECK(s.max_blocks_per_seq >= 1,
              "flash_mla_with_kvcache: block_table must have at least one column, got shape ", block_table.sizes());
  TORCH_CHECK(cache_seqlens.size(0) == s.batch, "flash_mla_with_kvcache: cache_seqlens size (", cache_seqlens.size(0),
              ") must equal q batch size (", s.batch, ")");
  TORCH_CHECK(num_splits.size(0) == s.batch + 1, "flash_mla_with_kvcache: num_splits size (", num_splits.size(0),
              ") must equal batch + 1 (", s.batch + 1, "); was the metadata built for another batch?");
  TORCH_CHECK(s.num_sm_parts >= 1 && tile_scheduler_metadata.size(1) == kMetadataWidth,
              "flash_mla_with_kvcache: tile_scheduler_metadata must have shape (num_sm_parts >= 1, ", kMetadataWidth,
              "), got ", tile_scheduler_metadata.sizes());
  TORCH_CHECK(softmax_scale > 0 && std::isfinite(softmax_scale),
              "flash_mla_with_kvcache: softmax_scale must be positive and finite, got ", softmax_scale);
  TORCH_CHECK(s.max_blocks_per_seq * s.page_block_size < (int64_t(1) << 31),
              "flash_mla_with_kvcache: block_table capacity (max_num_blocks_per_seq * page_block_size) must be < 2^31");
  s.num_heads_per_head_k = s.num_heads_q / s.num_heads_k;
  s.rows_per_head_k = s.seqlen_q * s.num_heads_per_head_k;
  return s;
}

void check_metadata_args(const at::Tensor& cache_seqlens, int64_t num_heads_per_head_k, int64_t num_heads_k) {
  TORCH_CHECK(cache_seqlens.dim() == 1, "get_mla_metadata: cache_seqlens must have 1 dimension (batch,), got shape ",
              cache_seqlens.sizes());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt, "get_mla_metadata: cache_seqlens must be int32, got ",
              cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.size(0) >= 1, "get_mla_metadata: cache_seqlens is empty; the batch must not be empty");
  TORCH_CHECK(num_heads_per_head_k >= 1, "get_mla_metadata: num_heads_per_head_k must be >= 1, got ",
              num_heads_per_head_k);
  TORCH_CHECK(num_heads_k >= 1, "get_mla_metadata: num_heads_k must be >= 1, got ", num_heads_k);
}

void check_fwd_values_on_host(const MlaShapes& s, const at::Tensor& cache_seqlens, const at::Tensor& block_table) {
  const auto lens = cache_seqlens.contiguous();
  const auto table = block_table.contiguous();
  const int* len = lens.data_ptr<int>();
  const int* tab = table.data_ptr<int>();
  const int64_t capacity = s.max_blocks_per_seq * s.page_block_size;
  for (int64_t i = 0; i < s.batch; ++i) {
    TORCH_CHECK(len[i] >= 0, "flash_mla_with_kvcache: cache_seqlens[", i, "] = ", len[i], " is negative");
    TORCH_CHECK(len[i] <= capacity, "flash_mla_with_kvcache: cache_seqlens[", i, "] = ", len[i],
                " exceeds the block_table capacity max_num_blocks_per_seq * page_block_size = ", capacity);
    const int64_t live_blocks = (len[i] + s.page_block_size - 1) / s.page_block_size;
    for (int64_t j = 0; j < live_blocks; ++j) {
      const int id = tab[i * s.max_blocks_per_seq + j];
      TORCH_CHECK(id >= 0 && id < s.num_blocks, "flash_mla_with_kvcache: block_table[", i, ", ", j, "] = ", id,
                  " holds live tokens of sequence ", i, " but is outside [0, num_blocks = ", s.num_blocks, ")");
    }
  }
}

std::tuple<at::Tensor, at::Tensor> empty_fwd_outputs(const at::Tensor& q, const MlaShapes& s) {
  auto out = at::empty({s.batch, s.seqlen_q, s.num_heads_q, s.head_dim_v}, q.options());
  auto lse = at::empty({s.batch, s.num_heads_q, s.seqlen_q}, q.options().dtype(at::kFloat));
  return {out, lse};
}

}  // namespace flashmla
