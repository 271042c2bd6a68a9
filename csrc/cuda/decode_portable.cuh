// Portable split-KV MLA decode (sm_80+): tensor cores through mma.sync m16n8k16, cp.async tiles.
//
// One thread block = one worker of the schedule (blockIdx.x), one KV head and one tile of up to
// 16 * MG query rows (blockIdx.y), one chunk of up to kColsPerBlock output channels (blockIdx.z).
// Warps form an MG x kWarpsN grid: warp (mg, wn) owns query rows [16 mg, 16 mg + 16) and
//   - for S = Q K^T: tokens [wn N/4, (wn + 1) N/4) of the tile,
//   - for O += P V: output channels [wn * 128, wn * 128 + 128) of the chunk.
// So the softmax row statistics are exchanged through shared memory once per tile, and P goes
// through shared memory from the warps that computed it to the warps that consume it.
//
// Per tile of N tokens (double-buffered cp.async; tokens past the piece or in out-of-range blocks
// are zero-filled and masked to -inf, so NaN in unused cache slots never reaches the math):
//   s = (q . k) * scale * log2(e);  m' = max(m, rowmax s);  p = 2^(s - m')
//   O = O * 2^(m - m') + p V;  l = l * 2^(m - m') + rowsum p   (each warp keeps its share of l)
// At the end l is summed over the warps, out = O / l and lse = (m + log2 l) * ln 2.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../schedule.h"
#include "decode_params.h"
#include "dtype.cuh"

namespace flashmla {
namespace portable {

constexpr int kWarpsN = 4;
constexpr int kColsPerWarp = 128;
constexpr int kColsPerBlock = kWarpsN * kColsPerWarp;  // 512
constexpr int kSmemPad = 8;                            // elements added to each shared row (16 bytes)
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros (used for masked tokens).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// D += A B for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Shared-memory footprint of a configuration, in bytes (host and device agree on this layout).
template <typename T, int MG, int N>
struct SmemLayout {
  static constexpr int M = 16 * MG;
  __host__ __device__ static int row_elems(int head_dim_padded) { return head_dim_padded + kSmemPad; }
  __host__ __device__ static size_t q_bytes(int hdp) { return size_t(M) * row_elems(hdp) * sizeof(T); }
  __host__ __device__ static size_t k_stage_bytes(int hdp) { return size_t(N) * row_elems(hdp) * sizeof(T); }
  static constexpr size_t p_bytes = size_t(M) * (N + kSmemPad) * sizeof(T);
  static constexpr size_t stats_bytes = size_t(kWarpsN) * M * sizeof(float);
  static constexpr size_t valid_bytes = 2 * N;
  __host__ __device__ static size_t total(int hdp) {
    return q_bytes(hdp) + 2 * k_stage_bytes(hdp) + p_bytes + stats_bytes + valid_bytes;
  }
};

// Copies `rows` rows of `hdp` channels into shared memory (row stride row_elems). Row r comes from
// src_of(r) (nullptr = zeros); channels >= head_dim are zero. 8 threads per row, 16 bytes each.
template <typename T, int THREADS, typename SrcOf>
__device__ __forceinline__ void load_rows(T* dst, int rows, int row_elems, const DecodeParams& p, SrcOf src_of) {
  constexpr int kThreadsPerRow = 8;
  constexpr int kRowsPerPass = THREADS / kThreadsPerRow;
  const int tid = threadIdx.x;
  const int chunks = p.head_dim_padded / 8;
  for (int r0 = 0; r0 < rows; r0 += kRowsPerPass) {
    const int r = r0 + tid / kThreadsPerRow;
    if (r >= rows) break;
    const T* src = src_of(r);
    T* d = dst + r * row_elems;
    if (p.vec16) {
      for (int c = tid % kThreadsPerRow; c < chunks; c += kThreadsPerRow) {
        const bool live = src != nullptr && c * 8 < p.head_dim;
        cp_async_16(d + c * 8, live ? src + c * 8 : static_cast<const T*>(p.k_cache), live ? 16 : 0);
      }
    } else {  // unaligned rows or head_dim % 8 != 0: element copies
      for (int c = tid % kThreadsPerRow; c < p.head_dim_padded; c += kThreadsPerRow) {
        d[c] = (src != nullptr && c < p.head_dim) ? src[c] : Dtype<T>::from_float(0.f);
      }
    }
  }
}

template <typename T, int MG, int N>
__global__ void __launch_bounds__(MG * kWarpsN * 32, 1) mla_decode_portable_kernel(const DecodeParams p) {
  constexpr int M = 16 * MG;
  constexpr int THREADS = MG * kWarpsN * 32;
  constexpr int kTokensPerWarp = N / kWarpsN;
  constexpr int kNT = kTokensPerWarp / 8;  // n8 tiles of S per warp
  static_assert(kTokensPerWarp % 8 == 0, "each warp needs whole n8 tiles of tokens");
  using L = SmemLayout<T, MG, N>;
  using DT = Dtype<T>;

  extern __shared__ __align__(128) unsigned char smem[];
  const int row_elems = L::row_elems(p.head_dim_padded);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + L::q_bytes(p.head_dim_padded));  // 2 stages
  T* sP = reinterpret_cast<T*>(smem + L::q_bytes(p.head_dim_padded) + 2 * L::k_stage_bytes(p.head_dim_padded));
  float* sStats = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(sP) + L::p_bytes);  // [kWarpsN][M]
  unsigned char* sValid = reinterpret_cast<unsigned char*>(sStats) + L::stats_bytes;            // [2][N]
  const size_t k_stage_elems = size_t(N) * row_elems;

  const int part = blockIdx.x;
  const int m_blocks = (p.rows_per_head_k + M - 1) / M;
  const int hk = blockIdx.y / m_blocks;
  const int row_base = (blockIdx.y % m_blocks) * M;
  const int col_base = blockIdx.z * kColsPerBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int mg = warp / kWarpsN, wn = warp % kWarpsN;
  const int g = p.num_heads_per_head_k;
  const int capacity = p.max_blocks_per_seq * p.page_block_size;

  const int* md = p.metadata + part * kMetadataWidth;
  const int begin_batch = max(md[0], 0), end_batch = min(md[2], p.batch - 1);

  for (int b = begin_batch; b <= end_batch; ++b) {
    const int seqlen = min(max(p.seqlens[b], 0), capacity);
    const int t_begin = min(max(b == md[0] ? md[1] : 0, 0), seqlen);
    const int t_end = max(min(b == md[2] ? md[3] : seqlen, seqlen), t_begin);
    const int split_first = p.num_splits[b];
    const bool whole = p.num_splits[b + 1] - split_first == 1;
    const int split_row = min(max(split_first + (b == md[0] ? md[4] : 0), 0), p.partial_rows - 1);
    const int* table = p.block_table + int64_t(b) * p.block_table_stride;

    const int num_tiles = (t_end - t_begin + N - 1) / N;
    // Query rows of this tile: row r -> query position r / g, head hk * g + r % g. (Not needed,
    // and not loaded, when the piece has no tokens.) Committed with the first K tile.
    if (num_tiles > 0)
      load_rows<T, THREADS>(sQ, M, row_elems, p, [&](int r) -> const T* {
        const int row = row_base + r;
        if (row >= p.rows_per_head_k) return nullptr;
        return static_cast<const T*>(p.q) + b * p.q_stride_b + (row / g) * p.q_stride_s +
               (hk * g + row % g) * p.q_stride_h;
      });
    auto load_tile = [&](int t0, int stage) {
      load_rows<T, THREADS>(sK + stage * k_stage_elems, N, row_elems, p, [&](int j) -> const T* {
        const int t = t0 + j;
        const T* src = nullptr;
        if (t < t_end) {
          const int block = table[t / p.page_block_size];
          if (block >= 0 && block < p.num_blocks) {
            src = static_cast<const T*>(p.k_cache) + block * p.k_stride_block +
                  (t % p.page_block_size) * p.k_stride_token + hk * p.k_stride_head;
          }
        }
        if (threadIdx.x % 8 == 0) sValid[stage * N + j] = src != nullptr;
        return src;
      });
      cp_async_commit();
    };

    float o[kColsPerWarp / 8][4];
#pragma unroll
    for (int i = 0; i < kColsPerWarp / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    // This thread's rows (mma C layout) and the last token each may see.
    int last_visible[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row_base + mg * 16 + lane / 4 + 8 * h;
      last_visible[h] = p.causal ? seqlen - p.seqlen_q + min(row, p.rows_per_head_k - 1) / g : seqlen - 1;
    }

    if (num_tiles > 0) load_tile(t_begin, 0);
    for (int tile = 0; tile < num_tiles; ++tile) {
      const int stage = tile & 1;
      const int t0 = t_begin + tile * N;
      if (tile + 1 < num_tiles) {
        load_tile(t0 + N, stage ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* k_tile = sK + stage * k_stage_elems;

      // S = Q K^T for rows [16 mg, +16), tokens [wn * kTokensPerWarp, +kTokensPerWarp).
      float s[kNT][4];
#pragma unroll
      for (int j = 0; j < kNT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      const T* q_lane = sQ + (mg * 16 + lane % 16) * row_elems + (lane / 16) * 8;
      for (int k0 = 0; k0 < p.head_dim_padded; k0 += 32) {
        uint32_t a0[4], a1[4];
        ldmatrix_x4(a0, q_lane + k0);
        ldmatrix_x4(a1, q_lane + k0 + 16);
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          uint32_t bk[4];  // channels k0..k0+31 of 8 tokens: b0/b1 of two k-steps
          ldmatrix_x4(bk, k_tile + (wn * kTokensPerWarp + j * 8 + lane % 8) * row_elems + k0 + (lane / 8) * 8);
          mma_16816<T>(s[j], a0, bk[0], bk[1]);
          mma_16816<T>(s[j], a1, bk[2], bk[3]);
        }
      }
      // Mask, scale, and this warp's row maxima.
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int jt = wn * kTokensPerWarp + j * 8 + (lane % 4) * 2 + (e & 1);
          const int h = e / 2;
          const bool ok = sValid[stage * N + jt] && t0 + jt <= last_visible[h];
          s[j][e] = ok ? s[j][e] * p.scale_log2 : -INFINITY;
          tile_max[h] = fmaxf(tile_max[h], s[j][e]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffff, tile_max[h], 1));
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffff, tile_max[h], 2));
      }
      if (lane % 4 == 0) {
        sStats[wn * M + mg * 16 + lane / 4] = tile_max[0];
        sStats[wn * M + mg * 16 + lane / 4 + 8] = tile_max[1];
      }
      __syncthreads();
      float rescale[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m_new = row_max[h];
#pragma unroll
        for (int w = 0; w < kWarpsN; ++w) m_new = fmaxf(m_new, sStats[w * M + mg * 16 + lane / 4 + 8 * h]);
        // A row that has seen nothing yet keeps m = -inf; use 0 as the exponent base so p = 0.
        const float base = m_new == -INFINITY ? 0.f : m_new;
        rescale[h] = exp2f(row_max[h] - base);
        row_max[h] = m_new;
        row_sum[h] *= rescale[h];
      }
      // P = 2^(s - m) to shared memory (as T), and this warp's share of the row sums.
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float base = row_max[h] == -INFINITY ? 0.f : row_max[h];
          const float p0 = exp2f(s[j][2 * h] - base), p1 = exp2f(s[j][2 * h + 1] - base);
          row_sum[h] += p0 + p1;
          const int r = mg * 16 + lane / 4 + 8 * h;
          const int c = wn * kTokensPerWarp + j * 8 + (lane % 4) * 2;
          *reinterpret_cast<typename DT::pair*>(sP + r * (N + kSmemPad) + c) = DT::make_pair(p0, p1);
        }
      }
#pragma unroll
      for (int i = 0; i < kColsPerWarp / 8; ++i) {
        o[i][0] *= rescale[0];
        o[i][1] *= rescale[0];
        o[i][2] *= rescale[1];
        o[i][3] *= rescale[1];
      }
      __syncthreads();
      // O += P V for rows [16 mg, +16), channels [col_base + wn * 128, +128).
      const int col0 = col_base + wn * kColsPerWarp;
#pragma unroll
      for (int kt = 0; kt < N / 16; ++kt) {
        uint32_t a[4];
        ldmatrix_x4(a, sP + (mg * 16 + lane % 16) * (N + kSmemPad) + kt * 16 + (lane / 16) * 8);
        const T* v_lane = k_tile + (kt * 16 + lane % 8 + ((lane / 8) % 2) * 8) * row_elems + col0 + (lane / 16) * 8;
#pragma unroll
        for (int n2 = 0; n2 < kColsPerWarp / 16; ++n2) {
          if (col0 + n2 * 16 < p.head_dim_v) {
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, v_lane + n2 * 16);
            mma_16816<T>(o[2 * n2], a, bv[0], bv[1]);
            mma_16816<T>(o[2 * n2 + 1], a, bv[2], bv[3]);
          }
        }
      }
      __syncthreads();  // the next iteration's cp.async overwrites this stage, sP and sStats
    }

    // Sum the row sums over the warps that shared the tokens, then write.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[h] += __shfl_xor_sync(0xffffffff, row_sum[h], 1);
      row_sum[h] += __shfl_xor_sync(0xffffffff, row_sum[h], 2);
    }
    if (lane % 4 == 0) {
      sStats[wn * M + mg * 16 + lane / 4] = row_sum[0];
      sStats[wn * M + mg * 16 + lane / 4 + 8] = row_sum[1];
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kWarpsN; ++w) total += sStats[w * M + mg * 16 + lane / 4 + 8 * h];
      const int row = row_base + mg * 16 + lane / 4 + 8 * h;
      if (row >= p.rows_per_head_k) continue;
      const bool empty = total == 0.f;
      const float inv = empty ? 0.f : 1.f / total;
      const float lse = empty ? (whole ? INFINITY : -INFINITY) : (row_max[h] + log2f(total)) * kLn2;
      const int qi = row / g, head = hk * g + row % g;
      const int col0 = col_base + wn * kColsPerWarp + (lane % 4) * 2;
      if (whole) {
        T* dst = static_cast<T*>(p.out) + ((int64_t(b) * p.seqlen_q + qi) * p.num_heads_q + head) * p.head_dim_v;
#pragma unroll
        for (int i = 0; i < kColsPerWarp / 8; ++i) {
          const int c = col0 + i * 8;
          if (c + 1 < p.head_dim_v && (p.head_dim_v % 2) == 0) {
            *reinterpret_cast<typename DT::pair*>(dst + c) = DT::make_pair(o[i][2 * h] * inv, o[i][2 * h + 1] * inv);
          } else {
            if (c < p.head_dim_v) dst[c] = DT::from_float(o[i][2 * h] * inv);
            if (c + 1 < p.head_dim_v) dst[c + 1] = DT::from_float(o[i][2 * h + 1] * inv);
          }
        }
        if (wn == 0 && blockIdx.z == 0 && lane % 4 == 0)
          p.lse[(int64_t(b) * p.num_heads_q + head) * p.seqlen_q + qi] = lse;
      } else {
        const int64_t prow = (int64_t(split_row) * p.num_heads_k + hk) * p.rows_per_head_k + row;
        float* dst = p.partial_out + prow * p.head_dim_v;
#pragma unroll
        for (int i = 0; i < kColsPerWarp / 8; ++i) {
          const int c = col0 + i * 8;
          if (c < p.head_dim_v) dst[c] = o[i][2 * h] * inv;
          if (c + 1 < p.head_dim_v) dst[c + 1] = o[i][2 * h + 1] * inv;
        }
        if (wn == 0 && blockIdx.z == 0 && lane % 4 == 0) p.partial_lse[prow] = lse;
      }
    }
    __syncthreads();  // sQ and sStats are reused by the next sequence
  }
}

}  // namespace portable
}  // namespace flashmla
