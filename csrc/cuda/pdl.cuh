// Programmatic dependent launch (sm_90+) between a decode kernel and the combine kernel.
// Every decode block calls pdl_allow_dependents() when it starts, so the combine grid is launched
// while the decode's last blocks still run; every combine block calls pdl_wait_primary() first,
// which returns once the whole decode grid has finished and its writes are visible. Both are no-ops
// when the launch did not ask for it. The host asks for it on compute capability >= 9
// (mla_cuda.cu), which is safe because setup.py builds SASS only (sm_80, sm_90a): a device >= 9 never
// runs sm_80 code, where these compile to nothing. Adding PTX for JIT would need a check of the
// kernel's binary version instead.
#pragma once

namespace flashmla {

__device__ __forceinline__ void pdl_allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

}  // namespace flashmla
