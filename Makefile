# Quick start: `make demo` (install, build, run a DeepSeek-shaped decode on the best device present)
# and `make test` (install, build, run the tests). Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := PYTHONPATH=$(CURDIR) $(VENV)/bin/python
# torch 2.14.1 is a CUDA build: the CUDA kernels compile (nvcc permitting) even without a GPU.
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2

.PHONY: install build test demo bench-cpu format clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" ninja pytest expecttest numpy setuptools wheel
	touch $@

install: $(VENV)/.installed

build: install
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py --quiet build_ext --inplace
	$(PY) -c "import flashmla_ops, json; print(json.dumps(flashmla_ops.build_info()))"

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) examples/demo.py

bench-cpu: build
	$(PY) benchmarks/bench_cpu.py

# ruff and clang-format (.clang-format) over the sources; installs both into .venv.
format: install
	$(PY) -m pip install --quiet ruff clang-format
	$(VENV)/bin/ruff format flashmla_ops tests benchmarks examples scripts
	$(VENV)/bin/clang-format -i csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h

clean:
	rm -rf build *.egg-info flashmla_ops/*.so flashmla_ops/_build_info.py
