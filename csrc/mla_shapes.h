// Argument checking and output shapes, written once and used by every device's kernels.
// flashmla_ops/fake.py mirrors these rules for tracing; tests/test_shapes.py holds the two equal.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

namespace flashmla {

// Sizes of one fwd_kvcache_mla call, after every argument was checked.
struct MlaShapes {
  int64_t batch, seqlen_q, num_heads_q, head_dim, head_dim_v;
  int64_t num_blocks, page_block_size, num_heads_k, max_blocks_per_seq;
  int64_t num_heads_per_head_k;  // num_heads_q / num_heads_k
  int64_t rows_per_head_k;       // seqlen_q * num_heads_per_head_k: query rows sharing one KV head
  int64_t num_sm_parts;          // workers in the schedule (tile_scheduler_metadata.size(0))
};

// Checks everything that can be checked without reading device memory and returns the sizes.
// Errors name the argument and say expected vs actual.
MlaShapes check_fwd_args(const at::Tensor& q, const at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache,
                         int64_t head_dim_v, const at::Tensor& cache_seqlens, const at::Tensor& block_table,
                         double softmax_scale, const at::Tensor& tile_scheduler_metadata, const at::Tensor& num_splits);

// Checks get_mla_metadata's arguments.
void check_metadata_args(const at::Tensor& cache_seqlens, int64_t num_heads_per_head_k, int64_t num_heads_k);

// Host-side value checks for CPU inputs (CUDA masks these cases on the device instead):
// lengths in [0, capacity]; block ids of live blocks in [0, num_blocks).
void check_fwd_values_on_host(const MlaShapes& s, const at::Tensor& cache_seqlens, const at::Tensor& block_table);

// Outputs: out (batch, seqlen_q, num_heads_q, head_dim_v) of q's dtype, softmax_lse
// (batch, num_heads_q, seqlen_q) float32.
std::tuple<at::Tensor, at::Tensor> empty_fwd_outputs(const at::Tensor& q, const MlaShapes& s);

}  // namespace flashmla
