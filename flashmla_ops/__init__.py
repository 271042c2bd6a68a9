"""flashmla_ops: MLA decoding over a paged KV cache as real torch.ops.flashmla operators.

Importing this package loads the native library (registering ``torch.ops.flashmla.*`` with their
CPU and, when built, CUDA kernels) and the fake implementations used by torch.compile/export.
"""

import torch

from . import _C  # noqa: F401  (loads the library: registers the operators and kernels)
from . import aoti  # noqa: F401  (aoti.compile_and_package: AOTInductor packages that load)
from . import fake  # noqa: F401  (registers the fakes)
from .interface import flash_mla_with_kvcache, get_mla_metadata, write_kvcache

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "write_kvcache", "build_info"]


def build_info() -> dict:
    """What this build of the library contains and what this process can run.

    Keys: ``cpu`` (always True), ``cuda`` (CUDA kernels compiled in), ``sm90`` (the Hopper kernel
    compiled in), ``cuda_archs`` (GPU targets compiled), ``torch`` (the running torch),
    ``built_with_torch``, ``cuda_available`` (a GPU is visible now).
    """
    try:
        from . import _build_info

        built_with, archs = _build_info.BUILT_WITH_TORCH, list(_build_info.CUDA_ARCHS)
    except ImportError:  # built by other means than setup.py
        built_with, archs = None, []
    return {
        "cpu": True,
        "cuda": bool(_C.built_cuda),
        "sm90": bool(_C.built_sm90),
        "cuda_archs": archs,
        "torch": torch.__version__,
        "built_with_torch": built_with,
        "cuda_available": torch.cuda.is_available(),
    }
