// Programmatic dependent launch (sm_90+) between a decode kernel and the combine kernel.
// Every decode block calls pdl_allow_dependents() when it starts, so the combine grid is launched
// while the decode's last blocks still run; a combine block that has partial results to merge calls
// pdl_wait_primary() first, which returns once the whole decode grid has finished and its writes
// are visible. Both are no-ops before sm_90 (and when the launch did not ask for it).
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
