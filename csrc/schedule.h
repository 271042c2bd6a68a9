// The split-KV work schedule, shared by the CPU and CUDA paths.
//
// Each sequence's live tokens are cut into scheduling blocks of kSchedBlockN tokens. The work of a
// sequence costs (its blocks + fixed_cost_blocks(rows)), the fixed part standing for loading q and
// writing the result. The schedule hands out `num_sm_parts` contiguous runs of that work, in batch order,
// about equal in cost, so every worker (a CUDA block or a CPU task) reads about as many KV bytes.
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
// Invariants: every sequence, empty ones included, is covered exactly once; num_splits[batch] <=
// batch + num_sm_parts - 1.
#pragma once

#if defined(__CUDACC__)
#define FLASHMLA_HOST_DEVICE __host__ __device__
#else
#define FLASHMLA_HOST_DEVICE
#endif

namespace flashmla {

constexpr int kSchedBlockN = 64;        // tokens per scheduling block
constexpr int kMetadataWidth = 8;       // int32 fields per worker in tile_scheduler_metadata
constexpr int kRowsPerWorkerTile = 64;  // query rows (s_q * heads per KV head) one CUDA worker holds

// Fixed cost of one (sequence, worker) piece, in blocks: loading q, writing the fp32 partial result
// and merging it, which grow with the query rows. Measured on the H100 (scripts/sched_sweep.py,
// docs/KERNEL_NOTES.md): up to 64 rows, 3 is within 1% of the best of {0, 1, 2, 3, 5} on every
// varlen row for both CUDA kernels (FlashMLA's 5 was 1-4% slower); above 64 rows (two 64-row tiles
// per KV head, half as many workers) 3 cut each of 128 equal 4096-token sequences in two, 2-3%
// slower than 5, which keeps them whole.
FLASHMLA_HOST_DEVICE inline int fixed_cost_blocks(long long rows_per_head_k) {
  return rows_per_head_k <= kRowsPerWorkerTile ? 3 : 5;
}

struct WorkerRange {
  int begin_batch, begin_token, end_batch, end_token, begin_split;
};

// ceil(seqlen / kSchedBlockN) for seqlen > 0, written so that lengths near INT_MAX do not overflow.
FLASHMLA_HOST_DEVICE inline int sched_blocks(int seqlen) {
  return seqlen > 0 ? (seqlen - 1) / kSchedBlockN + 1 : 0;
}

// Each worker's budget: an equal share of the total cost plus one fixed cost, FlashMLA's rule (build_schedule
// and the walk below both take it from here).
FLASHMLA_HOST_DEVICE inline long long schedule_payload(long long total_cost, int num_sm_parts, int fixed_cost) {
  return (total_cost + num_sm_parts - 1) / num_sm_parts + fixed_cost;
}

// Fills metadata (num_sm_parts x kMetadataWidth) and num_splits (batch + 1) from the lengths, for
// rows_per_head_k query rows per KV head (get_mla_metadata's num_heads_per_head_k).
// Runs sequentially: on the host for CPU tensors, in one CUDA thread for device tensors.
FLASHMLA_HOST_DEVICE inline void build_schedule(const int* seqlens, int batch, int num_sm_parts,
                                                long long rows_per_head_k, int* metadata, int* num_splits) {
  const int fixed_cost = fixed_cost_blocks(rows_per_head_k);
  long long total_cost = 0;
  for (int i = 0; i < batch; ++i) total_cost += sched_blocks(seqlens[i]) + fixed_cost;
  const long long payload = schedule_payload(total_cost, num_sm_parts, fixed_cost);

  int cur_batch = 0, cur_block = 0, cur_split = 0, cum_splits = 0;
  num_splits[0] = 0;
  for (int part = 0; part < num_sm_parts; ++part) {
    int* md = metadata + part * kMetadataWidth;
    md[0] = cur_batch;
    md[1] = cur_block * kSchedBlockN;
    md[4] = cur_split;
    md[5] = md[6] = md[7] = 0;
    const bool last_part = part == num_sm_parts - 1;
    long long budget = payload;
    while (cur_batch < batch) {
      const int remaining = sched_blocks(seqlens[cur_batch]) - cur_block;
      if (last_part || budget >= remaining + fixed_cost) {
        // The rest of this sequence fits: finish it here.
        cum_splits += cur_split + 1;
        num_splits[cur_batch + 1] = cum_splits;
        budget -= remaining + fixed_cost;
        ++cur_batch;
        cur_block = 0;
        cur_split = 0;
      } else {
        // Take what the budget allows and leave the rest to the next worker.
        const long long take = budget - fixed_cost;
        if (take > 0) {
          cur_block += static_cast<int>(take);
          ++cur_split;
        }
        break;
      }
    }
    if (cur_block > 0) {  // stopped inside sequence cur_batch
      md[2] = cur_batch;
      md[3] = cur_block * kSchedBlockN;
    } else {  // stopped at a sequence boundary
      md[2] = cur_batch - 1;
      md[3] = cur_batch > 0 ? (seqlens[cur_batch - 1] > 0 ? seqlens[cur_batch - 1] : 0) : 0;
    }
  }
}

// build_schedule's result, one worker at a time, as positions on a cost line (the CUDA kernel's form: the
// line is a prefix sum it builds in parallel, and each worker's step is a search rather than a loop over
// its sequences). Sequence i occupies [line[i], line[i + 1]) with line[i + 1] = line[i] + sched_blocks(len_i)
// + fixed_cost, so the line is strictly increasing; a worker at x (in sequence j, line[j] <= x) pays
// line[j + 1] - x to finish j, so with budget W it finishes every sequence that ends at or before y = x + W.
// With k the last boundary at or before y (line[k] <= y, j <= k <= batch): it stops at line[k] when k == batch
// or when k > j and the budget left there, y - line[k], is at most fixed_cost (no piece taken); else it takes
// y - fixed_cost - line[k] blocks of sequence k (at least one) and stops inside it. The last worker takes
// everything. Pos holds line positions (the CUDA kernel uses int where the line's end fits twice in one).
// tests/test_schedule_walk.py runs the walk against build_schedule on the host (random inputs, both Pos).
template <typename Pos>
struct ScheduleWalk {
  Pos x = 0;       // where the next worker starts on the line
  Pos line_j = 0;  // line[j]
  int j = 0;       // the sequence x lies in (batch once everything is handed out)
  int split = 0;   // pieces of sequence j handed out before x
};

// Moves the walk past one worker. line_end = line[batch]; last_boundary(y, line_k) returns the largest k in
// [0, batch] with line[k] <= y and sets line_k = line[k] (k >= j follows from line[j] <= x <= y). A worker that
// stops at a boundary leaves split == 0; one that stops inside a sequence leaves split >= 1.
template <typename Pos, typename LastBoundary>
FLASHMLA_HOST_DEVICE inline void schedule_walk_advance(int batch, Pos line_end, Pos payload, int fixed_cost,
                                                       bool last_part, ScheduleWalk<Pos>& w,
                                                       LastBoundary last_boundary) {
  // min(x + payload, line_end) without overflow; past line_end the result is the same (k == batch).
  const Pos y = last_part ? line_end : w.x + (payload < line_end - w.x ? payload : line_end - w.x);
  Pos line_k;
  const int k = last_boundary(y, line_k);
  const bool at_boundary = k == batch || (k > w.j && y - line_k <= fixed_cost);
  w.x = at_boundary ? line_k : y - fixed_cost;
  w.split = at_boundary ? 0 : (k == w.j ? w.split + 1 : 1);
  w.j = k;
  w.line_j = line_k;
}

// The metadata row (kMetadataWidth ints) of the worker that the walk took from state `from` to state `to`.
template <typename Pos>
FLASHMLA_HOST_DEVICE inline void schedule_row(const ScheduleWalk<Pos>& from, const ScheduleWalk<Pos>& to,
                                              const int* seqlens, int batch, int* md) {
  md[0] = from.j;
  md[1] = from.j < batch ? static_cast<int>(from.x - from.line_j) * kSchedBlockN : 0;
  md[4] = from.split;
  md[5] = md[6] = md[7] = 0;
  if (to.split == 0) {  // stopped at the boundary line[to.j]
    md[2] = to.j - 1;
    md[3] = to.j > 0 ? (seqlens[to.j - 1] > 0 ? seqlens[to.j - 1] : 0) : 0;
  } else {  // stopped inside sequence to.j
    md[2] = to.j;
    md[3] = static_cast<int>(to.x - to.line_j) * kSchedBlockN;
  }
}

}  // namespace flashmla
