"""The decode step of examples/decode_layer.py in eager mode, under torch.compile, torch.export, and as an
AOTInductor package loaded in a fresh process: the same outputs, and the caller's cache updated in place
at each step's slots."""

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List

import pytest
import torch

import flashmla_ops
from examples.decode_layer import (
    MLADecodeLayer,
    PagedBatch,
    decode,
    make_decode_problem,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_CUDA = torch.cuda.is_available() and flashmla_ops.build_info()["cuda"]
PROMPT_LENGTHS = [5, 17, 40]  # page 16: steps cross block boundaries (47 -> 48)
STEPS = 4
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 (CPU)
# bf16 (CUDA, whose kernels take 16-bit types): a compiled graph fuses element-wise ops and rounds once
# where eager rounds after each op, so values may differ by a few bf16 ulps (2^-8 relative).
TOL_BF16 = dict(rtol=2e-2, atol=2e-2)


def tolerance(t: torch.Tensor) -> dict:
    return TOL if t.dtype == torch.float32 else TOL_BF16


@dataclass
class DecodeProblem:
    layer: MLADecodeLayer
    cache: PagedBatch  # after the prompts; never mutated (runs use copies)
    hidden_steps: List[torch.Tensor]

    def fresh_cache(self) -> PagedBatch:
        return PagedBatch(self.cache.k_cache.clone(), self.cache.block_table, self.cache.lengths)

    def step_args(self, cache: PagedBatch, i: int):
        lengths = cache.lengths + i
        return self.hidden_steps[i], cache.k_cache, cache.block_table, lengths + 1, cache.slots(lengths)


def make_problem(device: str) -> DecodeProblem:
    """float32 on CPU; bf16 on CUDA (the CUDA kernels take bf16/fp16)."""
    return DecodeProblem(*make_decode_problem(device, PROMPT_LENGTHS, STEPS))


@dataclass
class DecodeRun:
    outputs: List[torch.Tensor]
    caches: List[torch.Tensor]  # the cache after each step


def run_decode(problem: DecodeProblem, step) -> DecodeRun:
    """Runs every step with `step` on a copy of the cache; checks it is updated in place, each step writing
    exactly its new tokens' rows."""
    cache = problem.fresh_cache()
    k_cache, data_ptr = cache.k_cache, cache.k_cache.data_ptr()
    caches = []

    def checked_step(hidden, k_cache, block_table, cache_seqlens, slot_mapping):
        before = k_cache.clone()
        out = step(hidden, k_cache, block_table, cache_seqlens, slot_mapping)
        assert k_cache.data_ptr() == data_ptr
        changed = rows_changed(before, k_cache)
        assert changed == sorted(slot_mapping.tolist()), (
            f"rows written {changed}, slots {slot_mapping.tolist()}"
        )
        caches.append(k_cache.clone())
        return out

    outputs = decode(checked_step, cache, problem.hidden_steps)
    assert cache.k_cache is k_cache and cache.lengths.tolist() == [n + STEPS for n in PROMPT_LENGTHS]
    return DecodeRun(outputs, caches)


def rows_changed(before: torch.Tensor, after: torch.Tensor) -> List[int]:
    """Flat slots whose row differs (NaN == NaN: unwritten slots hold NaN)."""
    same = (before == after) | (before.isnan() & after.isnan())
    return torch.nonzero(~same.flatten(0, 2).all(-1)).flatten().tolist()


def assert_runs_close(run: DecodeRun, expected: DecodeRun) -> None:
    for i in range(STEPS):
        tol = tolerance(expected.outputs[i])
        torch.testing.assert_close(run.outputs[i], expected.outputs[i], **tol, msg=lambda m: f"step {i}: {m}")
        torch.testing.assert_close(
            run.caches[i],
            expected.caches[i],
            **tol,
            equal_nan=True,
            msg=lambda m: f"cache after step {i}: {m}",
        )


@pytest.fixture(scope="module")
def cpu_problem() -> DecodeProblem:
    return make_problem("cpu")


@pytest.fixture(scope="module")
def cpu_eager(cpu_problem) -> DecodeRun:
    return run_decode(cpu_problem, cpu_problem.layer)


@pytest.fixture(scope="module")
def cpu_exported(cpu_problem) -> torch.export.ExportedProgram:
    cache = cpu_problem.fresh_cache()
    with torch.no_grad():
        return torch.export.export(cpu_problem.layer, cpu_problem.step_args(cache, 0))


def test_absorbed_layer_matches_unabsorbed_mla(cpu_problem, cpu_eager):
    cache = cpu_problem.cache
    for i in range(STEPS):
        hidden, _, block_table, cache_seqlens, _ = cpu_problem.step_args(cache, i)
        with torch.no_grad():
            expected = cpu_problem.layer.unabsorbed_forward(
                hidden, cpu_eager.caches[i], block_table, cache_seqlens
            )
        torch.testing.assert_close(cpu_eager.outputs[i], expected, **TOL)


def test_torch_compile_matches_eager(cpu_problem, cpu_eager):
    torch._dynamo.reset()
    step = torch.compile(cpu_problem.layer, fullgraph=True, dynamic=False)
    assert_runs_close(run_decode(cpu_problem, step), cpu_eager)


def test_torch_export_matches_eager(cpu_problem, cpu_eager, cpu_exported):
    assert_runs_close(run_decode(cpu_problem, cpu_exported.module()), cpu_eager)


def build_package(exported: torch.export.ExportedProgram, directory: str) -> str:
    # Not torch._inductor.aoti_compile_and_package directly: with a compiler that links libstdc++
    # statically (the GPU machine's CXX), that package crashes in aoti_load_package. See flashmla_ops/aoti.py.
    return flashmla_ops.aoti.compile_and_package(exported, os.path.join(directory, "decode.pt2"))


def run_package_in_fresh_process(problem: DecodeProblem, package: str, directory: str) -> DecodeRun:
    """Saves the inputs, runs examples/run_decode_package.py in a new interpreter, returns its results."""
    cache = problem.fresh_cache()
    steps = []
    for i in range(STEPS):
        hidden, _, _, cache_seqlens, slot_mapping = problem.step_args(cache, i)
        steps.append(dict(hidden=hidden, cache_seqlens=cache_seqlens, slot_mapping=slot_mapping))
    inputs, results = os.path.join(directory, "inputs.pt"), os.path.join(directory, "results.pt")
    torch.save(dict(k_cache=cache.k_cache, block_table=cache.block_table, steps=steps), inputs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "examples", "run_decode_package.py"),
            package,
            inputs,
            results,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = torch.load(results)
    assert saved["same_storage"], "the package replaced k_cache instead of writing into it"
    for i in range(STEPS):
        changed = rows_changed(saved["caches"][i - 1] if i else cache.k_cache, saved["caches"][i])
        assert changed == sorted(steps[i]["slot_mapping"].tolist()), f"step {i} wrote rows {changed}"
    return DecodeRun(saved["outputs"], saved["caches"])


@pytest.fixture(scope="module")
def cpu_package(cpu_exported, tmp_path_factory) -> str:
    """The one AOTInductor build of this module (CPU)."""
    return build_package(cpu_exported, str(tmp_path_factory.mktemp("aoti_cpu")))


@pytest.mark.slow  # builds the package: 10-30 s on 2 cores; runs in CI
def test_aoti_package_in_fresh_process_cpu(cpu_problem, cpu_eager, cpu_package, tmp_path):
    assert_runs_close(run_package_in_fresh_process(cpu_problem, cpu_package, str(tmp_path)), cpu_eager)


GXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(
    GXX is None or not sys.platform.startswith("linux"), reason="needs g++ on Linux"
)


def static_libstdcxx_compiler(directory: str) -> str:
    """A g++ that links libstdc++ into shared objects statically, as the GPU machine's CXX=/opt/gcc/bin/g++
    does (whose packages died with SIGSEGV in aoti_load_package)."""
    path = os.path.join(directory, "g++-static-libstdc++")
    with open(path, "w") as f:
        f.write(
            "#!/bin/sh\n"
            f'case " $* " in *" -shared "*) exec {GXX} "$@" -static-libstdc++ ;; esac\n'
            f'exec {GXX} "$@"\n'
        )
    os.chmod(path, 0o755)
    return path


def test_cpu_package_links_libstdcxx_dynamically(cpu_package):
    libraries = flashmla_ops.aoti.package_libraries(cpu_package)
    assert libraries, "no shared library in the package"
    for name, needed in libraries.items():
        assert "libstdc++.so.6" in needed or any(n.startswith("libc++.so") for n in needed), (name, needed)
    flashmla_ops.aoti.check_package(cpu_package)


@needs_gxx
def test_compiler_probe_tells_static_libstdcxx(tmp_path):
    static_gxx = static_libstdcxx_compiler(str(tmp_path))
    probe = flashmla_ops.aoti.compiler_links_libstdcxx_statically
    assert probe(GXX) is False
    assert probe(static_gxx) is True
    assert probe(static_gxx, ("-l" + flashmla_ops.aoti.DYNAMIC_LIBSTDCXX,)) is False


@pytest.mark.slow  # a second package build
@needs_gxx
def test_aoti_package_from_static_libstdcxx_compiler_loads(cpu_problem, cpu_eager, cpu_exported, tmp_path):
    """The GPU machine's failure, here: with a compiler that links libstdc++ statically, a plain
    aoti_compile_and_package gives a package whose load crashes (SIGSEGV there, std::bad_cast here)."""
    static_gxx = static_libstdcxx_compiler(str(tmp_path))
    with torch._inductor.config.patch({"cpp.cxx": (None, static_gxx)}):
        assert flashmla_ops.aoti.inductor_cpp_compiler() == static_gxx
        package = build_package(cpu_exported, str(tmp_path))
    flashmla_ops.aoti.check_package(package)
    assert_runs_close(run_package_in_fresh_process(cpu_problem, package, str(tmp_path)), cpu_eager)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and the CUDA kernels built")
def test_aoti_package_in_fresh_process_cuda(tmp_path):
    problem = make_problem("cuda")
    eager = run_decode(problem, problem.layer)
    with torch.no_grad():
        exported = torch.export.export(problem.layer, problem.step_args(problem.fresh_cache(), 0))
    package = build_package(exported, str(tmp_path))
    assert_runs_close(run_package_in_fresh_process(problem, package, str(tmp_path)), eager)
