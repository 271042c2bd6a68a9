// The split-KV work schedule, shared by the CPU and CUDA paths.
//
// Each sequence's live tokens are cut into scheduling blocks of kSchedBlockN tokens. Sequence i
// costs kFixedCostBlocks + n_i units (n_i = its blocks; the fixed part stands for loading q and
// writing the result) and occupies the interval [C_i, C_i + cost_i) of a line of length T =
// sum cost_i (C = exclusive prefix sum). Worker p takes the equal share [p W, (p + 1) W), W = ceil(T /
// num_sm_parts): the blocks of every sequence whose block units fall in it. A worker's range is
// computed from C alone (a binary search), so the CUDA kernel builds all of them in parallel; the CPU
// runs the same arithmetic in a loop, and both produce identical metadata.
//
// Metadata layout (int32):
//   tile_scheduler_metadata[part] = {begin_batch, begin_token, end_batch, end_token, begin_split, 0, 0, 0}
//     worker `part` handles sequences begin_batch..end_batch (inclusive); in sequence i it attends
//     over tokens [i == begin_batch ? begin_token : 0, i == end_batch ? end_token : seqlen_i).
//     Its piece of sequence begin_batch is split number begin_split of that sequence; its pieces of
//     later sequences are split 0. A worker with end_batch < begin_batch has nothing to do.
//   num_splits[i + 1] - num_splits[i] = number of pieces sequence i was cut into (>= 1), and
//   num_splits[i] + split is the row of the partial-result buffers that piece writes. A sequence
//   cut into one piece is written straight to the output; others are merged by LSE afterwards.
// Invariants: every sequence, empty ones included, is covered exactly once, and a non-empty
// sequence's pieces each hold at least one block; num_splits[batch] <= batch + num_sm_parts - 1.
#pragma once

#if !defined(__CUDA_ARCH__)
#include <algorithm>
#include <vector>
#endif

#if defined(__CUDACC__)
#define FLASHMLA_HOST_DEVICE __host__ __device__
#else
#define FLASHMLA_HOST_DEVICE
#endif

namespace flashmla {

constexpr int kSchedBlockN = 64;        // tokens per scheduling block
constexpr int kFixedCostBlocks = 5;     // fixed cost of one (sequence, worker) piece, in blocks
constexpr int kMetadataWidth = 8;       // int32 fields per worker in tile_scheduler_metadata
constexpr int kRowsPerWorkerTile = 64;  // query rows (s_q * heads per KV head) one CUDA worker holds

FLASHMLA_HOST_DEVICE inline int sched_blocks(int seqlen) {
  return seqlen > 0 ? (seqlen + kSchedBlockN - 1) / kSchedBlockN : 0;
}

FLASHMLA_HOST_DEVICE inline long long sched_cost(int seqlen) { return sched_blocks(seqlen) + kFixedCostBlocks; }

// Tokens [0, end) of a whole sequence (negative lengths count as 0).
FLASHMLA_HOST_DEVICE inline int whole_end(int seqlen) { return seqlen > 0 ? seqlen : 0; }

// The sequence whose interval holds position x: the largest i with prefix[i] <= x (x < prefix[batch]).
FLASHMLA_HOST_DEVICE inline int locate(const long long* prefix, int batch, long long x) {
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Fields 0..3 of worker `part`'s metadata row, from the cost prefix sums (prefix[batch] = T > 0).
FLASHMLA_HOST_DEVICE inline void part_range(const long long* prefix, const int* seqlens, int batch, int part,
                                            int num_sm_parts, int* md) {
  const long long total = prefix[batch];
  const long long share = (total + num_sm_parts - 1) / num_sm_parts;
  const long long x0 = part * share, x1 = x0 + share < total ? x0 + share : total;
  if (x0 >= total) {  // nothing left for this worker
    md[0] = batch;
    md[1] = 0;
    md[2] = batch - 1;
    md[3] = 0;
    return;
  }
  const int i0 = locate(prefix, batch, x0);
  const long long off0 = x0 - prefix[i0] - kFixedCostBlocks;  // first block, if >= 0
  md[0] = i0;
  md[1] = off0 > 0 ? int(off0) * kSchedBlockN : 0;
  if (x1 == total) {
    md[2] = batch - 1;
    md[3] = whole_end(seqlens[batch - 1]);
    return;
  }
  const int i1 = locate(prefix, batch, x1);
  const long long off1 = x1 - prefix[i1] - kFixedCostBlocks;
  if (off1 > 0) {  // stops inside sequence i1's blocks
    md[2] = i1;
    md[3] = int(off1) * kSchedBlockN;
  } else {  // stops before sequence i1's first block: the previous one is finished here
    md[2] = i1 - 1;
    md[3] = i1 > 0 ? whole_end(seqlens[i1 - 1]) : 0;
  }
}

#if !defined(__CUDA_ARCH__)
// The whole schedule, sequentially (the CPU path; the CUDA kernel computes the same in parallel).
inline void build_schedule(const int* seqlens, int batch, int num_sm_parts, int* metadata, int* num_splits) {
  std::vector<long long> prefix(batch + 1, 0);
  for (int i = 0; i < batch; ++i) prefix[i + 1] = prefix[i] + sched_cost(seqlens[i]);
  std::vector<int> pieces(batch, 0), first_part(batch, num_sm_parts);
  for (int part = 0; part < num_sm_parts; ++part) {
    int* md = metadata + part * kMetadataWidth;
    part_range(prefix.data(), seqlens, batch, part, num_sm_parts, md);
    md[4] = md[5] = md[6] = md[7] = 0;
    for (int i = md[0]; i <= md[2]; ++i) {
      ++pieces[i];
      first_part[i] = std::min(first_part[i], part);
    }
  }
  num_splits[0] = 0;
  for (int i = 0; i < batch; ++i) num_splits[i + 1] = num_splits[i] + pieces[i];
  for (int part = 0; part < num_sm_parts; ++part) {
    int* md = metadata + part * kMetadataWidth;
    if (md[0] <= md[2]) md[4] = part - first_part[md[0]];
  }
}
#endif

}  // namespace flashmla
