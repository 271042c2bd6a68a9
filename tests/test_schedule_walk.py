"""The schedule's walk (csrc/schedule.h schedule_walk_advance / schedule_row, what the CUDA metadata kernel
runs) against the sequential build_schedule (what the CPU runs), without a GPU: tests/cpp/schedule_walk_check.cpp
built with the host compiler and run on random inputs (batch 0-30000, 1-1024 workers, both fixed costs, empty,
tiny, equal and near-INT_MAX lengths; 64-bit positions, and 32-bit ones where the kernel uses them). The kernel's
own boundary search (a ballot over a register window) is checked on the GPU by tests/test_cuda.py."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def walk_check(tmp_path_factory):
    exe = tmp_path_factory.mktemp("walk") / "schedule_walk_check"
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    source = ROOT / "tests" / "cpp" / "schedule_walk_check.cpp"
    subprocess.run([*cxx, "-O2", "-std=c++17", "-I", str(ROOT / "csrc"), str(source), "-o", str(exe)], check=True)
    return exe


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_walk_equals_build_schedule(walk_check, seed):
    cases = 20000
    proc = subprocess.run([str(walk_check), str(cases), str(seed)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ok {cases}", proc.stdout + proc.stderr
