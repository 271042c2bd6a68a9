// The 16-bit element types of the CUDA kernels and their conversions (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__, so conversions are spelled out).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace flashmla {

template <typename T>
struct Dtype;
template <>
struct Dtype<__nv_bfloat16> {
  using pair = __nv_bfloat162;
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ pair make_pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <>
struct Dtype<__half> {
  using pair = __half2;
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ pair make_pair(float a, float b) { return __floats2half2_rn(a, b); }
};

}  // namespace flashmla
