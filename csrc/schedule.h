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

FLASHMLA_HOST_DEVICE inline int sched_blocks(int seqlen) {
  return seqlen > 0 ? (seqlen + kSchedBlockN - 1) / kSchedBlockN : 0;
}

// Fills metadata (num_sm_parts x kMetadataWidth) and num_splits (batch + 1) from the lengths, for
// rows_per_head_k query rows per KV head (get_mla_metadata's num_heads_per_head_k).
// Runs sequentially: on the host for CPU tensors, in one CUDA thread for device tensors.
FLASHMLA_HOST_DEVICE inline void build_schedule(const int* seqlens, int batch, int num_sm_parts,
                                                long long rows_per_head_k, int* metadata, int* num_splits) {
  const int fixed_cost = fixed_cost_blocks(rows_per_head_k);
  long long total_cost = 0;
  for (int i = 0; i < batch; ++i) total_cost += sched_blocks(seqlens[i]) + fixed_cost;
  const long long payload = (total_cost + num_sm_parts - 1) / num_sm_parts + fixed_cost;

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

// The same schedule in positions, the form the CUDA metadata kernel computes in parallel
// (csrc/cuda/mla_cuda.cu). Lay the work out on a cost line: sequence i occupies
// [P_i, P_{i+1}) with P_0 = 0 and P_{i+1} = P_i + sched_blocks(seqlen_i) + fixed_cost, so P is strictly
// increasing (fixed_cost > 0) and a position x in [P_i, P_{i+1}) is block x - P_i of sequence i.
// A worker that starts at x with budget W = payload pays exactly the line distance for every sequence
// it finishes (the first one's remaining blocks plus one fixed cost), so build_schedule's worker ends
// at the last boundary P_k <= x + W if the budget left there is at most fixed_cost, else at
// x + W - fixed_cost inside sequence k (then it takes >= 1 block: W > fixed_cost); the last worker ends
// at P_batch. Each end follows from the one before (schedule_walk, the one sequential part: a few
// shared-memory reads per worker on the GPU); the metadata rows and num_splits follow from the ends,
// each on its own (schedule_metadata_row, schedule_num_splits_at).
struct SchedulePlan {
  long long payload;  // W: build_schedule's budget per worker
  int fixed_cost;
};

FLASHMLA_HOST_DEVICE inline SchedulePlan schedule_plan(long long total_cost, int num_sm_parts,
                                                       long long rows_per_head_k) {
  const int fixed_cost = fixed_cost_blocks(rows_per_head_k);
  return {(total_cost + num_sm_parts - 1) / num_sm_parts + fixed_cost, fixed_cost};
}

// Where the worker starting at position x (inside or at the start of sequence *seq, P_{*seq} <= x)
// ends; advances *seq to the sequence holding the end (batch at P_batch).
FLASHMLA_HOST_DEVICE inline long long schedule_worker_end(const long long* prefix, int batch, SchedulePlan plan,
                                                          bool last_part, long long x, int* seq) {
  int k = *seq;
  if (last_part) {
    *seq = batch;
    return prefix[batch];
  }
  const long long reach = x + plan.payload;
  while (k < batch && prefix[k + 1] <= reach) ++k;
  *seq = k;
  if (k == batch) return prefix[batch];
  const long long inside = reach - plan.fixed_cost;
  return inside > prefix[k] ? inside : prefix[k];
}

// build_schedule's metadata row for worker `part` that runs from `begin` (in sequence begin_seq) to
// `end` (in sequence end_seq), begin_split being its piece number in begin_seq.
FLASHMLA_HOST_DEVICE inline void schedule_metadata_row(const long long* prefix, const int* seqlens, long long begin,
                                                       int begin_seq, long long end, int end_seq, int begin_split,
                                                       int* md) {
  md[0] = begin_seq;
  md[1] = static_cast<int>(begin - prefix[begin_seq]) * kSchedBlockN;
  if (end > prefix[end_seq]) {  // ends inside sequence end_seq (never at P_batch: end_seq < batch then)
    md[2] = end_seq;
    md[3] = static_cast<int>(end - prefix[end_seq]) * kSchedBlockN;
  } else {  // ends at a sequence boundary
    md[2] = end_seq - 1;
    md[3] = end_seq > 0 ? (seqlens[end_seq - 1] > 0 ? seqlens[end_seq - 1] : 0) : 0;
  }
  md[4] = begin_split;
  md[5] = md[6] = md[7] = 0;
}

// The sequential part: every worker's end (ends, end_seq = the sequence holding it), its piece number
// in its first sequence (begin_split) and how many earlier ends lie inside a sequence
// (inside_before[0..num_sm_parts]). An end inside a sequence is one cut: the next worker starts
// there with the next piece number.
FLASHMLA_HOST_DEVICE inline void schedule_walk(const long long* prefix, int batch, int num_sm_parts, SchedulePlan plan,
                                               long long* ends, int* end_seq, int* begin_split, int* inside_before) {
  long long x = 0;
  int seq = 0, split = 0, inside = 0;
  for (int part = 0; part < num_sm_parts; ++part) {
    begin_split[part] = split;
    inside_before[part] = inside;
    const int first_seq = seq;
    x = schedule_worker_end(prefix, batch, plan, part == num_sm_parts - 1, x, &seq);
    ends[part] = x;
    end_seq[part] = seq;
    const bool ends_inside = seq < batch && x > prefix[seq];
    split = ends_inside ? (seq == first_seq ? split + 1 : 1) : 0;
    inside += ends_inside;
  }
  inside_before[num_sm_parts] = inside;
}

// num_splits[i] = i + the pieces cut off before sequence i = i + inside_before[q], q the first worker
// ending at or after P_i (ends are non-decreasing and the last one is P_batch).
FLASHMLA_HOST_DEVICE inline int schedule_num_splits_at(int i, const long long* prefix, int num_sm_parts,
                                                       const long long* ends, const int* inside_before) {
  int lo = 0, hi = num_sm_parts - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (ends[mid] >= prefix[i])
      hi = mid;
    else
      lo = mid + 1;
  }
  return i + inside_before[lo];
}

}  // namespace flashmla
