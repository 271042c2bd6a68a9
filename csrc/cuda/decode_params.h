// What the host passes to the CUDA decode and combine kernels: pointers, sizes, strides (elements).
#pragma once
#include <cstdint>

namespace flashmla {

struct DecodeParams {
  const void* q;           // (batch, seqlen_q, num_heads_q, head_dim)
  const void* k_cache;     // (num_blocks, page_block_size, num_heads_k, head_dim)
  const int* block_table;  // (batch, max_blocks_per_seq)
  const int* seqlens;      // (batch,)
  const int* metadata;     // (num_sm_parts, kMetadataWidth)
  const int* num_splits;   // (batch + 1,)
  void* out;               // (batch, seqlen_q, num_heads_q, head_dim_v), contiguous
  float* lse;              // (batch, num_heads_q, seqlen_q), contiguous
  float* partial_out;      // (partial_rows, num_heads_k, rows_per_head_k, head_dim_v)
  float* partial_lse;      // (partial_rows, num_heads_k, rows_per_head_k)

  int batch, seqlen_q, num_heads_q, num_heads_k, head_dim, head_dim_v;
  int head_dim_padded;  // head_dim rounded up to 32: channels held in shared memory
  int page_block_size, max_blocks_per_seq, num_blocks;
  int num_heads_per_head_k, rows_per_head_k, num_sm_parts;
  int partial_rows;  // rows allocated in partial_out: batch + num_sm_parts
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_block, k_stride_token, k_stride_head;
  int64_t block_table_stride;
  float scale_log2;         // softmax_scale * log2(e): scores are kept in the log2 domain
  float rescale_threshold;  // Hopper kernel's lazy softmax rescale (decode_sm90.cuh max_grew), log2 units, >= 0
  bool causal;
  bool vec16;           // q and k rows are 16-byte aligned with head_dim % 8 == 0
  bool kv_evict_first;  // KV and q loads marked L2 evict-first (l2_policy.cuh): mla_cuda.cu kv_evict_first
                        // decides per kernel; the portable launcher clears it where blocks share KV
  bool partials_in_l2;  // partial results stored evict-last and discarded by the combine (l2_policy.cuh);
                        // Hopper kernel only (mla_cuda.cu clears it for the portable kernel)
  bool sm90_seesaw;     // Hopper kernel: the seesaw consumer schedule (decode_sm90.cuh seesaw_consumers)

#ifdef __CUDACC__
  // The last token that row `row` of a KV head's query rows (query index * num_heads_per_head_k +
  // head; rows past rows_per_head_k, the padding of a row tile, count as the last real row) may see
  // in a sequence of `seqlen` tokens: causal rows see up to their own position (the query tokens
  // are the sequence's last seqlen_q), others every token. Both CUDA kernels use it (the CPU kernel,
  // csrc/cpu/mla_cpu.cpp, states the same rule on its own).
  // g = num_heads_per_head_k. The portable kernel passes its register copy: with the member read here
  // instead, ptxas scheduled its tile loop differently (a change that needs a measurement there); with
  // g passed, both kernels' SASS is what it was when the portable kernel wrote this inline (cuobjdump).
  __device__ __forceinline__ int last_visible(int seqlen, int row, int g) const {
    return causal ? seqlen - seqlen_q + min(row, rows_per_head_k - 1) / g : seqlen - 1;
  }
  __device__ __forceinline__ int last_visible(int seqlen, int row) const {
    return last_visible(seqlen, row, num_heads_per_head_k);
  }
#endif
};

}  // namespace flashmla
