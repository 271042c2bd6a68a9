#!/usr/bin/env bash
# One call on the GPU machine: install carried wheels, build, run the CUDA tests, sanitizers and the
# benchmark; logs and results under $OUT, a short table printed last.
#   scripts/gpu_run.sh [stage ...]   stages: build smoke tests sanitize bench (default: all)
# Carry .whl (wheels the GPU image lacks: expecttest) with the call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
STAGES=${*:-build smoke tests sanitize bench}
PY=${PY:-python3}
export PYTHONPATH=$PWD:$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}
summary=()

has() { [[ " $STAGES " == *" $1 "* ]]; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install --quiet --no-deps --no-index --target .whl/site .whl/*.whl > "$OUT/pip.log" 2>&1 || true
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1

if has build; then
  start=$(date +%s)
  FLASHMLA_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  summary+=("build rc=$rc $(( $(date +%s) - start ))s")
  if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; printf '%s\n' "${summary[@]}"; exit 1; fi
fi
if has smoke; then
  $PY scripts/cuda_smoke.py > "$OUT/smoke.log" 2>&1
  summary+=("smoke rc=$?")
  tail -30 "$OUT/smoke.log"
fi
if has tests; then
  $PY -m pytest -q -x -p no:cacheprovider tests ${PYTEST_ARGS:-} > "$OUT/pytest.log" 2>&1
  summary+=("pytest rc=$? : $(tail -1 "$OUT/pytest.log")")
  grep -E "FAILED|Error" "$OUT/pytest.log" | head -20
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 $PY scripts/cuda_smoke.py --small > "$OUT/sanitize_$tool.log" 2>&1
    summary+=("compute-sanitizer $tool rc=$? : $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)")
  done
fi
if has bench; then
  if [ -f benchmarks/bench_decode.py ]; then
    $PY benchmarks/bench_decode.py --rows ${BENCH_ROWS:-all} --out "$OUT" > "$OUT/bench.log" 2>&1
    summary+=("bench rc=$?")
    cat "$OUT/results.md" 2>/dev/null || tail -40 "$OUT/bench.log"
  fi
fi
echo "== summary =="
cat "$OUT/gpu.txt"
printf '%s\n' "${summary[@]}"
