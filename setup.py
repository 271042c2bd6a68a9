"""Builds flashmla_ops._C: the CPU kernels always; the CUDA kernels when torch has CUDA and nvcc exists.

Environment knobs:
  FLASHMLA_BUILD_CUDA=0|1|auto   (default auto)  force the CUDA part off or on
  FLASHMLA_CUDA_ARCHS="80;90a"   (default)        GPU targets; sm_90a adds the Hopper kernel
  MAX_JOBS                                        parallel compile jobs (torch's ninja backend)
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """torch guesses /usr/local when nvcc is not on PATH; prefer the real toolkit."""
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def want_cuda():
    import torch

    mode = os.environ.get("FLASHMLA_BUILD_CUDA", "auto").lower()
    if mode in ("0", "off", "false"):
        return False
    have = torch.version.cuda is not None and find_cuda_home() is not None
    if mode in ("1", "on", "true") and not have:
        sys.exit("FLASHMLA_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found")
    return have


def extra_host_includes():
    """Headers the host compiler needs with pip-installed CUDA torch (see shared/GPU.md)."""
    paths = []
    for sp in sys.path:
        p = os.path.join(sp, "nvidia", "cu13", "include")
        if os.path.isdir(p):
            paths.append(p)
    cccl = os.path.join(find_cuda_home() or "/usr/local/cuda", "include", "cccl")
    if os.path.isdir(cccl):
        paths.append(cccl)
    return paths


def cuda_gencode_flags(archs):
    flags = []
    for arch in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def make_extension():
    from torch.utils import cpp_extension

    sources = [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))]
    cxx_flags = ["-O3"]  # torch picks the C++ standard it needs (C++20 from 2.14)
    define_macros = []  # torch defines Py_LIMITED_API itself for py_limited_api builds
    if not want_cuda():
        print("flashmla_ops: building CPU kernels only", flush=True)
        return cpp_extension.CppExtension(
            "flashmla_ops._C", sources, extra_compile_args={"cxx": cxx_flags}, define_macros=define_macros,
            py_limited_api=True,
        ), {"cuda": False, "sm90": False, "archs": []}

    os.environ["CUDA_HOME"] = find_cuda_home()
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    archs = [a for a in os.environ.get("FLASHMLA_CUDA_ARCHS", "80;90a").split(";") if a]
    with_sm90 = "90a" in archs
    cuda_sources = sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    if not with_sm90:
        cuda_sources = [p for p in cuda_sources if "sm90" not in os.path.basename(p)]
    sources += [os.path.relpath(p, HERE) for p in cuda_sources]
    define_macros.append(("FLASHMLA_WITH_CUDA", None))
    if with_sm90:
        define_macros.append(("FLASHMLA_WITH_SM90", None))
    includes = extra_host_includes()
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                  "-Xptxas=-warn-spills"]
    nvcc_flags += cuda_gencode_flags(archs)
    nvcc_flags += [f"-I{p}" for p in includes]
    print(f"flashmla_ops: building CPU + CUDA kernels for {archs}", flush=True)
    return cpp_extension.CUDAExtension(
        "flashmla_ops._C", sources, include_dirs=includes,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, define_macros=define_macros,
        py_limited_api=True,
    ), {"cuda": True, "sm90": with_sm90, "archs": archs}


def write_build_info(info):
    import torch

    with open(os.path.join(HERE, "flashmla_ops", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"BUILT_WITH_TORCH = {torch.__version__!r}\n")
        f.write(f"CUDA_ARCHS = {info['archs']!r}\n")


def main():
    from torch.utils.cpp_extension import BuildExtension

    ext, info = make_extension()
    write_build_info(info)
    setup(
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )


main()
