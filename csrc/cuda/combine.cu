// Merges the partial results of sequences cut into several pieces, by their LSE:
//   lse = log sum_k exp(lse_k),  out = sum_k exp(lse_k - lse) out_k.
// Rows where every piece saw nothing (all lse_k = -inf) get out = 0, lse = +inf.
// One warp per (sequence, KV head, query row); sequences of one piece were written by the decode
// kernel directly and are skipped. Each piece's weight exp(lse_k - lse) is computed once.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "combine.h"
#include "dtype.cuh"
#include "l2_policy.cuh"
#include "pdl.cuh"

namespace flashmla {
namespace {

constexpr int kRowsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32) combine_kernel(const DecodeParams p) {
  const int b = blockIdx.z, hk = blockIdx.y;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.rows_per_head_k) return;
  // Clamped so that metadata built for other lengths can never index outside the buffers.
  const int first = min(max(p.num_splits[b], 0), p.partial_rows);
  const int count = min(p.num_splits[b + 1] - p.num_splits[b], p.partial_rows - first);
  // Every block waits for the decode grid (its partial results complete and visible), even one with
  // nothing to merge: the combine grid then never finishes before the decode grid, so work queued
  // after it on the stream is ordered after the decode too.
  pdl_wait_primary();
  if (count <= 1) return;
  auto lse_of = [&](int k) {
    return p.partial_lse[(int64_t(first + k) * p.num_heads_k + hk) * p.rows_per_head_k + row];
  };
  float max_lse = -INFINITY;
  for (int k = lane; k < count; k += 32) max_lse = fmaxf(max_lse, lse_of(k));
  for (int off = 16; off > 0; off /= 2) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffff, max_lse, off));
  float sum = 0.f;
  if (max_lse != -INFINITY) {
    for (int k = lane; k < count; k += 32) sum += expf(lse_of(k) - max_lse);
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffff, sum, off);
  }
  const int g = p.num_heads_per_head_k;
  const int qi = row / g, head = hk * g + row % g;
  T* dst = static_cast<T*>(p.out) + ((int64_t(b) * p.seqlen_q + qi) * p.num_heads_q + head) * p.head_dim_v;
  if (max_lse == -INFINITY) {
    for (int c = lane; c < p.head_dim_v; c += 32) dst[c] = Dtype<T>::from_float(0.f);
    if (lane == 0) p.lse[(int64_t(b) * p.num_heads_q + head) * p.seqlen_q + qi] = INFINITY;
    return;
  }
  const float inv_sum = 1.f / sum;
  // Piece k's weight; lane k < 32 keeps the first 32 (handed out by shuffle), later ones are recomputed.
  const float my_weight = lane < count ? expf(lse_of(lane) - max_lse) * inv_sum : 0.f;
  auto weight = [&](int k) {
    return k < 32 ? __shfl_sync(0xffffffff, my_weight, k) : expf(lse_of(k) - max_lse) * inv_sum;
  };
  const float* piece0 =
      p.partial_out + ((int64_t(first) * p.num_heads_k + hk) * p.rows_per_head_k + row) * p.head_dim_v;
  const int64_t piece_stride = int64_t(p.num_heads_k) * p.rows_per_head_k * p.head_dim_v;
  // partials_in_l2 (l2_policy.cuh): rows of whole 128-byte lines, each read by this warp only.
  const bool discard = p.partials_in_l2 && p.head_dim_v % 32 == 0;
  if (p.head_dim_v % 4 == 0) {
    // Each lane owns channels 4 lane + 128 i (float4 loads, 16-byte aligned since head_dim_v % 4 == 0);
    // the pieces are the outer loop, so a lane's kVecs loads of one piece are independent.
    constexpr int kVecs = 4;  // 512 channels per pass
    for (int c0 = 0; c0 < p.head_dim_v; c0 += 128 * kVecs) {
      float4 acc[kVecs];
#pragma unroll
      for (int i = 0; i < kVecs; ++i) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 2
      for (int k = 0; k < count; ++k) {
        const float w = weight(k);
        const float* src = piece0 + k * piece_stride;
#pragma unroll
        for (int i = 0; i < kVecs; ++i) {
          const int c = c0 + 128 * i + 4 * lane;
          if (c < p.head_dim_v) {
            const float4 v = *reinterpret_cast<const float4*>(src + c);
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
      if (discard) {
        // The pieces' lines read in this pass are dead: drop them from L2 without a write-back.
        // Lane 8m holds the start of 128-byte line m of each 512-byte group (rows are whole lines).
        __syncwarp();
        if (lane % 8 == 0) {
          for (int k = 0; k < count; ++k) {
#pragma unroll
            for (int i = 0; i < kVecs; ++i) {
              const int c = c0 + 128 * i + 4 * lane;
              if (c < p.head_dim_v) discard_l2_line(piece0 + k * piece_stride + c);
            }
          }
        }
      }
    }
  } else {
    for (int c0 = 0; c0 < p.head_dim_v; c0 += 32) {  // whole warp in every pass: weight() shuffles
      const int c = c0 + lane;
      float acc = 0.f;
      for (int k = 0; k < count; ++k) {
        const float w = weight(k);
        if (c < p.head_dim_v) acc += w * piece0[k * piece_stride + c];
      }
      if (c < p.head_dim_v) dst[c] = Dtype<T>::from_float(acc);
    }
  }
  if (lane == 0) p.lse[(int64_t(b) * p.num_heads_q + head) * p.seqlen_q + qi] = max_lse + logf(sum);
}

}  // namespace

void launch_combine(const DecodeParams& p, bool is_bf16, bool programmatic, cudaStream_t stream) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3((p.rows_per_head_k + kRowsPerBlock - 1) / kRowsPerBlock, p.num_heads_k, p.batch);
  config.blockDim = dim3(kRowsPerBlock * 32);
  config.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attr;
  config.numAttrs = programmatic ? 1 : 0;
  C10_CUDA_CHECK(is_bf16 ? cudaLaunchKernelEx(&config, combine_kernel<__nv_bfloat16>, p)
                         : cudaLaunchKernelEx(&config, combine_kernel<__half>, p));
}

}  // namespace flashmla
