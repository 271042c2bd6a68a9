// Merging a cut sequence inside the decode kernel ("in-decode merge"), both decode kernels.
//
// The schedule (csrc/schedule.h) hands the pieces of a cut sequence to consecutive workers:
// split 0 is the LAST piece of worker `part`, split k >= 1 the FIRST piece of worker part + k. So
// the later pieces are usually written early in their workers' timelines, while split 0 ends its
// worker's. The block holding split 0 therefore waits for the later pieces (a per-(sequence, KV head,
// row tile) counter), merges them by LSE with its own result, still in registers, and writes the
// output itself. Its own fp32 partial is never written, and the combine kernel has nothing left to
// read for that sequence: at 64 query rows ~128 KiB less written and ~256 KiB less read per cut
// sequence, and no merge after the decode.
//
// Deadlock freedom, for ANY metadata:
//   - only split-0 blocks wait, and only at the end of their last piece; split k >= 1 pieces never
//     wait, and are the first thing their worker does, so every awaited piece is written by a block
//     that waits for nothing before writing it;
//   - a block waits only if the metadata says pieces 1 .. count-1 are the first pieces of workers
//     part+1 .. part+count-1 (merges_in_decode checks it), so nobody waits for a piece no block writes;
//   - the launchers turn the merge on only when the whole grid is co-resident (occupancy check, and
//     a cooperative launch, which fails rather than hangs if that is ever not true).
// Otherwise (or when a sequence has more than p.merge_max_pieces pieces) split 0 writes its partial
// result and the combine kernel merges as before; it skips the sequences whose counter says
// kMergedInDecode. Both paths compute the same formula (combine.cu); results are deterministic, as
// which path a sequence takes depends only on the metadata and the launch, never on timing.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../schedule.h"
#include "decode_params.h"

namespace flashmla {

constexpr int kMergedInDecode = -(1 << 30);  // counter value once split 0 merged the sequence
constexpr int kMaxMergePieces = 8;           // upper bound of DecodeParams::merge_max_pieces

// The counter of (sequence b, KV head hk, row tile) for a decode kernel with tile_rows rows per block.
__host__ __device__ inline int64_t split_counter_index(const DecodeParams& p, int b, int hk, int tile, int tile_rows) {
  const int tiles = (p.rows_per_head_k + tile_rows - 1) / tile_rows;
  return (int64_t(b) * p.num_heads_k + hk) * tiles + tile;
}

// Whether the block of worker `part` holding piece `split` of sequence b (cut into `count` pieces)
// merges the sequence itself. Uniform over the block (it reads only the metadata).
__device__ __forceinline__ bool merges_in_decode(const DecodeParams& p, int part, int b, int split, int count) {
  if (p.split_ready == nullptr || split != 0 || count < 2 || count > p.merge_max_pieces) return false;
  for (int k = 1; k < count; ++k) {
    const int q = part + k;
    if (q >= p.num_sm_parts) return false;
    const int* md = p.metadata + q * kMetadataWidth;
    if (md[0] != b || md[4] != k || md[2] < b) return false;
  }
  return true;
}

// What the block holding one piece of sequence b does about the merge. Built at the end of the piece
// (not before its main loop, where these values would only take registers).
struct PieceMerge {
  int count;        // pieces of the sequence
  int split_first;  // the sequence's first row in the partial buffers
  bool merge_here;  // this block (split 0) merges the sequence and writes the output
  bool publish;     // this piece is a later piece (split >= 1): count it when written
  int* counter;     // the (sequence, KV head, row tile) counter, nullptr when the merge is off
  int hk;
  // Row of the partial buffers holding query row `row` of piece k (clamped like the decode's writes).
  __device__ int64_t partial_row(const DecodeParams& p, int k, int row) const {
    return (int64_t(min(max(split_first + k, 0), p.partial_rows - 1)) * p.num_heads_k + hk) * p.rows_per_head_k + row;
  }
};

__device__ __forceinline__ PieceMerge piece_merge(const DecodeParams& p, int part, int b, int hk, int tile,
                                                  int tile_rows) {
  const int* md = p.metadata + part * kMetadataWidth;
  PieceMerge m;
  m.split_first = p.num_splits[b];
  m.count = p.num_splits[b + 1] - m.split_first;
  m.hk = hk;
  const int split = b == md[0] ? md[4] : 0;
  m.merge_here = merges_in_decode(p, part, b, split, m.count);
  m.publish = p.split_ready != nullptr && m.count != 1 && split >= 1;
  m.counter = p.split_ready != nullptr ? p.split_ready + split_counter_index(p, b, hk, tile, tile_rows) : nullptr;
  return m;
}

// A later piece (split >= 1) of a cut sequence was written: call from one thread after every thread
// that stored a part of it ran __threadfence() and the block (or the storing threads) synchronised.
__device__ __forceinline__ void publish_piece(int* counter) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(counter) : "memory");
}

// Spins (one thread) until `target` later pieces were published; the caller then synchronises the
// threads that read them (acquire here + barrier = the pieces' stores are visible to all of them).
__device__ __forceinline__ void wait_for_pieces(const int* counter, int target) {
  int ns = 32;
  for (;;) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(counter) : "memory");
    if (v >= target) return;
    __nanosleep(ns);
    ns = ns < 1024 ? 2 * ns : ns;
  }
}

// The LSE merge of one query row: this block's piece (lse_own, natural log; -inf if it saw nothing)
// and pieces 1 .. count-1 from the partial buffers. Same formula as combine.cu:
//   lse = log sum_k exp(lse_k),  out = sum_k exp(lse_k - lse) out_k;  all -inf -> out = 0, lse = +inf.
// Loops are not unrolled: this runs once per piece, and must not take registers from the main loop.
struct RowMerge {
  float max_lse, inv_sum;
  float own_weight;  // exp(lse_own - lse)
  float lse;         // the merged row's lse (+inf if every piece was empty)
  __device__ float weight(float lse_k) const { return expf(lse_k - max_lse) * inv_sum; }
};

__device__ __forceinline__ float piece_lse(const DecodeParams& p, const PieceMerge& pm, int k, int row) {
  return __ldcg(p.partial_lse + pm.partial_row(p, k, row));
}

__device__ __forceinline__ RowMerge merge_row_weights(const DecodeParams& p, const PieceMerge& pm, int row,
                                                      float lse_own) {
  float max_lse = lse_own;
#pragma unroll 1
  for (int k = 1; k < pm.count; ++k) max_lse = fmaxf(max_lse, piece_lse(p, pm, k, row));
  RowMerge m{};
  if (max_lse == -INFINITY) {  // no piece saw a token: out = 0 (every weight() is 0)
    m.lse = INFINITY;
    return m;
  }
  float sum = expf(lse_own - max_lse);
#pragma unroll 1
  for (int k = 1; k < pm.count; ++k) sum += expf(piece_lse(p, pm, k, row) - max_lse);
  m.max_lse = max_lse;
  m.inv_sum = 1.f / sum;
  m.own_weight = expf(lse_own - max_lse) * m.inv_sum;
  m.lse = max_lse + logf(sum);
  return m;
}

// ---- Host side (the launchers) ------------------------------------------------------------------

// Keeps p.split_ready only if the kernel can merge this call (kernel_can: e.g. each block holds all
// head_dim_v channels) and every block of the launch (`blocks` of `kernel` with `threads` threads and
// `smem` bytes) can be resident at once; records the row tile the counters are indexed by. Returns
// whether the merge is on.
template <typename Kernel>
bool enable_in_decode_merge(DecodeParams& p, Kernel kernel, int threads, size_t smem, int64_t blocks, bool kernel_can,
                            int tile_rows) {
  bool on = p.split_ready != nullptr && kernel_can;
  if (on) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    on = int64_t(per_sm) * p.sm_count >= blocks;
  }
  if (!on) p.split_ready = nullptr;
  p.merge_tile_rows = on ? tile_rows : 0;
  return on;
}

// Launches a decode kernel; as a cooperative launch when the in-decode merge is on, so that a grid
// that cannot be co-resident fails to launch instead of waiting forever.
template <typename Kernel, typename Arg>
void launch_decode_grid(Kernel kernel, dim3 grid, int threads, size_t smem, bool cooperative, cudaStream_t stream,
                        const Arg& arg) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeCooperative;
  attr.val.cooperative = 1;
  config.attrs = &attr;
  config.numAttrs = cooperative ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, arg));
}

}  // namespace flashmla
