// The operator schemas (the one place they are declared) and the Python module that loads them.
// Kernels register per dispatch key: csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(flashmla, m) {
  // Work schedule for fwd_kvcache_mla; see csrc/schedule.h for the layout.
  m.def("get_mla_metadata(Tensor cache_seqlens, int num_heads_per_head_k, int num_heads_k) -> (Tensor, Tensor)");
  // MLA decode attention over a paged KV cache. Returns (out, softmax_lse).
  m.def(
      "fwd_kvcache_mla(Tensor q, Tensor k_cache, Tensor? v_cache, int head_dim_v, Tensor cache_seqlens, "
      "Tensor block_table, float softmax_scale, bool causal, Tensor tile_scheduler_metadata, "
      "Tensor num_splits) -> (Tensor, Tensor)");
  // Writes new tokens' latent vectors (kv_c then k_pe) into the paged cache, in place.
  m.def("write_kvcache(Tensor kv_c, Tensor k_pe, Tensor(a!) k_cache, Tensor slot_mapping) -> ()");
}

// `import flashmla_ops._C` loads this library, which runs the registrations above. The module
// itself carries only build facts.
#ifdef FLASHMLA_WITH_CUDA
static constexpr int kBuiltCuda = 1;
#else
static constexpr int kBuiltCuda = 0;
#endif
#ifdef FLASHMLA_WITH_SM90
static constexpr int kBuiltSm90 = 1;
#else
static constexpr int kBuiltSm90 = 0;
#endif

static struct PyModuleDef flashmla_module = {PyModuleDef_HEAD_INIT, "_C", "flashmla_ops native library", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&flashmla_module);
  if (mod == nullptr) return nullptr;
  PyModule_AddIntConstant(mod, "built_cuda", kBuiltCuda);
  PyModule_AddIntConstant(mod, "built_sm90", kBuiltSm90);
  return mod;
}
