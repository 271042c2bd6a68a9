// Portable split-KV MLA decode (sm_80+): tensor cores through mma.sync m16n8k16, ldmatrix, and a
// multi-stage cp.async pipeline.
//
// ---- Work of one thread block ----------------------------------------------------------------
// One block = one worker of the schedule (blockIdx.x), one KV head and one tile of up to M = 16 MG
// query rows (blockIdx.y), one chunk of up to kColsPerBlock = 512 output channels (blockIdx.z;
// head_dim_v > 512 takes several chunks, each recomputing S for its own channels).
// Query row r of a KV head is query position r / g, query head hk * g + r % g (g = heads per KV
// head). Rows past rows_per_head_k are zero in shared memory, computed and never written.
//
// Warps form a (MG / MW) x WN grid (WN = 4 or 8 warps along tokens / channels). Warp (rw, wn)
// owns the MW m16 row groups [16 MW rw, 16 MW (rw + 1)) of the tile (MW = 2: 32 rows, so every
// K or V fragment that ldmatrix brings in feeds two mma's), and
//   - for S = Q K^T: tokens [wn N/WN, (wn + 1) N/WN) of the tile,
//   - for O += P V: output channels [wn C, (wn + 1) C) of the chunk, C = 512 / WN (O: MW x C/8 n8
//     tiles). WN = 8 halves each warp's share (more warps per block, shorter chains per warp).
// Row maxima are exchanged through sStats once per tile, and P (as T) goes through sP from the
// warps that computed it (token split) to the warps that consume it (channel split).
//
// ---- Pipeline (STAGES K/V stages of N tokens; V = the first head_dim_v channels of K) --------
// Prologue: Q (no own group) and tiles 0 .. STAGES-2, one cp.async group each (tile 0's group also
// carries Q). Tiles past the piece commit empty groups, so every tile index has exactly one group.
// Tile i: cp.async.wait_group<STAGES-2> (groups newer than tile i's: tiles i+1 .. i+STAGES-2) ->
// __syncthreads (#1: tile i visible to all; every warp finished tile i-1, so its stage, sValid row,
// sP and sStats are free) -> issue tile i+STAGES-1's copies into stage (i-1) % STAGES (its rows were
// looked up during tile i-1) and commit (an empty group past the piece) -> look up tile i+STAGES's
// rows in the block table (global loads into registers, used at tile i+1) -> S = Q K^T (hides the
// lookup latency) -> row maxima to sStats -> #2 -> P to sP, rescale O -> #3 -> O += P V. #2 and #3 order
// only the WN warps of one row group (its rows' maxima and P): with two row groups per block each group
// syncs on a named barrier of its own. No barrier at the end of the
// tile: the next tile's #1 protects everything the next tile overwrites; the epilogue's sStats writes follow the last
// #3. While tile i is computed, tiles i+1 .. i+STAGES-1 are in flight. sValid[stage][j] says whether token j of the
// stage's tile exists (t < t_end and its block id is in range); it is written with plain stores by the issuing threads
// and read after barrier #1. Tokens that do not exist are zero-filled (cp.async with src-size 0, or element stores), so
// NaN in unused cache slots never reaches the math, and masked to -inf (as are causal-invisible tokens).
//
// ---- Shared memory layout (bytes, in this order; host and device share SmemLayout) -----------
//   sQ      M rows x RE elements                 (RE = row_elems(head_dim_padded))
//   sK      STAGES x N rows x RE elements
//   sP      M rows x PE elements                 (PE = p_row_elems(N): N = 64 swizzled, else N + 8)
//   sStats  WN x M floats                        (row maxima per tile; row sums at the end)
//   sValid  STAGES x N bytes
// Q and K rows: when head_dim_padded % 64 == 0 (e.g. 576, 512) RE = head_dim_padded and the 16-byte
// chunks of a row are XOR-swizzled: logical chunk c of row r lives at chunk c ^ (r % 8) (only the
// low 3 bits change, so a chunk stays in its 128-byte group). Otherwise (head_dim_padded % 64 == 32)
// RE = head_dim_padded + 8 and chunks are not swizzled (the 16-byte pad staggers the banks).
// Both cases are one formula: physical chunk = c ^ (r & xmask), xmask = 7 or 0. Every ldmatrix
// reads 8 rows r0 .. r0+7 (r0 % 8 == 0) at one logical chunk, so each 8-lane phase touches 8
// distinct 16-byte bank groups: conflict free for ldmatrix and ldmatrix.trans alike. All rows a
// lane addresses in ldmatrix are = lane (mod 8), so its swizzle key is lx = lane & 7 & xmask and the
// per-lane chunk offsets are precomputed: chunk (8a + b) of any row a lane reads sits at
// 8a + (b ^ lx), b < 8.
// Channels head_dim .. head_dim_padded of Q and K are zero.
//
// ---- Online softmax (log2 domain) -----------------------------------------------------------
//   s = (q . k) * scale * log2(e)  (-inf where masked);  m' = max(m, rowmax s);  p = 2^(s - m')
//   O = O * 2^(m - m') + p V;  l = l * 2^(m - m') + rowsum p   (each warp keeps its share of l)
// A row that has seen nothing keeps m = -inf and uses exponent base 0 (so p = 0, rescale = 1).
// At the end l is summed over the WN warps of the row, out = O / l and
// lse = (m + log2 l) * ln 2; a row with l = 0 writes out = 0 and lse = +inf (whole piece) or
// -inf (split piece, so the combine gives it weight 0).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../schedule.h"
#include "decode_params.h"
#include "dtype.cuh"
#include "l2_policy.cuh"
#include "pdl.cuh"

namespace flashmla {
namespace portable {

constexpr int kColsPerBlock = 512;  // output channels per block (blockIdx.z chunks)
constexpr int kSmemPad = 8;         // elements added to padded rows (16 bytes)
constexpr float kLn2 = 0.6931471805599453f;

// Q/K row layout in shared memory (see the header comment).
__host__ __device__ inline bool smem_swizzled(int head_dim_padded) { return head_dim_padded % 64 == 0; }
__host__ __device__ inline int smem_row_elems(int head_dim_padded) {
  return smem_swizzled(head_dim_padded) ? head_dim_padded : head_dim_padded + kSmemPad;
}

// P row layout: 64-token rows are 8 chunks of 16 bytes, swizzled like Q/K (chunk c of row r at
// c ^ (r % 8)); shorter rows get the 16-byte pad instead. Conflict free for the pair stores (8 rows x
// 4 lanes per store) and for ldmatrix (8 rows at one logical chunk) alike.
__host__ __device__ constexpr int p_row_elems(int n) { return n % 64 == 0 ? n : n + kSmemPad; }
__host__ __device__ constexpr int p_xmask(int n) { return n % 64 == 0 ? 7 : 0; }
template <int N>
__device__ __forceinline__ int p_offset(int r, int c) {
  return r * p_row_elems(N) + ((((c >> 3) ^ (r & p_xmask(N))) << 3) | (c & 7));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros (used for masked tokens).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes, uint64_t l2_policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes), "l"(l2_policy));
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

// dst[c], dst[c + 1] = a, b, skipping elements at or past n; one pair store when n is even (c is
// even, so the pair is aligned). E is T (the output) or float (partial results).
template <typename E>
__device__ __forceinline__ void store_two(E* dst, int c, int n, float a, float b) {
  if (c + 1 < n && n % 2 == 0) {
    if constexpr (std::is_same_v<E, float>)
      *reinterpret_cast<float2*>(dst + c) = make_float2(a, b);
    else
      *reinterpret_cast<typename Dtype<E>::pair*>(dst + c) = Dtype<E>::make_pair(a, b);
  } else {
    auto convert = [](float x) {
      if constexpr (std::is_same_v<E, float>)
        return x;
      else
        return Dtype<E>::from_float(x);
    };
    if (c < n) dst[c] = convert(a);
    if (c + 1 < n) dst[c + 1] = convert(b);
  }
}

// Shared-memory footprint of a configuration, in bytes (host and device agree on this layout).
template <typename T, int MG, int N, int STAGES, int WN>
struct SmemLayout {
  static constexpr int M = 16 * MG;
  __host__ __device__ static size_t q_bytes(int hdp) { return size_t(M) * smem_row_elems(hdp) * sizeof(T); }
  __host__ __device__ static size_t k_stage_bytes(int hdp) { return size_t(N) * smem_row_elems(hdp) * sizeof(T); }
  static constexpr size_t p_bytes = size_t(M) * p_row_elems(N) * sizeof(T);
  static constexpr size_t stats_bytes = size_t(WN) * M * sizeof(float);
  static constexpr size_t valid_bytes = size_t(STAGES) * N;
  __host__ __device__ static size_t total(int hdp) {
    return q_bytes(hdp) + STAGES * k_stage_bytes(hdp) + p_bytes + stats_bytes + valid_bytes;
  }
};

// Copies one row of head_dim_padded channels into shared memory at `d` (chunk c at chunk c ^ x).
// The row comes from src (nullptr = zeros); channels >= head_dim are zero. 8 threads per row, 16
// bytes each. vec16: cp.async (the caller commits); else element copies (plain stores, visible
// after the next barrier).
template <typename T>
__device__ __forceinline__ void copy_row(T* d, const T* src, int x, const DecodeParams& p, uint64_t l2_policy) {
  constexpr int kThreadsPerRow = 8;
  const int tid = threadIdx.x;
  if (p.vec16) {
    // This thread's chunks are c0 + 8 i; since x < 8 only flips the low 3 bits, chunk c0 + 8 i lands
    // at (c0 ^ x) + 8 i: both addresses advance by 64 elements per step.
    const int c0 = tid % kThreadsPerRow;
    const int live_chunks = src != nullptr ? p.head_dim / 8 : 0;  // head_dim % 8 == 0 when vec16
    const T* s = src != nullptr ? src + c0 * 8 : static_cast<const T*>(p.k_cache);
    T* dd = d + ((c0 ^ x) << 3);
    for (int c = c0; c < p.head_dim_padded / 8; c += kThreadsPerRow, s += 64, dd += 64) {
      const bool live = c < live_chunks;
      cp_async_16(dd, live ? s : static_cast<const T*>(p.k_cache), live ? 16 : 0, l2_policy);
    }
  } else {  // unaligned rows or head_dim % 8 != 0: element copies
    for (int c = tid % kThreadsPerRow; c < p.head_dim_padded; c += kThreadsPerRow) {
      d[(((c >> 3) ^ x) << 3) | (c & 7)] = (src != nullptr && c < p.head_dim) ? src[c] : Dtype<T>::from_float(0.f);
    }
  }
}

// bar.sync on barrier `id` (1..15; 0 is __syncthreads') for `threads` threads (whole warps).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

template <typename T, int MG, int MW, int N, int STAGES, int WN>
__global__ void __launch_bounds__((MG / MW) * WN * 32, 1) mla_decode_portable_kernel(const DecodeParams p) {
  constexpr int M = 16 * MG;
  constexpr int kColsPerWarp = kColsPerBlock / WN;  // 128 or 64: whole 64-channel swizzle groups
  constexpr int THREADS = (MG / MW) * WN * 32;
  constexpr int kTokensPerWarp = N / WN;
  constexpr int kNT = kTokensPerWarp / 8;    // n8 tiles of S per warp
  constexpr int kOT = kColsPerWarp / 8;      // n8 tiles of O per row group
  constexpr int kRowsPerPass = THREADS / 8;  // rows copied at once (8 threads x 16 bytes per row)
  constexpr int kPasses = (N + kRowsPerPass - 1) / kRowsPerPass;
  static_assert(kTokensPerWarp % 8 == 0, "each warp needs whole n8 tiles of tokens");
  static_assert(MG % MW == 0 && (MW == 1 || MW == 2), "row groups per warp");
  static_assert(STAGES >= 2, "at least double buffering");
  static_assert(WN == 4 || WN == 8, "warps along tokens / channels");
  // Barriers #2 and #3 only order the WN warps of one row group (row maxima and P of its rows), so
  // with two row groups each syncs on a named barrier of its own (1 + rw) and the groups may drift
  // apart within a tile; #1 (stages, sValid) stays a block barrier.
  constexpr bool kRowGroupBarriers = MG / MW > 1;
  constexpr int kMaxLeanGroups = 9;  // lean row copies: up to 9 x 64 channels (576)
  using L = SmemLayout<T, MG, N, STAGES, WN>;
  using DT = Dtype<T>;

  extern __shared__ __align__(128) unsigned char smem[];
  const int hdp = p.head_dim_padded;
  const int row_elems = smem_row_elems(hdp);
  const int xmask = smem_swizzled(hdp) ? 7 : 0;
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + L::q_bytes(hdp));  // STAGES stages
  T* sP = reinterpret_cast<T*>(smem + L::q_bytes(hdp) + STAGES * L::k_stage_bytes(hdp));
  float* sStats = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(sP) + L::p_bytes);  // [WN][M]
  unsigned char* sValid = reinterpret_cast<unsigned char*>(sStats) + L::stats_bytes;            // [STAGES][N]
  const int k_stage_elems = N * row_elems;

  pdl_allow_dependents();  // the combine kernel may launch now; it waits for this grid (pdl.cuh)
  const int part = blockIdx.x;
  const int m_blocks = (p.rows_per_head_k + M - 1) / M;
  const int hk = blockIdx.y / m_blocks;
  const int row_base = (blockIdx.y % m_blocks) * M;
  const int col_base = blockIdx.z * kColsPerBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rw = warp / WN, wn = warp % WN;
  const int warp_row0 = rw * 16 * MW;  // this warp's first row in the tile
  const int g = p.num_heads_per_head_k;
  const int capacity = p.max_blocks_per_seq * p.page_block_size;
  const uint64_t l2_policy = kv_l2_policy(p.kv_evict_first);

  // Per-lane ldmatrix offsets (elements) inside a 64-channel group: chunk b (< 8) of a row this
  // lane addresses sits at chunk b ^ lx.
  const int lx = lane & 7 & xmask;
  int off2[4];  // chunk 2b + lane / 16: Q (A operand) and V (trans B operand)
#pragma unroll
  for (int b = 0; b < 4; ++b) off2[b] = ((2 * b + lane / 16) ^ lx) << 3;
  int off4[2];  // chunk 4h + lane / 8: K (B operand)
#pragma unroll
  for (int h = 0; h < 2; ++h) off4[h] = ((4 * h + lane / 8) ^ lx) << 3;

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
    // Query rows of this tile (not needed, and not loaded, when the piece has no tokens). Their
    // cp.async's join tile 0's group.
    if (num_tiles > 0) {
      for (int r = threadIdx.x / 8; r < M; r += kRowsPerPass) {
        const int row = row_base + r;
        const T* src = row < p.rows_per_head_k ? static_cast<const T*>(p.q) + b * p.q_stride_b +
                                                     (row / g) * p.q_stride_s + (hk * g + row % g) * p.q_stride_h
                                               : nullptr;
        copy_row<T>(sQ + r * row_elems, src, r & xmask, p, l2_policy);
      }
    }
    // K tiles load in two steps: tile_blocks loads the rows' block ids from the block table (global
    // loads into registers, nothing computed from them yet, so the thread does not wait for them),
    // issue_tile turns them into addresses, writes sValid and starts the copies. In the main loop a
    // whole tile's compute runs in between, hiding the lookup latency. This thread copies rows
    // j = q * kRowsPerPass + threadIdx.x / 8; block id -1 = no such token.
    // Tiles are looked up in order, each once, so a cursor per pass (table column and offset in the
    // page of token t0 + j of the next tile to look up) replaces the divisions t / page and t % page:
    // it advances by N tokens per lookup, and the lookup hands the offset (next_off) to the issue.
    const int page = p.page_block_size;
    int cur_page[kPasses], cur_off[kPasses], next_off[kPasses];
    const int step_pages = N / page, step_off = N % page;
#pragma unroll
    for (int q = 0; q < kPasses; ++q) {
      const int t = t_begin + q * kRowsPerPass + threadIdx.x / 8;
      cur_page[q] = t / page;
      cur_off[q] = t - cur_page[q] * page;
    }
    // lean_rows: every K row is hdp / 64 <= kMaxLeanGroups whole 64-channel groups, all live (16-byte
    // copies, head_dim == hdp): the issue is kMaxLeanGroups predicated copies with constant offsets
    // from one per-row address. Other rows take copy_row.
    const bool lean_rows = p.vec16 && p.head_dim == hdp && hdp % 64 == 0 && hdp / 64 <= kMaxLeanGroups;
    const int lean_groups = hdp / 64;
    // This lane's chunk of every row: chunk c0 of each 64-channel group (at c0 ^ (row & 7) in shared memory).
    const int c0 = threadIdx.x % 8;
    const T* k_lane_base = static_cast<const T*>(p.k_cache) + hk * p.k_stride_head + c0 * 8;
    auto tile_blocks = [&](int t0, int (&block)[kPasses]) {
#pragma unroll
      for (int q = 0; q < kPasses; ++q) {
        const int j = q * kRowsPerPass + threadIdx.x / 8;
        const int t = t0 + j;
        block[q] = j < N && t < t_end ? table[cur_page[q]] : -1;
        next_off[q] = cur_off[q];
        cur_page[q] += step_pages;
        cur_off[q] += step_off;
        if (cur_off[q] >= page) {
          cur_off[q] -= page;
          ++cur_page[q];
        }
      }
    };
    auto issue_tile = [&](const int (&block)[kPasses], int stage) {
#pragma unroll
      for (int q = 0; q < kPasses; ++q) {
        const int j = q * kRowsPerPass + threadIdx.x / 8;
        if (j < N) {
          const bool live = block[q] >= 0 && block[q] < p.num_blocks;
          if (threadIdx.x % 8 == 0) sValid[stage * N + j] = live;
          if (lean_rows) {
            const T* s = live ? k_lane_base + block[q] * p.k_stride_block + next_off[q] * p.k_stride_token
                              : static_cast<const T*>(p.k_cache);
            T* d = sK + stage * k_stage_elems + j * row_elems + ((c0 ^ (j & 7)) << 3);
            const int bytes = live ? 16 : 0;
#pragma unroll
            for (int gi = 0; gi < kMaxLeanGroups; ++gi)
              if (gi < lean_groups) cp_async_16(d + 64 * gi, s + 64 * gi, bytes, l2_policy);
          } else {
            const T* src = live ? static_cast<const T*>(p.k_cache) + block[q] * p.k_stride_block +
                                      next_off[q] * p.k_stride_token + hk * p.k_stride_head
                                : nullptr;
            copy_row<T>(sK + stage * k_stage_elems + j * row_elems, src, j & xmask, p, l2_policy);
          }
        }
      }
    };

    float o[MW][kOT][4];
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
#pragma unroll
      for (int i = 0; i < kOT; ++i) o[mw][i][0] = o[mw][i][1] = o[mw][i][2] = o[mw][i][3] = 0.f;
    float row_max[MW][2], row_sum[MW][2];
    // This thread's rows (mma C layout: lane / 4 and lane / 4 + 8 of each row group) and the last
    // token each may see.
    int last_visible[MW][2];
#pragma unroll
    for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_max[mw][h] = -INFINITY;
        row_sum[mw][h] = 0.f;
        const int row = row_base + warp_row0 + mw * 16 + lane / 4 + 8 * h;
        last_visible[mw][h] = p.last_visible(seqlen, row, g);
      }
    }

    // Prologue: tiles 0 .. STAGES-2, one group each (empty past the piece).
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
      if (st < num_tiles) {
        int block[kPasses];
        tile_blocks(t_begin + st * N, block);
        issue_tile(block, st);
      }
      cp_async_commit();
    }
    // Rows of tile STAGES-1, looked up now; inside the loop, tile + STAGES's rows are looked up while
    // tile is computed, so the copies of tile + STAGES - 1 start right after barrier #1.
    int next_block[kPasses];
    if (STAGES - 1 < num_tiles) tile_blocks(t_begin + (STAGES - 1) * N, next_block);
    int stage = 0;                // stage of tile `tile`
    int next_stage = STAGES - 1;  // stage of tile `tile + STAGES - 1`
    for (int tile = 0; tile < num_tiles; ++tile) {
      const int t0 = t_begin + tile * N;
      cp_async_wait<STAGES - 2>();  // tile's group (and Q) landed for this thread
      __syncthreads();              // #1: ... for all threads; tile - 1 fully consumed
      // Start the copies of tile + STAGES - 1 into the stage tile - 1 used (free since #1), then look
      // up the rows of tile + STAGES (global loads whose latency the S phase hides).
      if (tile + STAGES - 1 < num_tiles) issue_tile(next_block, next_stage);
      cp_async_commit();
      if (tile + STAGES < num_tiles) tile_blocks(t0 + STAGES * N, next_block);
      const T* k_tile = sK + stage * k_stage_elems;

      // S = Q K^T for rows [warp_row0, + 16 MW), tokens [wn * kTokensPerWarp, + kTokensPerWarp).
      // Two accumulators per n8 tile (even and odd k16 steps), summed after the loop: two
      // independent mma chains of half the length, so their latencies overlap.
      float s[MW][kNT][4], s_odd[MW][kNT][4];
#pragma unroll
      for (int mw = 0; mw < MW; ++mw)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mw][j][e] = s_odd[mw][j][e] = 0.f;
      const T* q_lane = sQ + (warp_row0 + lane % 16) * row_elems;
      const T* k_lane = k_tile + (wn * kTokensPerWarp + lane % 8) * row_elems;
      // One 32-channel half h of the 64-channel group at k0: Q channels k0 + 32h + [0, 32) of this
      // warp's rows against the same channels of its kNT n8 token tiles.
      auto s_half = [&](int k0, int h) {
        uint32_t a[MW][2][4];  // Q, channels k0 + 32h + [0, 16) and [16, 32)
#pragma unroll
        for (int mw = 0; mw < MW; ++mw) {
          ldmatrix_x4(a[mw][0], q_lane + mw * 16 * row_elems + k0 + off2[2 * h]);
          ldmatrix_x4(a[mw][1], q_lane + mw * 16 * row_elems + k0 + off2[2 * h + 1]);
        }
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          uint32_t bk[4];  // channels k0 + 32h + [0, 32) of 8 tokens: b0/b1 of two k-steps
          ldmatrix_x4(bk, k_lane + j * 8 * row_elems + k0 + off4[h]);
#pragma unroll
          for (int mw = 0; mw < MW; ++mw) {
            mma_16816<T>(s[mw][j], a[mw][0], bk[0], bk[1]);
            mma_16816<T>(s_odd[mw][j], a[mw][1], bk[2], bk[3]);
          }
        }
      };
      // Whole 64-channel groups with no test inside (so ptxas may overlap one half's ldmatrix with
      // the other's mma's), then the 32-channel tail of head_dim_padded % 64 == 32 (unswizzled only).
      const int whole_end = hdp & ~63;
#pragma unroll 3
      for (int k0 = 0; k0 < whole_end; k0 += 64) {
        s_half(k0, 0);
        s_half(k0, 1);
      }
      if (whole_end < hdp) s_half(whole_end, 0);
#pragma unroll
      for (int mw = 0; mw < MW; ++mw)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mw][j][e] += s_odd[mw][j][e];
      // Mask, scale, and this warp's row maxima.
      float tile_max[MW][2];
#pragma unroll
      for (int mw = 0; mw < MW; ++mw) tile_max[mw][0] = tile_max[mw][1] = -INFINITY;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e1 = 0; e1 < 2; ++e1) {
          const int jt = wn * kTokensPerWarp + j * 8 + (lane % 4) * 2 + e1;
          const bool valid = sValid[stage * N + jt];
#pragma unroll
          for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float& x = s[mw][j][2 * h + e1];
              x = valid && t0 + jt <= last_visible[mw][h] ? x * p.scale_log2 : -INFINITY;
              tile_max[mw][h] = fmaxf(tile_max[mw][h], x);
            }
          }
        }
      }
#pragma unroll
      for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          tile_max[mw][h] = fmaxf(tile_max[mw][h], __shfl_xor_sync(0xffffffff, tile_max[mw][h], 1));
          tile_max[mw][h] = fmaxf(tile_max[mw][h], __shfl_xor_sync(0xffffffff, tile_max[mw][h], 2));
        }
        if (lane % 4 == 0) {
          sStats[wn * M + warp_row0 + mw * 16 + lane / 4] = tile_max[mw][0];
          sStats[wn * M + warp_row0 + mw * 16 + lane / 4 + 8] = tile_max[mw][1];
        }
      }
      if constexpr (kRowGroupBarriers)
        named_barrier_sync(1 + rw, WN * 32);  // #2: row maxima of the row group's warps
      else
        __syncthreads();  // #2: row maxima of every warp
      float rescale[MW][2];
#pragma unroll
      for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = warp_row0 + mw * 16 + lane / 4 + 8 * h;
          float m_new = row_max[mw][h];
#pragma unroll
          for (int w = 0; w < WN; ++w) m_new = fmaxf(m_new, sStats[w * M + r]);
          // A row that has seen nothing yet keeps m = -inf; use 0 as the exponent base so p = 0.
          const float base = m_new == -INFINITY ? 0.f : m_new;
          rescale[mw][h] = exp2f(row_max[mw][h] - base);
          row_max[mw][h] = m_new;
          row_sum[mw][h] *= rescale[mw][h];
        }
      }
      // P = 2^(s - m) to shared memory (as T), and this warp's share of the row sums.
#pragma unroll
      for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float base = row_max[mw][h] == -INFINITY ? 0.f : row_max[mw][h];
          const int r = warp_row0 + mw * 16 + lane / 4 + 8 * h;
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
            const float p0 = exp2f(s[mw][j][2 * h] - base), p1 = exp2f(s[mw][j][2 * h + 1] - base);
            row_sum[mw][h] += p0 + p1;
            const int c = wn * kTokensPerWarp + j * 8 + (lane % 4) * 2;
            *reinterpret_cast<typename DT::pair*>(sP + p_offset<N>(r, c)) = DT::make_pair(p0, p1);
          }
        }
#pragma unroll
        for (int i = 0; i < kOT; ++i) {
          o[mw][i][0] *= rescale[mw][0];
          o[mw][i][1] *= rescale[mw][0];
          o[mw][i][2] *= rescale[mw][1];
          o[mw][i][3] *= rescale[mw][1];
        }
      }
      if constexpr (kRowGroupBarriers)
        named_barrier_sync(1 + rw, WN * 32);  // #3: P of the row group's rows
      else
        __syncthreads();  // #3: P of every warp
      // O += P V for rows [warp_row0, + 16 MW), channels [col_base + wn * kColsPerWarp, + kColsPerWarp).
      const int col0 = col_base + wn * kColsPerWarp;  // a multiple of 64: swizzle-group aligned
      // 16-channel groups of this warp's columns that exist (warp-uniform): all of them unless
      // head_dim_v ends inside the warp's columns.
      const int cols_left = p.head_dim_v - col0;
      const int live_n2 = cols_left <= 0 ? 0 : min(kColsPerWarp / 16, (cols_left + 15) / 16);
      auto pv = [&](auto all_live) {
#pragma unroll
        for (int kt = 0; kt < N / 16; ++kt) {
          uint32_t a[MW][4];
#pragma unroll
          for (int mw = 0; mw < MW; ++mw)
            ldmatrix_x4(a[mw], sP + p_offset<N>(warp_row0 + mw * 16 + lane % 16, kt * 16 + (lane / 16) * 8));
          // Lanes 0-7 / 8-15: tokens kt*16 + [0, 8) / [8, 16) at chunk 2 n2; lanes 16-31: chunk 2 n2 + 1.
          const T* v_lane = k_tile + (kt * 16 + lane % 8 + ((lane / 8) % 2) * 8) * row_elems + col0;
#pragma unroll
          for (int n2 = 0; n2 < kColsPerWarp / 16; ++n2) {
            if (decltype(all_live)::value || n2 < live_n2) {
              uint32_t bv[4];
              ldmatrix_x4_trans(bv, v_lane + (n2 / 4) * 64 + off2[n2 % 4]);
#pragma unroll
              for (int mw = 0; mw < MW; ++mw) {
                mma_16816<T>(o[mw][2 * n2], a[mw], bv[0], bv[1]);
                mma_16816<T>(o[mw][2 * n2 + 1], a[mw], bv[2], bv[3]);
              }
            }
          }
        }
      };
      if (live_n2 == kColsPerWarp / 16)
        pv(std::true_type{});
      else
        pv(std::false_type{});
      stage = stage + 1 == STAGES ? 0 : stage + 1;
      next_stage = next_stage + 1 == STAGES ? 0 : next_stage + 1;
    }

    // Sum the row sums over the warps that shared the tokens, then write. (Every warp is past the
    // last tile's barrier #3, so nobody still reads the row maxima in sStats.)
#pragma unroll
    for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_sum[mw][h] += __shfl_xor_sync(0xffffffff, row_sum[mw][h], 1);
        row_sum[mw][h] += __shfl_xor_sync(0xffffffff, row_sum[mw][h], 2);
      }
      if (lane % 4 == 0) {
        sStats[wn * M + warp_row0 + mw * 16 + lane / 4] = row_sum[mw][0];
        sStats[wn * M + warp_row0 + mw * 16 + lane / 4 + 8] = row_sum[mw][1];
      }
    }
    __syncthreads();
#pragma unroll
    for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp_row0 + mw * 16 + lane / 4 + 8 * h;
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < WN; ++w) total += sStats[w * M + r];
        const int row = row_base + r;
        if (row >= p.rows_per_head_k) continue;
        const bool empty = total == 0.f;
        const float inv = empty ? 0.f : 1.f / total;
        const float lse = empty ? (whole ? INFINITY : -INFINITY) : (row_max[mw][h] + log2f(total)) * kLn2;
        const int qi = row / g, head = hk * g + row % g;
        const int col0 = col_base + wn * kColsPerWarp + (lane % 4) * 2;
        if (whole) {
          T* dst = static_cast<T*>(p.out) + ((int64_t(b) * p.seqlen_q + qi) * p.num_heads_q + head) * p.head_dim_v;
#pragma unroll
          for (int i = 0; i < kOT; ++i)
            store_two(dst, col0 + i * 8, p.head_dim_v, o[mw][i][2 * h] * inv, o[mw][i][2 * h + 1] * inv);
          if (wn == 0 && blockIdx.z == 0 && lane % 4 == 0)
            p.lse[(int64_t(b) * p.num_heads_q + head) * p.seqlen_q + qi] = lse;
        } else {
          const int64_t prow = (int64_t(split_row) * p.num_heads_k + hk) * p.rows_per_head_k + row;
          float* dst = p.partial_out + prow * p.head_dim_v;
#pragma unroll
          for (int i = 0; i < kOT; ++i)
            store_two(dst, col0 + i * 8, p.head_dim_v, o[mw][i][2 * h] * inv, o[mw][i][2 * h + 1] * inv);
          if (wn == 0 && blockIdx.z == 0 && lane % 4 == 0) p.partial_lse[prow] = lse;
        }
      }
    }
    __syncthreads();  // sQ, the stages, sValid and sStats are reused by the next sequence
  }
}

}  // namespace portable
}  // namespace flashmla
