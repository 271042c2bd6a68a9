// Argument checks shared by the operators' shape functions. Each message starts with the public
// function's name (`op`) and names the argument, with expected vs actual.
#pragma once
#include <ATen/ATen.h>

namespace flashmla {

inline void check_rank(const char* op, const at::Tensor& t, const char* name, int64_t rank, const char* shape) {
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must have ", rank, " dimensions ", shape, ", got shape ", t.sizes());
}

// `t` must be on the device of `ref` (named `ref_name` in the message).
inline void check_same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " (the device of ", ref_name,
              "), got ", t.device());
}

inline void check_int32(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
}

}  // namespace flashmla
