// Merges the partial results of sequences cut into several pieces, by their LSE:
//   lse = log sum_k exp(lse_k),  out = sum_k exp(lse_k - lse) out_k.
// Rows where every piece saw nothing (all lse_k = -inf) get out = 0, lse = +inf.
// One warp per (sequence, KV head, query row); sequences of one piece were written by the decode
// kernel directly and are skipped. Each piece's weight exp(lse_k - lse) is computed once.
// The grid's y runs over the sequences, or, when there are more sequences than workers, over the workers:
// each cut sequence has exactly one piece with split number 1, and it is the first piece of some worker
// q >= 1 (csrc/schedule.h: only a worker's first piece can have split > 0), so worker q merges sequence
// md[q].begin_batch when md[q].begin_split == 1. That grid has no block for the uncut sequences.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../schedule.h"
#include "combine.h"
#include "dtype.cuh"
#include "l2_policy.cuh"
#include "pdl.cuh"

namespace flashmla {
namespace {

constexpr int kRowsPerBlock = 8;

// Whether the grid's y runs over the workers rather than the sequences (see the top of this file).
__host__ __device__ inline bool combine_by_worker(const DecodeParams& p) { return p.batch > p.num_sm_parts; }

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32) combine_kernel(const DecodeParams p) {
  const int hk = blockIdx.z;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // The metadata and num_splits are inputs of the decode grid, complete before it started, so they are read
  // before the wait: only the partial results need it.
  int b = blockIdx.y;
  if (combine_by_worker(p)) {
    const int* md = p.metadata + blockIdx.y * kMetadataWidth;
    b = blockIdx.y > 0 && md[4] == 1 ? md[0] : -1;
  }
  const bool active = row < p.rows_per_head_k && b >= 0 && b < p.batch;
  b = active ? b : 0;
  // Clamped so that metadata built for other lengths can never index outside the buffers.
  const int first = min(max(p.num_splits[b], 0), p.partial_rows);
  const int count = active ? min(p.num_splits[b + 1] - p.num_splits[b], p.partial_rows - first) : 0;
  // Every block waits for the decode grid (its partial results complete and visible), even one with
  // nothing to merge: the combine grid then never finishes before the decode grid, so work queued
  // after it on the stream is ordered after the decode too.
  pdl_wait_primary();
  if (count <= 1) return;
  const float* piece0 =
      p.partial_out + ((int64_t(first) * p.num_heads_k + hk) * p.rows_per_head_k + row) * p.head_dim_v;
  const int64_t piece_stride = int64_t(p.num_heads_k) * p.rows_per_head_k * p.head_dim_v;
  // The float4 path: each lane owns channels 4 lane + 128 i of a 512-channel pass (16-byte aligned since
  // head_dim_v % 4 == 0). Pieces 0 and 1 of the first pass (a merged sequence has at least two) are loaded
  // here, before the weights are known, so those loads overlap the LSE loads and reductions below.
  constexpr int kVecs = 4;
  const bool vec4 = p.head_dim_v % 4 == 0;
  auto load_pass = [&](int k, int c0, float4(&v)[kVecs]) {
    const float* src = piece0 + k * piece_stride;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int c = c0 + 128 * i + 4 * lane;
      v[i] = c < p.head_dim_v ? *reinterpret_cast<const float4*>(src + c) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  float4 piece0_pass0[kVecs], piece1_pass0[kVecs];
  if (vec4) {
    load_pass(0, 0, piece0_pass0);
    load_pass(1, 0, piece1_pass0);
  }
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
  // partials_in_l2 (l2_policy.cuh): rows of whole 128-byte lines, each read by this warp only.
  const bool discard = p.partials_in_l2 && p.head_dim_v % 32 == 0;
  if (vec4) {
    // The pieces are the outer loop, so a lane's kVecs loads of one piece are independent.
    auto accumulate = [&](float w, const float4(&v)[kVecs], float4(&acc)[kVecs]) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        acc[i].x += w * v[i].x, acc[i].y += w * v[i].y, acc[i].z += w * v[i].z, acc[i].w += w * v[i].w;
      }
    };
    // Pass 0 starts from pieces 0 and 1, loaded above (their registers are free before the loop).
    float4 acc[kVecs];
#pragma unroll
    for (int i = 0; i < kVecs; ++i) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    accumulate(weight(0), piece0_pass0, acc);
    accumulate(weight(1), piece1_pass0, acc);
    for (int c0 = 0; c0 < p.head_dim_v; c0 += 128 * kVecs) {
      if (c0 > 0) {
#pragma unroll
        for (int i = 0; i < kVecs; ++i) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll 1
      for (int k = c0 == 0 ? 2 : 0; k < count; ++k) {
        float4 v[kVecs];
        load_pass(k, c0, v);
        accumulate(weight(k), v, acc);
      }
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int c = c0 + 128 * i + 4 * lane;
        if (c < p.head_dim_v) {
          // One 8-byte store per lane (out rows are 8-byte aligned: contiguous, head_dim_v % 4 == 0), so a
          // warp's stores fill whole 32-byte sectors.
          const typename Dtype<T>::pair lo = Dtype<T>::make_pair(acc[i].x, acc[i].y);
          const typename Dtype<T>::pair hi = Dtype<T>::make_pair(acc[i].z, acc[i].w);
          *reinterpret_cast<uint2*>(dst + c) =
              make_uint2(*reinterpret_cast<const unsigned*>(&lo), *reinterpret_cast<const unsigned*>(&hi));
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
  // y: min(batch, num_sm_parts) units, within the 65535 of a grid's y unless both are larger.
  const int units = combine_by_worker(p) ? p.num_sm_parts : p.batch;
  TORCH_CHECK(units <= 65535, "flash_mla_with_kvcache: batch (", p.batch,
              ") and tile_scheduler_metadata's num_sm_parts (", p.num_sm_parts,
              ") are both above 65535, more than the CUDA combine kernel's grid holds");
  config.gridDim = dim3((p.rows_per_head_k + kRowsPerBlock - 1) / kRowsPerBlock, units, p.num_heads_k);
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
