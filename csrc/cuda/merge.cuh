// Merging the partial results of a sequence cut into several pieces, by their LSE:
//   lse = log sum_k exp(lse_k),  out = sum_k exp(lse_k - lse) out_k.
// Rows where every piece saw nothing (all lse_k = -inf) get out = 0, lse = +inf.
//
// Two users: the combine kernel (combine.cu, one launch after the decode) and the decode kernels
// themselves (arrive_and_merge below: the block that writes a sequence's last piece merges it).
// Partial results are read with ld.global.cg (L2): they were written by other blocks of the same grid.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "decode_params.h"
#include "dtype.cuh"

namespace flashmla {

// Pieces of sequence b: partial rows [first, first + count), clamped so that metadata built for other
// lengths can never index outside the buffers.
struct PieceRange {
  int first, count;
};
__device__ __forceinline__ PieceRange piece_range(const DecodeParams& p, int b) {
  PieceRange r;
  r.first = min(max(p.num_splits[b], 0), p.partial_rows);
  r.count = min(p.num_splits[b + 1] - p.num_splits[b], p.partial_rows - r.first);
  return r;
}

// One warp merges query row `row` of KV head hk of sequence b (pieces pr.count >= 2) into p.out / p.lse.
// Each piece's weight exp(lse_k - lse) is computed once.
template <typename T>
__device__ void merge_row(const DecodeParams& p, int b, int hk, int row, PieceRange pr, int lane) {
  auto lse_of = [&](int k) {
    return __ldcg(p.partial_lse + (int64_t(pr.first + k) * p.num_heads_k + hk) * p.rows_per_head_k + row);
  };
  float max_lse = -INFINITY;
  for (int k = lane; k < pr.count; k += 32) max_lse = fmaxf(max_lse, lse_of(k));
  for (int off = 16; off > 0; off /= 2) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffff, max_lse, off));
  float sum = 0.f;
  if (max_lse != -INFINITY) {
    for (int k = lane; k < pr.count; k += 32) sum += expf(lse_of(k) - max_lse);
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffff, sum, off);
  }
  const int g = p.num_heads_per_head_k;
  const int qi = row / g, head = hk * g + row % g;
  T* dst = static_cast<T*>(p.out) + ((int64_t(b) * p.seqlen_q + qi) * p.num_heads_q + head) * p.head_dim_v;
  float* lse_dst = p.lse + (int64_t(b) * p.num_heads_q + head) * p.seqlen_q + qi;
  if (max_lse == -INFINITY) {
    for (int c = lane; c < p.head_dim_v; c += 32) dst[c] = Dtype<T>::from_float(0.f);
    if (lane == 0) *lse_dst = INFINITY;
    return;
  }
  const float inv_sum = 1.f / sum;
  // Piece k's weight; lane k < 32 keeps the first 32 (handed out by shuffle), later ones are recomputed.
  const float my_weight = lane < pr.count ? expf(lse_of(lane) - max_lse) * inv_sum : 0.f;
  auto weight = [&](int k) {
    return k < 32 ? __shfl_sync(0xffffffff, my_weight, k) : expf(lse_of(k) - max_lse) * inv_sum;
  };
  const float* piece0 =
      p.partial_out + ((int64_t(pr.first) * p.num_heads_k + hk) * p.rows_per_head_k + row) * p.head_dim_v;
  const int64_t piece_stride = int64_t(p.num_heads_k) * p.rows_per_head_k * p.head_dim_v;
  if (p.head_dim_v % 4 == 0) {
    // Each lane owns channels 4 lane + 128 i (float4 loads, 16-byte aligned since head_dim_v % 4 == 0);
    // the pieces are the outer loop, so a lane's kVecs loads of one piece are independent.
    constexpr int kVecs = 4;  // 512 channels per pass
    for (int c0 = 0; c0 < p.head_dim_v; c0 += 128 * kVecs) {
      float4 acc[kVecs];
#pragma unroll
      for (int i = 0; i < kVecs; ++i) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 2
      for (int k = 0; k < pr.count; ++k) {
        const float w = weight(k);
        const float* src = piece0 + k * piece_stride;
#pragma unroll
        for (int i = 0; i < kVecs; ++i) {
          const int c = c0 + 128 * i + 4 * lane;
          if (c < p.head_dim_v) {
            const float4 v = __ldcg(reinterpret_cast<const float4*>(src + c));
            acc[i].x += w * v.x;
            acc[i].y += w * v.y;
            acc[i].z += w * v.z;
            acc[i].w += w * v.w;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int c = c0 + 128 * i + 4 * lane;
        if (c < p.head_dim_v) {
          auto* d2 = reinterpret_cast<typename Dtype<T>::pair*>(dst + c);
          d2[0] = Dtype<T>::make_pair(acc[i].x, acc[i].y);
          d2[1] = Dtype<T>::make_pair(acc[i].z, acc[i].w);
        }
      }
    }
  } else {
    for (int c0 = 0; c0 < p.head_dim_v; c0 += 32) {  // whole warp in every pass: weight() shuffles
      const int c = c0 + lane;
      float acc = 0.f;
      for (int k = 0; k < pr.count; ++k) {
        const float w = weight(k);
        if (c < p.head_dim_v) acc += w * __ldcg(piece0 + k * piece_stride + c);
      }
      if (c < p.head_dim_v) dst[c] = Dtype<T>::from_float(acc);
    }
  }
  if (lane == 0) *lse_dst = max_lse + logf(sum);
}

// Called by all `threads` threads (thread ids tid) of a decode block right after they stored their
// partial results of one piece of sequence b, for rows [row_base, row_base + rows) of KV head hk
// (block row y = blockIdx.y). Counts this block's arrival in p.merge_counters[b * gridDim.y + y];
// every block (blockIdx.z chunks included) that writes a piece of (b, y) arrives once, so the
// block whose arrival is number count * gridDim.z is the last: it merges those rows, every channel.
// sync_or(pred) is a barrier of the `threads` threads returning the OR of pred.
// Ordering (the usual fence + counter pattern): every writer fences its stores before the barrier,
// thread 0 then adds to the counter; the last block's thread 0 fences again before the barrier after
// which its threads read the pieces (through L2).
template <typename T, typename SyncOr>
__device__ void arrive_and_merge(const DecodeParams& p, int b, int hk, int row_base, int rows, int tid, int threads,
                                 SyncOr sync_or) {
  const PieceRange pr = piece_range(p, b);
  __threadfence();
  sync_or(false);
  bool last = false;
  if (tid == 0) {
    const int arrivals = pr.count * int(gridDim.z);
    last = atomicAdd(p.merge_counters + int64_t(b) * gridDim.y + blockIdx.y, 1) == arrivals - 1;
    __threadfence();
  }
  if (!sync_or(last) || pr.count < 2) return;
  for (int r = tid / 32; r < rows; r += threads / 32) {
    const int row = row_base + r;
    if (row < p.rows_per_head_k) merge_row<T>(p, b, hk, row, pr, tid % 32);
  }
}

}  // namespace flashmla
