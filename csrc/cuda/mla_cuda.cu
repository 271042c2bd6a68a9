// CUDA implementations of the flashmla operators: metadata on the device, decode + combine.
// No host synchronisation anywhere, so a decode step can be captured in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "../mla_shapes.h"
#include "../schedule.h"
#include "combine.h"
#include "decode_launchers.h"

namespace flashmla {
namespace {

// Device properties are read once per device.
struct DeviceFacts {
  int sm_count;
  int cc_major, cc_minor;
  int smem_optin;  // largest dynamic shared memory a block may ask for
};

const DeviceFacts& device_facts(int device) {
  static std::mutex mu;
  static std::vector<std::unique_ptr<DeviceFacts>> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= int(cache.size())) cache.resize(device + 1);
  if (!cache[device]) {
    DeviceFacts f{};
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.sm_count, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.cc_major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.cc_minor, cudaDevAttrComputeCapabilityMinor, device));
    cache[device] = std::make_unique<DeviceFacts>(f);
  }
  return *cache[device];
}

// Must equal flashmla_ops/fake.py num_sm_parts (tests/test_shapes.py checks).
int64_t cuda_num_sm_parts(int device, int64_t num_heads_per_head_k, int64_t num_heads_k) {
  const int64_t tiles = num_heads_k * ((num_heads_per_head_k + kRowsPerWorkerTile - 1) / kRowsPerWorkerTile);
  return std::max<int64_t>(1, device_facts(device).sm_count / tiles);
}

// Two kernels build build_schedule's values (csrc/schedule.h), both one block:
//  - schedule_walk_kernel (where walk_fits): the block stages the lengths and builds the cost line by a
//    scan in shared memory (static arrays where walk_is_static, else dynamic: walk_smem_bytes); warp 0
//    walks the workers (schedule_walk_advance), each step a 32-lane ballot over a window of the line in
//    registers instead of a loop over sequences; then every thread builds rows (schedule_row) and
//    num_splits. The only sequential part is one short step per worker.
//  - build_schedule_kernel (batches whose line does not fit in shared memory, and a cost line past
//    INT_MAX / 2 blocks): one thread runs the sequential build_schedule over lengths staged in shared
//    memory, or read from global memory when too many to stage.
constexpr int kScheduleThreads = 256;
constexpr int kMaxStagedBatch = 12 * 1024;  // 48 KiB of static shared memory
// The walk packs a state's sequence and split as j | split << 16 (j <= batch, split < num_sm_parts).
constexpr int kWalkMaxBatch = (1 << 16) - 1;
constexpr int kWalkMaxParts = (1 << 15) - 1;
// Up to these sizes the walk's arrays are static shared memory at constant addresses (the instance
// measured in the eighteenth session); larger ones use dynamic shared memory, which measured 3-6% slower
// at these sizes (docs/KERNEL_NOTES.md, "The walk, shipped").
constexpr int kWalkStaticBatch = 4096;
constexpr int kWalkStaticParts = 1024;

// The walk kernel's arrays, in this order: lens[batch], line[batch + 1], then the walk's states state_x,
// state_js, state_cuts, each [num_sm_parts + 1]; the sizes of the dynamic layout, in bytes.
size_t walk_smem_bytes(int64_t batch, int64_t parts) {
  return sizeof(int) * size_t(2 * batch + 1 + 3 * (parts + 1));
}

bool walk_fits(int64_t batch, int64_t parts, int device) {
  return batch <= kWalkMaxBatch && parts <= kWalkMaxParts &&
         walk_smem_bytes(batch, parts) <= size_t(device_facts(device).smem_optin) - 1024;  // 1 KiB: the static part
}

bool walk_is_static(int64_t batch, int64_t parts) { return batch <= kWalkStaticBatch && parts <= kWalkStaticParts; }

__global__ void __launch_bounds__(kScheduleThreads)
    build_schedule_kernel(const int* seqlens, int batch, int num_sm_parts, long long rows_per_head_k, int* metadata,
                          int* num_splits) {
  __shared__ int staged[kMaxStagedBatch];
  const bool stage = batch <= kMaxStagedBatch;
  if (stage) {
    for (int i = threadIdx.x; i < batch; i += blockDim.x) staged[i] = seqlens[i];
    __syncthreads();
  }
  if (threadIdx.x == 0)
    build_schedule(stage ? staged : seqlens, batch, num_sm_parts, rows_per_head_k, metadata, num_splits);
}

template <bool kStatic>  // walk_is_static: arrays at constant addresses; else dynamic shared memory (walk_smem_bytes)
__global__ void __launch_bounds__(kScheduleThreads)
    schedule_walk_kernel(const int* seqlens, int batch, int num_sm_parts, long long rows_per_head_k, int* metadata,
                         int* num_splits) {
  constexpr int kWarps = kScheduleThreads / 32;
  constexpr int kBatch = kStatic ? kWalkStaticBatch : 1, kParts = kStatic ? kWalkStaticParts : 1;
  __shared__ int static_lens[kBatch], static_line[kBatch + 1];
  __shared__ int static_x[kParts + 1], static_js[kParts + 1], static_cuts[kParts + 1];
  int *lens = static_lens, *line = static_line, *state_x = static_x, *state_js = static_js, *state_cuts = static_cuts;
  if constexpr (!kStatic) {
    extern __shared__ int walk_smem[];
    lens = walk_smem;
    line = lens + batch;
    state_x = line + batch + 1;
    state_js = state_x + num_sm_parts + 1;
    state_cuts = state_js + num_sm_parts + 1;
  }
  // line: the cost line, [batch + 1], held in 32 bits when its end fits. The walk's state before worker p
  // (p = num_sm_parts: after the last): state_x, state_js = j | split << 16, and state_cuts = how many of the
  // states 1..p lie inside a sequence (split > 0).
  __shared__ long long warp_sums[kWarps];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int fixed_cost = fixed_cost_blocks(rows_per_head_k);

  // Phase 1: the line by a block-wide scan over contiguous chunks of the batch.
  for (int i = tid; i < batch; i += kScheduleThreads) lens[i] = seqlens[i];
  __syncthreads();
  const int chunk = (batch + kScheduleThreads - 1) / kScheduleThreads;
  const int first = min(tid * chunk, batch), last = min(first + chunk, batch);
  long long own = 0;
  for (int i = first; i < last; ++i) own += sched_blocks(lens[i]) + fixed_cost;
  long long inclusive = own;
  for (int d = 1; d < 32; d *= 2) {
    const long long up = __shfl_up_sync(~0u, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  long long before = inclusive - own, total = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_sums[w] : 0;
    total += warp_sums[w];
  }
  if (total > INT_MAX / 2) {  // lengths near INT_MAX: positions past 32 bits, the sequential schedule
    if (tid == 0) build_schedule(lens, batch, num_sm_parts, rows_per_head_k, metadata, num_splits);
    return;
  }
  if (tid == 0) line[0] = 0;
  for (int i = first; i < last; ++i) line[i + 1] = static_cast<int>(before += sched_blocks(lens[i]) + fixed_cost);
  __syncthreads();

  // Phase 2: warp 0 walks the workers, every lane running each step, and records each worker's end state;
  // the rows are built from those in phase 3, so a step holds only what the next one depends on. The line
  // is read through a window in registers, lane l holding line[base + 1 + l] (INT_MAX past the end), which
  // slides forward only: the boundary search is a ballot and line[k] a shuffle, with no memory access on a
  // step's critical path unless the window moves.
  if (warp == 0) {
    const int line_end = static_cast<int>(total);
    const int payload = static_cast<int>(schedule_payload(total, num_sm_parts, fixed_cost));
    int base = 0, line_base = 0;  // line_base = line[base]
    int win = lane + 1 <= batch ? line[lane + 1] : INT_MAX;
    const auto last_boundary = [&](int y, int& line_k) {
      unsigned below;  // the lanes with line[base + 1 + lane] <= y, a prefix of them (the line increases)
      while ((below = __ballot_sync(~0u, win <= y)) == ~0u) {
        line_base = __shfl_sync(~0u, win, 31);
        base += 32;
        win = base + 1 + lane <= batch ? line[base + 1 + lane] : INT_MAX;
      }
      const int k = base + __popc(below);
      const int in_window = __shfl_sync(~0u, win, max(k - base - 1, 0));
      line_k = k == base ? line_base : in_window;
      return k;
    };
    ScheduleWalk<int> walk;
    int cuts = 0, kept_x = 0, kept_js = 0, kept_cuts = 0;  // lane (part % 32)'s copy of the state after part
    if (lane == 0) state_x[0] = state_js[0] = state_cuts[0] = 0;
    for (int part = 0; part < num_sm_parts; ++part) {
      schedule_walk_advance(batch, line_end, payload, fixed_cost, part == num_sm_parts - 1, walk, last_boundary);
      cuts += walk.split > 0;  // worker part + 1 starts inside sequence walk.j
      if (lane == part % 32) {
        kept_x = walk.x;
        kept_js = walk.j | walk.split << 16;
        kept_cuts = cuts;
      }
      if ((part % 32 == 31 || part == num_sm_parts - 1) && lane <= part % 32) {
        const int after = part - part % 32 + lane + 1;
        state_x[after] = kept_x;
        state_js[after] = kept_js;
        state_cuts[after] = kept_cuts;
      }
    }
  }
  __syncthreads();

  // Phase 3: the rows, and num_splits: sequence i was cut once per worker that starts inside it, so
  // num_splits[i + 1] is i + 1 plus the cuts up to the last state in a sequence <= i (j never decreases).
  const auto j_of = [&](int p) { return state_js[p] & 0xffff; };
  const auto state = [&](int p) {
    ScheduleWalk<int> w;
    w.x = state_x[p];
    w.j = j_of(p);
    w.split = state_js[p] >> 16;
    w.line_j = line[w.j];
    return w;
  };
  for (int part = tid; part < num_sm_parts; part += kScheduleThreads) {
    int md[kMetadataWidth];
    schedule_row(state(part), state(part + 1), lens, batch, md);
    int4* row = reinterpret_cast<int4*>(metadata + part * kMetadataWidth);
    row[0] = make_int4(md[0], md[1], md[2], md[3]);
    row[1] = make_int4(md[4], md[5], md[6], md[7]);
  }
  if (tid == 0) num_splits[0] = 0;
  for (int i = tid; i < batch; i += kScheduleThreads) {
    int lo = 0, hi = num_sm_parts;  // the last state p in [0, num_sm_parts] with j_p <= i (state 0 has j = 0)
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (j_of(mid) <= i) lo = mid;
      else hi = mid - 1;
    }
    num_splits[i + 1] = i + 1 + state_cuts[lo];
  }
}

std::tuple<at::Tensor, at::Tensor> get_mla_metadata_cuda(const at::Tensor& cache_seqlens, int64_t num_heads_per_head_k,
                                                         int64_t num_heads_k) {
  check_metadata_args(cache_seqlens, num_heads_per_head_k, num_heads_k);
  const c10::cuda::CUDAGuard guard(cache_seqlens.device());
  const int64_t batch = cache_seqlens.size(0);
  const int64_t parts = cuda_num_sm_parts(cache_seqlens.get_device(), num_heads_per_head_k, num_heads_k);
  auto lens = cache_seqlens.contiguous();
  auto metadata = at::empty({parts, kMetadataWidth}, cache_seqlens.options());
  auto num_splits = at::empty({batch + 1}, cache_seqlens.options());
  const auto launch = [&](auto kernel, size_t smem) {  // one block; every kernel takes the same arguments
    kernel<<<1, kScheduleThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        lens.data_ptr<int>(), int(batch), int(parts), num_heads_per_head_k, metadata.data_ptr<int>(),
        num_splits.data_ptr<int>());
  };
  if (walk_is_static(batch, parts)) {
    launch(schedule_walk_kernel<true>, 0);
  } else if (walk_fits(batch, parts, cache_seqlens.get_device())) {
    const size_t smem = walk_smem_bytes(batch, parts);
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(schedule_walk_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    launch(schedule_walk_kernel<false>, smem);
  } else {
    launch(build_schedule_kernel, 0);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {metadata, num_splits};
}

// Which decode kernel runs: FLASHMLA_KERNEL=auto (default: the Hopper kernel where it applies, except
// where auto_prefers_portable; else portable), portable, or sm90 (error where the Hopper kernel does not
// apply). Read per call so tests can run both paths on the same inputs.
enum class KernelChoice { kAuto, kPortable, kSm90 };

KernelChoice kernel_choice() {
  const char* v = std::getenv("FLASHMLA_KERNEL");
  if (v == nullptr || std::strcmp(v, "auto") == 0 || v[0] == 0) return KernelChoice::kAuto;
  if (std::strcmp(v, "portable") == 0) return KernelChoice::kPortable;
  if (std::strcmp(v, "sm90") == 0) return KernelChoice::kSm90;
  TORCH_CHECK(false, "FLASHMLA_KERNEL must be auto, portable or sm90, got '", v, "'");
}

// A 0/1 switch read from the environment on every call (for measurements): `unset` when the variable
// is unset or empty; any other value but 0 and 1 raises, naming the variable.
bool env_switch(const char* name, bool unset) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == 0) return unset;
  TORCH_CHECK(std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0, name, " must be 0 or 1, got '", v, "'");
  return v[0] == '1';
}

// Whether KV loads may be marked L2 evict-first (l2_policy.cuh), by default up to `max_rows` query rows
// per KV head; FLASHMLA_KV_EVICT_FIRST=1 / 0 forces it on / off (read per call, for measurements). The
// caps, measured with scripts/env_ab.py (docs/KERNEL_NOTES.md):
// - portable kernel: 64 rows, i.e. wherever one row tile reads a KV head's KV (its launcher clears it
//   where two blocks read the same KV). H100, fourth session: 1-3.5% faster at 16 rows with variable
//   lengths, within +-1.5% at 32; H200, the kernel of 2786c74 (fourteenth session): 1.003-1.011x on all
//   7 rows with 32-64 query rows, as the twelfth session's 1.002-1.008x on the kernel before;
// - Hopper kernel: 128 rows, i.e. up to two 64-row tiles reading the same KV (H200, twelfth session:
//   1.5-2.8% faster at 32 and 64 rows, 0.4-2.6% at 96 and 128; mixed at 192 and 256 rows). On the H100 an
//   older kernel (fourth session, before the partial results were kept in L2) measured 32-64 rows between
//   2% slower and 0.6% faster; not measured there since.
constexpr int kEvictFirstMaxRowsPortable = 64;
constexpr int kEvictFirstMaxRowsSm90 = 128;
bool kv_evict_first(int64_t rows_per_head_k, int max_rows) {
  return env_switch("FLASHMLA_KV_EVICT_FIRST", rows_per_head_k <= max_rows);
}

// Whether partial results stay in L2 until the combine kernel reads and discards them
// (l2_policy.cuh; the Hopper kernel's only, and its launcher applies the evict-last stores only with
// one row tile per KV head). Measured on the H100: Hopper varlen rows 2-4% faster, fixed lengths
// unchanged (docs/KERNEL_NOTES.md). On by default; FLASHMLA_PARTIALS_L2=0 / 1 turns it off / on (read
// per call, for measurements).
bool partials_in_l2() { return env_switch("FLASHMLA_PARTIALS_L2", true); }

// The Hopper kernel's consumer schedule (decode_sm90.cuh): seesaw (each warpgroup computes the scores
// of every other tile; one's softmax overlaps the other's tensor-core work) or split (both split
// every tile's scores by tokens). Measured on the H200 (docs/KERNEL_NOTES.md v7): with TMA pages
// (page_block_size % 64 == 0) seesaw 2-10% faster above 64 query rows per KV head (two or more row
// tiles), 0-5% slower up to 64; with cp.async gathers (other page sizes) 32-34% longer at 128 rows, and
// with the gather of v14 (two tiles in flight) still 2-5% longer at 128-256 rows.
// So seesaw above 64 rows on TMA pages. FLASHMLA_SM90_SEESAW=1 / 0 forces it (read per call, for
// measurements and tests).
constexpr int kSeesawMinRows = 65;
bool sm90_seesaw(int64_t rows_per_head_k, int64_t page_block_size) {
  return env_switch("FLASHMLA_SM90_SEESAW", rows_per_head_k >= kSeesawMinRows && page_block_size % 64 == 0);
}

// The Hopper kernel's lazy softmax rescale threshold (decode_sm90.cuh max_grew), log2 units: O is
// rescaled only when a row maximum grows by more than this. FLASHMLA_RESCALE_THRESHOLD=<number in
// [0, 15]> sets it (0: whenever it grows, the eager rescale; read per call, for measurements and
// tests). At most 15: P <= 2^15 must stay finite in fp16 (largest 65504). The portable kernel always
// rescales eagerly.
constexpr float kDefaultRescaleThreshold = 8.f;
float rescale_threshold() {
  const char* v = std::getenv("FLASHMLA_RESCALE_THRESHOLD");
  if (v == nullptr || v[0] == 0) return kDefaultRescaleThreshold;
  char* end = nullptr;
  const float t = std::strtof(v, &end);
  TORCH_CHECK(*end == 0 && t >= 0.f && t <= 15.f, "FLASHMLA_RESCALE_THRESHOLD must be a number in [0, 15], got '", v,
              "'");
  return t;
}

// Calls the Hopper kernel takes that the automatic choice still sends to the portable kernel: pages of
// one or two tokens with at most 16 query rows per KV head. There each of the Hopper kernel's 64-token
// tiles costs 64 or 32 table lookups, which its 16-row tile of mma work does not cover, while the portable
// kernel hides them. Measured on the H200 (docs/KERNEL_NOTES.md v14, the Hopper gather of bccb0e0), 4096
// tokens, portable / Hopper time at 8-16 rows: 1-token pages 0.88-0.89, 2-token 0.92, 4-token 0.99 (even),
// 8-token 1.02, 16- and 32-token 1.03-1.05; at 32 rows the Hopper kernel wins on every page (1-token 1.26x).
constexpr int kPortableMaxPage = 2;
constexpr int kPortableMaxRows = 16;
bool auto_prefers_portable(int64_t rows_per_head_k, int64_t page_block_size) {
  return page_block_size <= kPortableMaxPage && rows_per_head_k <= kPortableMaxRows;
}

// Launches the Hopper kernel if this build has it, the device is sm_90 and the shapes fit.
bool try_launch_sm90(const DecodeParams& p, bool is_bf16, const DeviceFacts& dev, cudaStream_t stream) {
#ifdef FLASHMLA_WITH_SM90
  if (dev.cc_major != 9 || dev.cc_minor != 0) return false;
  return is_bf16 ? launch_sm90_decode_bf16(p, stream) : launch_sm90_decode_fp16(p, stream);
#else
  return false;
#endif
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

std::tuple<at::Tensor, at::Tensor> fwd_kvcache_mla_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                        const std::optional<at::Tensor>& v_cache, int64_t head_dim_v,
                                                        const at::Tensor& cache_seqlens, const at::Tensor& block_table,
                                                        double softmax_scale, bool causal,
                                                        const at::Tensor& tile_scheduler_metadata,
                                                        const at::Tensor& num_splits) {
  const MlaShapes s = check_fwd_args(q, k_cache, v_cache, head_dim_v, cache_seqlens, block_table, softmax_scale,
                                     tile_scheduler_metadata, num_splits);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "flash_mla_with_kvcache: on CUDA q must be bfloat16 or float16, got ", q.scalar_type(),
              " (float32 runs on CPU only)");
  const c10::cuda::CUDAGuard guard(q.device());
  auto [out, lse] = empty_fwd_outputs(q, s);
  auto lens = cache_seqlens.contiguous();
  auto table = block_table.stride(1) == 1 ? block_table : block_table.contiguous();
  auto md = tile_scheduler_metadata.contiguous();
  auto splits = num_splits.contiguous();
  // Partial results: at most batch + num_sm_parts - 1 pieces (csrc/schedule.h invariant).
  const int64_t partial_rows = s.batch + s.num_sm_parts;
  auto partial_out =
      at::empty({partial_rows, s.num_heads_k, s.rows_per_head_k, s.head_dim_v}, q.options().dtype(at::kFloat));
  auto partial_lse = at::empty({partial_rows, s.num_heads_k, s.rows_per_head_k}, q.options().dtype(at::kFloat));

  DecodeParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.block_table = table.data_ptr<int>();
  p.seqlens = lens.data_ptr<int>();
  p.metadata = md.data_ptr<int>();
  p.num_splits = splits.data_ptr<int>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.partial_out = partial_out.data_ptr<float>();
  p.partial_lse = partial_lse.data_ptr<float>();
  p.batch = s.batch;
  p.seqlen_q = s.seqlen_q;
  p.num_heads_q = s.num_heads_q;
  p.num_heads_k = s.num_heads_k;
  p.head_dim = s.head_dim;
  p.head_dim_v = s.head_dim_v;
  p.head_dim_padded = (s.head_dim + 31) / 32 * 32;
  p.page_block_size = s.page_block_size;
  p.max_blocks_per_seq = s.max_blocks_per_seq;
  p.num_blocks = s.num_blocks;
  p.num_heads_per_head_k = s.num_heads_per_head_k;
  p.rows_per_head_k = s.rows_per_head_k;
  p.num_sm_parts = s.num_sm_parts;
  p.partial_rows = partial_rows;
  p.q_stride_b = q.stride(0);
  p.q_stride_s = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.k_stride_block = k_cache.stride(0);
  p.k_stride_token = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.block_table_stride = table.stride(0);
  p.scale_log2 = float(softmax_scale * M_LOG2E);
  p.rescale_threshold = rescale_threshold();
  p.causal = causal;
  p.vec16 = s.head_dim % 8 == 0 && aligned16(p.q) && aligned16(p.k_cache) && q.stride(0) % 8 == 0 &&
            q.stride(1) % 8 == 0 && q.stride(2) % 8 == 0 && k_cache.stride(0) % 8 == 0 && k_cache.stride(1) % 8 == 0 &&
            k_cache.stride(2) % 8 == 0;
  p.kv_evict_first = kv_evict_first(s.rows_per_head_k, kEvictFirstMaxRowsSm90);
  p.partials_in_l2 = partials_in_l2() && s.head_dim_v % 32 == 0;
  p.sm90_seesaw = sm90_seesaw(s.rows_per_head_k, s.page_block_size);
  TORCH_CHECK(k_cache.numel() < (int64_t(1) << 62) && s.num_blocks < (int64_t(1) << 31),
              "flash_mla_with_kvcache: k_cache is too large");

  const bool is_bf16 = q.scalar_type() == at::kBFloat16;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const DeviceFacts& dev = device_facts(q.get_device());
  const KernelChoice choice = kernel_choice();
  bool launched = false;
  const bool try_sm90 = choice == KernelChoice::kSm90 ||
                        (choice == KernelChoice::kAuto && !auto_prefers_portable(s.rows_per_head_k, s.page_block_size));
  if (try_sm90) launched = try_launch_sm90(p, is_bf16, dev, stream);
  TORCH_CHECK(launched || choice != KernelChoice::kSm90,
              "flash_mla_with_kvcache: FLASHMLA_KERNEL=sm90 but the Hopper kernel does not apply here (needs an "
              "sm_90a build, an sm_90 GPU, head_dim 576 or 512, head_dim_v 512, 16-byte aligned rows)");
  if (!launched) {
    // The portable kernel stores its partial results plainly (the evict-last stores measured 1-4% slower
    // there, through its schedule): no discards either, so this path is the one measured without them.
    p.partials_in_l2 = false;
    p.kv_evict_first = kv_evict_first(s.rows_per_head_k, kEvictFirstMaxRowsPortable);
    if (is_bf16)
      launch_portable_decode_bf16(p, dev.smem_optin, stream);
    else
      launch_portable_decode_fp16(p, dev.smem_optin, stream);
  }
  launch_combine(p, is_bf16, /*programmatic=*/dev.cc_major >= 9, stream);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flashmla, CUDA, m) {
  m.impl("get_mla_metadata", &get_mla_metadata_cuda);
  m.impl("fwd_kvcache_mla", &fwd_kvcache_mla_cuda);
}

}  // namespace flashmla
