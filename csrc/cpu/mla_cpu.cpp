// CPU kernels: metadata, split-KV decode and the LSE combine.
//
// Each worker of the schedule (csrc/schedule.h) runs as one at::parallel_for task per KV head. For
// every sequence piece it owns it gathers up to kTileTokens tokens at a time from their pages
// (converted to fp32 in a per-task scratch tile; the cache is never copied whole), then
//   S = scale * Q K^T                        (rows x tile), masked by length and causality,
//   m' = max(m, rowmax S), P = exp(S - m'),  O = O * exp(m - m') + P V,  l = l * exp(m - m') + rowsum P
// (the online softmax). A piece that is a whole sequence writes out = O / l, lse = m + log l;
// other pieces write the same into fp32 partial buffers that combine_splits merges by LSE.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

#include "../mla_shapes.h"
#include "../schedule.h"

namespace flashmla {
namespace {

constexpr int64_t kTileTokens =
    256;  // tokens per fp32 tile: large enough that the two GEMMs dominate their call overhead
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t cpu_num_sm_parts() { return std::max<int64_t>(1, at::get_num_threads()); }

std::tuple<at::Tensor, at::Tensor> get_mla_metadata_cpu(const at::Tensor& cache_seqlens, int64_t num_heads_per_head_k,
                                                        int64_t num_heads_k) {
  check_metadata_args(cache_seqlens, num_heads_per_head_k, num_heads_k);
  const int64_t batch = cache_seqlens.size(0);
  const int64_t parts = cpu_num_sm_parts();
  auto lens = cache_seqlens.contiguous();
  const int* len = lens.data_ptr<int>();
  for (int64_t i = 0; i < batch; ++i)
    TORCH_CHECK(len[i] >= 0, "get_mla_metadata: cache_seqlens[", i, "] = ", len[i], " is negative");
  auto metadata = at::empty({parts, kMetadataWidth}, cache_seqlens.options());
  auto num_splits = at::empty({batch + 1}, cache_seqlens.options());
  build_schedule(len, static_cast<int>(batch), static_cast<int>(parts), num_heads_per_head_k, metadata.data_ptr<int>(),
                 num_splits.data_ptr<int>());
  return {metadata, num_splits};
}

// Widens one row to fp32. bf16 is the top half of an fp32: a shift, written so the compiler
// vectorises it (the gather of KV rows is a third of the CPU kernel's time at h_q = 16).
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    uint32_t* out = reinterpret_cast<uint32_t*>(dst);
    for (int64_t c = 0; c < n; ++c) out[c] = uint32_t(bits[c]) << 16;
  } else if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<float>(src[c]);
  }
}

// Strides and pointers of one call, in elements.
template <typename T>
struct CpuParams {
  const T* q;
  const T* k;
  const int* block_table;
  const int* seqlens;
  const int* metadata;
  const int* num_splits;
  T* out;
  float* lse;
  float* partial_out;  // (total_splits, h_k, rows, dv): each piece normalised by its own sum
  float* partial_lse;  // (total_splits, h_k, rows)
  MlaShapes s;
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_block, k_stride_token, k_stride_head;
  float scale;
  bool causal;
};

// Attends query rows of (sequence b, kv head hk) over tokens [t_begin, t_end) and writes the result
// to the output (whole sequence) or to partial row `split_row`.
template <typename T>
void attend_piece(const CpuParams<T>& p, int64_t b, int64_t hk, int64_t t_begin, int64_t t_end, bool whole,
                  int64_t split_row, std::vector<float>& scratch) {
  const MlaShapes& s = p.s;
  const int64_t rows = s.rows_per_head_k, d = s.head_dim, dv = s.head_dim_v, g = s.num_heads_per_head_k;
  const int64_t seqlen = p.seqlens[b];
  scratch.resize(rows * d + kTileTokens * d + rows * kTileTokens + rows * dv + 2 * rows);
  float* qf = scratch.data();            // rows x d
  float* kf = qf + rows * d;             // tile x d
  float* sc = kf + kTileTokens * d;      // rows x tile
  float* acc = sc + rows * kTileTokens;  // rows x dv
  float* row_max = acc + rows * dv;
  float* row_sum = row_max + rows;
  // Row r is query position r / g, head hk * g + r % g (FlashMLA's packing of the q heads).
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = p.q + b * p.q_stride_b + (r / g) * p.q_stride_s + (hk * g + r % g) * p.q_stride_h;
    for (int64_t c = 0; c < d; ++c) qf[r * d + c] = static_cast<float>(src[c]);
    row_max[r] = -kInf;
    row_sum[r] = 0.f;
  }
  std::fill(acc, acc + rows * dv, 0.f);
  auto qt = at::from_blob(qf, {rows, d}, at::kFloat);
  auto st = at::from_blob(sc, {rows, kTileTokens}, at::kFloat);
  auto acct = at::from_blob(acc, {rows, dv}, at::kFloat);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTileTokens) {
    const int64_t n = std::min(kTileTokens, t_end - t0);
    // Gather tokens [t0, t0 + n) page by page; a page's rows are one run when they are contiguous.
    for (int64_t j = 0; j < n;) {
      const int64_t t = t0 + j;
      const int64_t block = p.block_table[b * s.max_blocks_per_seq + t / s.page_block_size];
      const int64_t run = std::min(n - j, s.page_block_size - t % s.page_block_size);
      const T* src = p.k + block * p.k_stride_block + (t % s.page_block_size) * p.k_stride_token + hk * p.k_stride_head;
      if (p.k_stride_token == d) {
        to_float(src, kf + j * d, run * d);
      } else {
        for (int64_t r = 0; r < run; ++r) to_float(src + r * p.k_stride_token, kf + (j + r) * d, d);
      }
      j += run;
    }
    auto kt = at::from_blob(kf, {n, d}, at::kFloat);
    auto st_n = st.narrow(1, 0, n);
    at::mm_out(st_n, qt, kt.t());  // writes sc with row stride kTileTokens
    for (int64_t r = 0; r < rows; ++r) {
      // Causal: query i of seqlen_q sees tokens t <= seqlen - seqlen_q + i (bottom-right aligned).
      const int64_t last_visible = p.causal ? seqlen - s.seqlen_q + r / g : seqlen - 1;
      float* srow = sc + r * kTileTokens;
      float tile_max = -kInf;
      for (int64_t j = 0; j < n; ++j) {
        srow[j] = (t0 + j <= last_visible) ? srow[j] * p.scale : -kInf;
        tile_max = std::max(tile_max, srow[j]);
      }
      const float new_max = std::max(row_max[r], tile_max);
      if (new_max == -kInf) {  // nothing visible yet: P = 0, state unchanged
        std::fill(srow, srow + n, 0.f);
        continue;
      }
      const float rescale = std::exp(row_max[r] - new_max);
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        srow[j] = std::exp(srow[j] - new_max);
        sum += srow[j];
      }
      row_sum[r] = row_sum[r] * rescale + sum;
      row_max[r] = new_max;
      float* arow = acc + r * dv;
      for (int64_t c = 0; c < dv; ++c) arow[c] *= rescale;
    }
    // O += P V, V = the first dv channels of the tile.
    acct.addmm_(st_n, kt.narrow(1, 0, dv));
  }
  for (int64_t r = 0; r < rows; ++r) {
    const bool empty = row_sum[r] == 0.f;
    const float inv = empty ? 0.f : 1.f / row_sum[r];
    const float lse = empty ? (whole ? kInf : -kInf) : row_max[r] + std::log(row_sum[r]);
    const float* arow = acc + r * dv;
    const int64_t i = r / g, h = hk * g + r % g;
    if (whole) {
      T* dst = p.out + ((b * s.seqlen_q + i) * s.num_heads_q + h) * dv;
      for (int64_t c = 0; c < dv; ++c) dst[c] = static_cast<T>(arow[c] * inv);
      p.lse[(b * s.num_heads_q + h) * s.seqlen_q + i] = lse;
    } else {
      const int64_t prow = (split_row * s.num_heads_k + hk) * rows + r;
      float* dst = p.partial_out + prow * dv;
      for (int64_t c = 0; c < dv; ++c) dst[c] = arow[c] * inv;
      p.partial_lse[prow] = lse;
    }
  }
}

// Merges the pieces of every sequence cut into more than one: lse = log sum_k exp(lse_k),
// out = sum_k exp(lse_k - lse) * out_k. Rows where every piece is empty get out 0, lse +inf.
template <typename T>
void combine_splits(const CpuParams<T>& p) {
  const MlaShapes& s = p.s;
  const int64_t rows = s.rows_per_head_k, dv = s.head_dim_v, g = s.num_heads_per_head_k;
  at::parallel_for(0, s.batch * s.num_heads_k, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights, acc(dv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.num_heads_k, hk = task % s.num_heads_k;
      const int64_t first = p.num_splits[b], count = p.num_splits[b + 1] - first;
      if (count <= 1) continue;
      weights.resize(count);
      for (int64_t r = 0; r < rows; ++r) {
        float max_lse = -kInf;
        for (int64_t k = 0; k < count; ++k) {
          max_lse = std::max(max_lse, p.partial_lse[((first + k) * s.num_heads_k + hk) * rows + r]);
        }
        const int64_t i = r / g, h = hk * g + r % g;
        T* dst = p.out + ((b * s.seqlen_q + i) * s.num_heads_q + h) * dv;
        float* lse_dst = p.lse + (b * s.num_heads_q + h) * s.seqlen_q + i;
        if (max_lse == -kInf) {
          for (int64_t c = 0; c < dv; ++c) dst[c] = static_cast<T>(0.f);
          *lse_dst = kInf;
          continue;
        }
        float sum = 0.f;
        for (int64_t k = 0; k < count; ++k) {
          weights[k] = std::exp(p.partial_lse[((first + k) * s.num_heads_k + hk) * rows + r] - max_lse);
          sum += weights[k];
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t k = 0; k < count; ++k) {
          const float w = weights[k] / sum;
          const float* src = p.partial_out + (((first + k) * s.num_heads_k + hk) * rows + r) * dv;
          for (int64_t c = 0; c < dv; ++c) acc[c] += w * src[c];
        }
        for (int64_t c = 0; c < dv; ++c) dst[c] = static_cast<T>(acc[c]);
        *lse_dst = max_lse + std::log(sum);
      }
    }
  });
}

// The CPU can afford to rebuild the schedule and compare: metadata built for other lengths (or
// another batch) is refused here. (CUDA cannot check without a host sync; see interface.py.)
void check_metadata_matches(const MlaShapes& s, const at::Tensor& lens, const at::Tensor& md,
                            const at::Tensor& splits) {
  auto want_md = at::empty_like(md);
  auto want_splits = at::empty_like(splits);
  build_schedule(lens.data_ptr<int>(), static_cast<int>(s.batch), static_cast<int>(s.num_sm_parts), s.rows_per_head_k,
                 want_md.data_ptr<int>(), want_splits.data_ptr<int>());
  TORCH_CHECK(at::equal(want_md, md) && at::equal(want_splits, splits),
              "flash_mla_with_kvcache: tile_scheduler_metadata / num_splits do not match cache_seqlens; "
              "call get_mla_metadata again after the lengths change");
}

template <typename T>
void run_decode(CpuParams<T>& p) {
  const MlaShapes& s = p.s;
  at::parallel_for(0, s.num_sm_parts * s.num_heads_k, 1, [&](int64_t begin, int64_t end) {
    // Reused across calls: a fresh buffer of this size would be mmap-ed and page-faulted every call.
    thread_local std::vector<float> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t part = task / s.num_heads_k, hk = task % s.num_heads_k;
      const int* md = p.metadata + part * kMetadataWidth;
      const int64_t first_b = std::max(md[0], 0), last_b = std::min<int64_t>(md[2], s.batch - 1);
      for (int64_t b = first_b; b <= last_b; ++b) {
        const int64_t seqlen = p.seqlens[b];
        const int64_t t_begin = std::min<int64_t>(b == md[0] ? md[1] : 0, seqlen);
        const int64_t t_end = std::min<int64_t>(b == md[2] ? md[3] : seqlen, seqlen);
        const int64_t split = b == md[0] ? md[4] : 0;
        const bool whole = p.num_splits[b + 1] - p.num_splits[b] == 1;
        attend_piece(p, b, hk, t_begin, t_end, whole, p.num_splits[b] + split, scratch);
      }
    }
  });
  combine_splits(p);
}

std::tuple<at::Tensor, at::Tensor> fwd_kvcache_mla_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                       const std::optional<at::Tensor>& v_cache, int64_t head_dim_v,
                                                       const at::Tensor& cache_seqlens, const at::Tensor& block_table,
                                                       double softmax_scale, bool causal,
                                                       const at::Tensor& tile_scheduler_metadata,
                                                       const at::Tensor& num_splits) {
  const MlaShapes s = check_fwd_args(q, k_cache, v_cache, head_dim_v, cache_seqlens, block_table, softmax_scale,
                                     tile_scheduler_metadata, num_splits);
  check_fwd_values_on_host(s, cache_seqlens, block_table);
  auto [out, lse] = empty_fwd_outputs(q, s);
  auto lens = cache_seqlens.contiguous();
  auto table = block_table.contiguous();
  auto md = tile_scheduler_metadata.contiguous();
  auto splits = num_splits.contiguous();
  check_metadata_matches(s, lens, md, splits);
  const int* sp = splits.data_ptr<int>();
  const int64_t total_splits = sp[s.batch];
  auto partial_out =
      at::empty({total_splits, s.num_heads_k, s.rows_per_head_k, s.head_dim_v}, q.options().dtype(at::kFloat));
  auto partial_lse = at::empty({total_splits, s.num_heads_k, s.rows_per_head_k}, q.options().dtype(at::kFloat));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fwd_kvcache_mla_cpu", [&] {
    CpuParams<scalar_t> p{};
    p.q = q.data_ptr<scalar_t>();
    p.k = k_cache.data_ptr<scalar_t>();
    p.block_table = table.data_ptr<int>();
    p.seqlens = lens.data_ptr<int>();
    p.metadata = md.data_ptr<int>();
    p.num_splits = sp;
    p.out = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<float>();
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
    p.s = s;
    p.q_stride_b = q.stride(0);
    p.q_stride_s = q.stride(1);
    p.q_stride_h = q.stride(2);
    p.k_stride_block = k_cache.stride(0);
    p.k_stride_token = k_cache.stride(1);
    p.k_stride_head = k_cache.stride(2);
    p.scale = static_cast<float>(softmax_scale);
    p.causal = causal;
    run_decode(p);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flashmla, CPU, m) {
  m.impl("get_mla_metadata", &get_mla_metadata_cpu);
  m.impl("fwd_kvcache_mla", &fwd_kvcache_mla_cpu);
}

}  // namespace flashmla
