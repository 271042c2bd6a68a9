// CUDA kernel of write_kvcache: token i is copied whole (kv_c[i] then k_pe[i]) into the cache row at
// flat slot slot_mapping[i] = block * page_block_size + offset; slot -1 skips the token.
//
// One warp per token. The copy moves bits, so the kernel depends only on the element size (2 bytes
// for bfloat16/float16, 4 for float32). Where every pointer, row stride and part length is a
// multiple of 16 bytes (DeepSeek: 512 + 64 channels), lanes copy 16-byte vectors; otherwise the
// widest width that divides them all (8, 4) or single elements with any channel stride.
//
// Slot values are not checked on the host (that would need a device-to-host sync, and the write must
// stay capturable in a CUDA graph): a slot outside [0, num_blocks * page_block_size) -- -1 or any
// other -- is skipped on the device, so nothing is ever written out of bounds.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../write_kvcache_shapes.h"

namespace flashmla {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;  // tokens per CUDA block

template <typename Elem, typename Index>
struct WriteKvcacheParams {
  const Elem* kv_c;
  const Elem* k_pe;
  Elem* cache;
  const Index* slots;
  WriteKvcacheShapes s;  // sizes and strides in elements
};

// Lane `lane` copies its share of `count` elements of one token from src (element stride `stride`) to
// contiguous dst. With Vec wider than Elem the caller guarantees stride 1 and Vec alignment of src,
// dst and count.
template <typename Elem, typename Vec>
__device__ __forceinline__ void copy_part(Elem* dst, const Elem* src, int64_t count, int64_t stride, int lane) {
  if constexpr (sizeof(Vec) == sizeof(Elem)) {
    for (int64_t c = lane; c < count; c += kWarpSize) dst[c] = src[c * stride];
  } else {
    constexpr int64_t kElemsPerVec = sizeof(Vec) / sizeof(Elem);
    const Vec* src_vec = reinterpret_cast<const Vec*>(src);
    Vec* dst_vec = reinterpret_cast<Vec*>(dst);
    const int64_t num_vecs = count / kElemsPerVec;
    for (int64_t u = lane; u < num_vecs; u += kWarpSize) dst_vec[u] = src_vec[u];
  }
}

template <typename Elem, typename Index, typename Vec>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock)
    write_kvcache_kernel(const WriteKvcacheParams<Elem, Index> p) {
  const WriteKvcacheShapes& s = p.s;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (token >= s.num_tokens) return;
  const int64_t slot = p.slots[token * s.slot_stride];
  if (slot < 0 || slot >= s.num_slots) return;  // -1 (padding) or out of range: skipped, see top
  // The host guarantees num_slots <= 2^32 - 1 (see run), so 32-bit division suffices.
  const uint32_t page_block_size = static_cast<uint32_t>(s.page_block_size);
  const uint32_t block = static_cast<uint32_t>(slot) / page_block_size;
  const uint32_t offset = static_cast<uint32_t>(slot) - block * page_block_size;
  Elem* dst = p.cache + block * s.cache_stride_block + offset * s.cache_stride_token;
  copy_part<Elem, Vec>(dst, p.kv_c + token * s.kv_c_stride_token, s.d_c, s.kv_c_stride_channel, lane);
  copy_part<Elem, Vec>(dst + s.d_c, p.k_pe + token * s.k_pe_stride_token, s.d_pe, s.k_pe_stride_channel, lane);
}

bool multiple_of(int64_t bytes, int64_t width) { return bytes % width == 0; }

// The widest copy width (16, 8 or 4 bytes, or the element size) that divides every address a lane
// touches: the base pointers, the token/block strides and the lengths of both parts (the k_pe part
// starts d_c elements into the cache row).
int64_t copy_width_bytes(const WriteKvcacheShapes& s, int64_t elem, const void* kv_c, const void* k_pe,
                         const void* cache) {
  if (s.kv_c_stride_channel != 1 || s.k_pe_stride_channel != 1) return elem;
  for (const int64_t width : {16, 8, 4}) {
    if (width <= elem) break;
    const bool aligned = multiple_of(reinterpret_cast<uintptr_t>(kv_c), width) &&
                         multiple_of(reinterpret_cast<uintptr_t>(k_pe), width) &&
                         multiple_of(reinterpret_cast<uintptr_t>(cache), width) && multiple_of(s.d_c * elem, width) &&
                         multiple_of(s.d_pe * elem, width) && multiple_of(s.kv_c_stride_token * elem, width) &&
                         multiple_of(s.k_pe_stride_token * elem, width) &&
                         multiple_of(s.cache_stride_block * elem, width) &&
                         multiple_of(s.cache_stride_token * elem, width);
    if (aligned) return width;
  }
  return elem;
}

template <typename Elem, typename Index, typename Vec>
void launch(const WriteKvcacheParams<Elem, Index>& p, cudaStream_t stream) {
  const int64_t blocks = (p.s.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  write_kvcache_kernel<Elem, Index, Vec><<<blocks, kWarpSize * kWarpsPerBlock, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Elem, typename Index>
void run(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& k_cache, const at::Tensor& slot_mapping,
         const WriteKvcacheShapes& s) {
  TORCH_CHECK(s.num_slots <= int64_t(UINT32_MAX), "write_kvcache: k_cache has ", s.num_slots,
              " slots (num_blocks * page_block_size); the CUDA kernel supports at most 2^32 - 1");
  WriteKvcacheParams<Elem, Index> p{};
  p.kv_c = static_cast<const Elem*>(kv_c.const_data_ptr());
  p.k_pe = static_cast<const Elem*>(k_pe.const_data_ptr());
  p.cache = static_cast<Elem*>(k_cache.mutable_data_ptr());
  p.slots = slot_mapping.const_data_ptr<Index>();
  p.s = s;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (copy_width_bytes(s, sizeof(Elem), p.kv_c, p.k_pe, p.cache)) {
    case 16:
      return launch<Elem, Index, uint4>(p, stream);
    case 8:
      return launch<Elem, Index, uint2>(p, stream);
    case 4:
      return launch<Elem, Index, uint32_t>(p, stream);
    default:
      return launch<Elem, Index, Elem>(p, stream);
  }
}

template <typename Index>
void run_for_index(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& k_cache,
                   const at::Tensor& slot_mapping, const WriteKvcacheShapes& s) {
  if (k_cache.element_size() == 2) {
    run<uint16_t, Index>(kv_c, k_pe, k_cache, slot_mapping, s);  // bfloat16, float16
  } else {
    run<uint32_t, Index>(kv_c, k_pe, k_cache, slot_mapping, s);  // float32
  }
}

void write_kvcache_cuda(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& k_cache,
                        const at::Tensor& slot_mapping) {
  const WriteKvcacheShapes s = check_write_kvcache_args(kv_c, k_pe, k_cache, slot_mapping);
  if (s.num_tokens == 0) return;
  const c10::cuda::CUDAGuard device_guard(k_cache.device());
  if (slot_mapping.scalar_type() == at::kLong) {
    run_for_index<int64_t>(kv_c, k_pe, k_cache, slot_mapping, s);
  } else {
    run_for_index<int32_t>(kv_c, k_pe, k_cache, slot_mapping, s);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(flashmla, CUDA, m) { m.impl("write_kvcache", &write_kvcache_cuda); }

}  // namespace flashmla
