// The walk of csrc/schedule.h (schedule_walk_advance + schedule_row, which the CUDA metadata kernel runs)
// against the sequential build_schedule (which the CPU runs), on random inputs: every metadata row equal.
// Built and run by tests/test_schedule_walk.py:  schedule_walk_check <cases> <seed>; prints "ok <cases>".
#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "schedule.h"

using namespace flashmla;

// The walk with positions of type Pos and the boundary search a binary search over the line.
template <typename Pos>
static std::vector<int> walk_rows(const std::vector<int>& lens, int parts, long long rows_per_head_k) {
  const int batch = static_cast<int>(lens.size());
  const int fixed = fixed_cost_blocks(rows_per_head_k);
  std::vector<Pos> line(batch + 1, 0);
  for (int i = 0; i < batch; ++i) line[i + 1] = line[i] + sched_blocks(lens[i]) + fixed;
  const long long total = line[batch];
  const Pos payload = static_cast<Pos>(schedule_payload(total, parts, fixed));
  const auto last_boundary = [&](Pos y, Pos& line_k) {
    const int k = static_cast<int>(std::upper_bound(line.begin(), line.end(), y) - line.begin()) - 1;
    line_k = line[k];
    return k;
  };
  std::vector<int> md(parts * kMetadataWidth);
  ScheduleWalk<Pos> walk;
  for (int part = 0; part < parts; ++part) {
    const ScheduleWalk<Pos> from = walk;
    schedule_walk_advance(batch, line[batch], payload, fixed, part == parts - 1, walk, last_boundary);
    if (walk.split > 0 && walk.x <= walk.line_j) return {};  // inside a sequence means past its start
    schedule_row(from, walk, lens.data(), batch, &md[part * kMetadataWidth]);
  }
  return md;
}

static int random_length(std::mt19937_64& rng, int mode) {
  switch (mode) {
    case 0: return std::uniform_int_distribution<int>(0, 70000)(rng);
    case 1: return 4096;
    case 2: return std::uniform_int_distribution<int>(0, 200)(rng);
    case 3: return rng() % 4 == 0 ? INT_MAX - static_cast<int>(rng() % 100) : static_cast<int>(rng() % 1000) - 10;
    default: return rng() % 3 == 0 ? 0 : static_cast<int>(rng() % (1 << 22));
  }
}

int main(int argc, char** argv) {
  const long long cases = argc > 1 ? std::atoll(argv[1]) : 20000;
  std::mt19937_64 rng(argc > 2 ? std::atoll(argv[2]) : 0);
  for (long long c = 0; c < cases; ++c) {
    const int max_batch = c % 100 == 0 ? 30000 : c % 10 == 0 ? 4096 : 300;  // the kernel walks up to ~28,000 on Hopper
    const int batch = std::uniform_int_distribution<int>(0, max_batch)(rng);
    const int parts = std::uniform_int_distribution<int>(1, c % 7 == 0 ? 1024 : 300)(rng);
    const long long rows = rng() % 2 ? 64 : 128;  // both fixed costs
    const int mode = static_cast<int>(rng() % 5);
    std::vector<int> lens(batch);
    for (int& len : lens) len = random_length(rng, mode);
    std::vector<int> expected(parts * kMetadataWidth), num_splits(batch + 1);
    build_schedule(lens.data(), batch, parts, rows, expected.data(), num_splits.data());
    long long total = 0;
    for (int len : lens) total += sched_blocks(len) + fixed_cost_blocks(rows);
    const bool wide_ok = walk_rows<long long>(lens, parts, rows) == expected;
    // 32-bit positions where the CUDA kernel uses them (line end <= INT_MAX / 2).
    const bool narrow_ok = total > INT_MAX / 2 || walk_rows<int>(lens, parts, rows) == expected;
    if (!wide_ok || !narrow_ok) {
      std::printf("mismatch: case %lld batch %d parts %d rows %lld mode %d (%s positions)\n", c, batch, parts, rows,
                  mode, wide_ok ? "32-bit" : "64-bit");
      return 1;
    }
  }
  std::printf("ok %lld\n", cases);
  return 0;
}
