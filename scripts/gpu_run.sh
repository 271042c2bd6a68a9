#!/usr/bin/env bash
# One call on the GPU machine: install carried wheels, build, run the CUDA tests, sanitizers and the
# benchmark; logs and results under $OUT, a short table printed last.
#   scripts/gpu_run.sh [stage ...]   stages: ceilings build tune sched ab smoke tests aoti sanitize
#                                    racecheck_repro profile profile_source profile_metadata bench ab_build
#                                    metadata
#                                    (default: build smoke tests aoti sanitize bench; a 10-minute call
#                                    fits `build smoke tests bench`, then `build aoti sanitize`)
# Carry .whl (wheels the GPU image lacks: expecttest) with the call. The tree copied to the GPU machine
# may carry a stale .git: pass FLASHMLA_COMMIT=<commit> so the benchmark tables name the right one.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL_OUT=${OUT:-$PWD/out}
# Everything is written under $FINAL_OUT/work and packed into results.tar.gz at the end (the device
# tool brings back only a few files); summary.txt stays beside it.
OUT=$FINAL_OUT/work
mkdir -p "$OUT"
STAGES=${*:-build smoke tests aoti sanitize bench}
PY=${PY:-python3}
# The GPU image sets CXX=/opt/gcc/bin/g++, which links libstdc++ statically: code that inductor
# compiles with it (torch.compile CPU kernels, AOTInductor packages) then carries a second libstdc++
# into a process that already has one, and crashed there (SIGSEGV in std::regex while loading a
# package; a segfault later in the same pytest process). Use the system compiler when it exists.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++; fi
export PYTHONPATH=$PWD:$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}
summary=()
# Each stage's result also goes to $FINAL_OUT/summary.txt at once, so a call stopped at its time limit
# still returns what finished (the files under $OUT/work come back unpacked then).
note() { summary+=("$1"); echo "$1" >> "$FINAL_OUT/summary.txt"; }
: > "$FINAL_OUT/summary.txt"

has() { [[ " $STAGES " == *" $1 "* ]]; }
# Builds the extension in place in the current directory (CPU + CUDA), logging to $1.
build_ext() { FLASHMLA_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace > "$1" 2>&1; }
t0=$(date +%s)
elapsed() { echo "t+$(( $(date +%s) - t0 ))s"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install --quiet --no-deps --no-index --target .whl/site .whl/*.whl > "$OUT/pip.log" 2>&1 || true
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
if has ceilings; then
  # The copy and matmul ceilings of this card (scripts/ceilings.py), for the benchmark's percentages.
  $PY scripts/ceilings.py > "$OUT/ceilings.json" 2> "$OUT/ceilings.log"
  note "ceilings rc=$? $(cat "$OUT/ceilings.json")"
fi

if has build; then
  start=$(date +%s)
  build_ext "$OUT/build.log"
  rc=$?
  note "build rc=$rc $(( $(date +%s) - start ))s"
  if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; printf '%s\n' "${summary[@]}"; exit 1; fi
fi
if has tune; then
  # Every portable-kernel configuration on the rows that pick it (correctness + time).
  $PY scripts/tune_portable.py --out "$OUT/tune" > "$OUT/tune.log" 2>&1
  note "tune rc=$? $(elapsed)"
  grep "^|" "$OUT/tune.log"
fi
if has smoke; then
  $PY scripts/cuda_smoke.py > "$OUT/smoke.log" 2>&1
  note "smoke rc=$? $(elapsed)"
  tail -30 "$OUT/smoke.log"
fi
if has tests; then
  # The AOTInductor tests (stage aoti) build and load packages; they run in a process of their own.
  # PYTEST_K: a -k expression (spaces allowed); PYTEST_ARGS: further space-separated options.
  $PY -m pytest -q -p no:cacheprovider tests --ignore=tests/test_aoti.py ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_ARGS:-} \
    > "$OUT/pytest.log" 2>&1
  note "pytest rc=$? $(elapsed) : $(tail -1 "$OUT/pytest.log")"
  grep -hE "^FAILED|^ERROR|Fatal" "$OUT/pytest.log" | head -20
fi
if has aoti; then
  $PY -m pytest -q -p no:cacheprovider tests/test_aoti.py > "$OUT/pytest_aoti.log" 2>&1
  note "pytest aoti rc=$? $(elapsed) : $(tail -1 "$OUT/pytest_aoti.log")"
  grep -hE "^FAILED|^ERROR|Fatal" "$OUT/pytest_aoti.log" | head -20
fi
if has sanitize; then
  compute-sanitizer --tool memcheck --error-exitcode 9 $PY scripts/cuda_smoke.py --small > "$OUT/sanitize_memcheck.log" 2>&1
  note "compute-sanitizer memcheck rc=$? $(elapsed) : $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_memcheck.log" | tail -1)"
  # racecheck does not follow the ordering of bar.arrive -> bar.sync (stage racecheck_repro; docs/KERNEL_NOTES.md
  # v8), which the seesaw schedule's handshakes use: it reports hazards there that the barriers exclude. So: one
  # run with the seesaw off, which must be clean, and one as shipped, where every hazard must lie in
  # seesaw_consumers (its count is reported, not judged).
  FLASHMLA_SM90_SEESAW=0 compute-sanitizer --tool racecheck --error-exitcode 9 $PY scripts/cuda_smoke.py --small \
    > "$OUT/sanitize_racecheck_split.log" 2>&1
  note "compute-sanitizer racecheck, seesaw off rc=$? $(elapsed) : $(grep -E 'RACECHECK SUMMARY' "$OUT/sanitize_racecheck_split.log" | tail -1)"
  compute-sanitizer --tool racecheck $PY scripts/cuda_smoke.py --small > "$OUT/sanitize_racecheck.log" 2>&1
  rc=$?
  # A hazard is two lines ("Race reported between <access> ..." / "and <access> ..."): count those with a side elsewhere.
  elsewhere=$(awk '/Race reported/ {a = $0; getline b; if (a !~ /seesaw_consumers/ || b !~ /seesaw_consumers/) n++}
    END {print n + 0}' "$OUT/sanitize_racecheck.log")
  note "compute-sanitizer racecheck, as shipped rc=$rc : $(grep -E 'RACECHECK SUMMARY' "$OUT/sanitize_racecheck.log" | tail -1); outside seesaw_consumers: $elsewhere"
fi
if has racecheck_repro; then
  # racecheck on the seesaw's named-barrier handshake alone (scripts/racecheck_named_barrier.cu):
  # race-free by construction, so any hazard it reports is the tool's (docs/KERNEL_NOTES.md v7).
  for sync_only in 0 1; do
    "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" -arch=sm_90 -DSYNC_ONLY=$sync_only -o "$OUT/rc_repro_$sync_only" scripts/racecheck_named_barrier.cu &&
      compute-sanitizer --tool racecheck --error-exitcode 9 "$OUT/rc_repro_$sync_only" > "$OUT/racecheck_repro_$sync_only.log" 2>&1
    note "racecheck_repro SYNC_ONLY=$sync_only rc=$? : $(grep -E 'RACECHECK SUMMARY' "$OUT/racecheck_repro_$sync_only.log" | tail -1)"
    rm -f "$OUT/rc_repro_$sync_only"
  done
fi
if has ab; then
  # One environment switch A/B on a few rows, with the decode kernel's time (scripts/env_ab.py).
  $PY scripts/env_ab.py --var "${AB_VAR:-FLASHMLA_KV_EVICT_FIRST}" --values "${AB_VALUES:-1,0}" \
    ${AB_ROWS:+--rows "$AB_ROWS"} ${AB_KERNELS:+--kernels "$AB_KERNELS"} --out "$OUT/ab" > "$OUT/ab.log" 2>&1
  note "ab rc=$? $(elapsed)"
  grep "^|" "$OUT/ab.log"
fi
if has sched; then
  # The schedule's fixed cost per piece and cut tolerance against attention time (scripts/sched_sweep.py).
  for kernel in ${SCHED_KERNELS:-auto portable}; do
    $PY scripts/sched_sweep.py --kernel $kernel ${SCHED_VARIANTS:+--variants "$SCHED_VARIANTS"} \
      --rows "${SCHED_ROWS:-all}" --out "$OUT/sched" > "$OUT/sched_$kernel.log" 2>&1
    note "sched $kernel rc=$? $(elapsed)"
    grep "^|" "$OUT/sched_$kernel.log"
  done
fi
if has profile; then
  # Hardware counters of the decode kernel (FLASHMLA_KERNEL=$PROFILE_KERNEL, default auto) on a
  # memory-bound and a compute-bound row; SourceCounters names the stalling instructions. A case is
  # "h_q,s_q[,s_k[,varlen]]"; varlen cases profile the combine kernel too (the third call's pair).
  for case in ${PROFILE_CASES:-"16,1" "128,1"}; do
    IFS=, read -r hq sq sk vl <<< "$case"
    name=ncu_${PROFILE_KERNEL:-auto}_h${hq}_sq${sq}${sk:+_sk$sk}${vl:+_$vl}
    kernels=mla_decode; skip=2; count=1
    if [ "$vl" = varlen ]; then kernels="mla_decode|combine_kernel"; skip=4; count=2; fi
    FLASHMLA_KERNEL=${PROFILE_KERNEL:-auto} ncu --clock-control none --kernel-name "regex:$kernels" \
      --launch-skip $skip --launch-count $count --import-source no \
      --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section SourceCounters \
      $PY scripts/profile_decode.py $hq $sq ${sk:-4096} $vl > "$OUT/$name.txt" 2>&1
    note "$name rc=$?"
    grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Stall|Issue Slot|Executed Ipc" "$OUT/$name.txt" | head -20
  done
fi
if has profile_source; then
  # Warp-stall samples per SASS instruction of the decode kernel (one case of PROFILE_CASES each,
  # "h_q,s_q[,s_k]"): the report, its source page as CSV and scripts/stall_summary.py's tables.
  for case in ${PROFILE_CASES:-"128,2"}; do
    IFS=, read -r hq sq sk _ <<< "$case"
    name=stalls_${PROFILE_KERNEL:-auto}_h${hq}_sq${sq}${sk:+_sk$sk}
    FLASHMLA_KERNEL=${PROFILE_KERNEL:-auto} ncu --clock-control none --kernel-name regex:mla_decode --launch-skip 2 \
      --launch-count 1 --section WarpStateStats --section SourceCounters --import-source no -o "$OUT/$name" \
      $PY scripts/profile_decode.py $hq $sq ${sk:-4096} > "$OUT/$name.log" 2>&1 &&
      ncu -i "$OUT/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/$name.csv" 2>> "$OUT/$name.log" &&
      $PY scripts/stall_summary.py "$OUT/$name.csv" > "$OUT/$name.md"
    note "$name rc=$?"
    head -24 "$OUT/$name.md"
  done
fi
if has profile_metadata; then
  # The metadata kernel (get_mla_metadata, b=128 fixed 4096-token lengths, 16 query rows: 132 workers):
  # its duration and warp stalls per SASS instruction (scripts/stall_summary.py), as profile_source does.
  name=stalls_metadata_b128
  ncu --clock-control none --kernel-name regex:schedule --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SourceCounters --import-source no -o "$OUT/$name" \
    $PY -c "import torch, flashmla_ops
lens = torch.full((128,), 4096, dtype=torch.int32, device='cuda')
for _ in range(4): flashmla_ops.get_mla_metadata(lens, 16, 1)
torch.cuda.synchronize()" > "$OUT/$name.log" 2>&1 &&
    ncu -i "$OUT/$name.ncu-rep" --page details > "$OUT/$name.txt" 2>> "$OUT/$name.log" &&
    ncu -i "$OUT/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/$name.csv" 2>> "$OUT/$name.log" &&
    $PY scripts/stall_summary.py "$OUT/$name.csv" > "$OUT/$name.md"
  note "$name rc=$?"
  grep -E "Duration|SM Frequency|Elapsed Cycles" "$OUT/$name.txt"
  head -40 "$OUT/$name.md"
fi
if has bench; then
  # The Hopper kernel (auto picks it on sm_90) on every row, the portable kernel on the grid
  # (BENCH_KERNELS, BENCH_ROWS, BENCH_ROWS_PORTABLE narrow it).
  for kernel in ${BENCH_KERNELS:-auto portable}; do
    rows=${BENCH_ROWS:-all}; [ $kernel = portable ] && rows=${BENCH_ROWS_PORTABLE:-grid}
    mkdir -p "$OUT/bench_$kernel"
    $PY benchmarks/bench_decode.py --kernel $kernel --rows $rows --out "$OUT/bench_$kernel" \
      > "$OUT/bench_$kernel/log.txt" 2>&1
    note "bench $kernel rc=$? $(elapsed)"
    cat "$OUT/bench_$kernel/results.md" 2>/dev/null || tail -20 "$OUT/bench_$kernel/log.txt"
  done
fi
if has ab_build; then
  # Two builds on benchmark rows (changes that no environment switch can select): this tree against a
  # copy of it with the files under $AB_BASE (ignored, carried with the call; e.g. out/base holding a
  # commit's versions of the changed sources) laid over csrc/cuda, built apart. AB_BUILD_SETS lists
  # "kernel:rows" pairs (bench_decode.py --kernel / --rows; default "${AB_BUILD_KERNEL:-auto}:${AB_BUILD_ROWS:-grid}";
  # AB_BUILD_SETS="" builds the base and runs no set, e.g. for the metadata stage);
  # each set runs AB_BUILD_ROUNDS interleaved rounds into $OUT/ab_build_<kernel>_<rows>/ and gets two tables,
  # attention alone (ab_build.md) and the whole step, metadata included (ab_build_step.md).
  base=/tmp/flashmla_ab_base
  rm -rf "$base" && cp -a . "$base" && cp "${AB_BASE:-out/base}"/* "$base/csrc/cuda/"
  (cd "$base" && build_ext "$OUT/ab_build_base.log")
  note "ab_build base build rc=$? $(elapsed)"
  for set in ${AB_BUILD_SETS-${AB_BUILD_KERNEL:-auto}:${AB_BUILD_ROWS:-grid}}; do
    kernel=${set%%:*}; rows=${set#*:}; sdir=$OUT/ab_build_${kernel}_$rows
    mkdir -p "$sdir"
    for round in $(seq "${AB_BUILD_ROUNDS:-2}"); do
      for which in tree base; do
        dir=$PWD; [ $which = base ] && dir=$base
        (cd "$dir" && PYTHONPATH=$dir:$dir/.whl/site $PY benchmarks/bench_decode.py --kernel "$kernel" \
          --rows "$rows" --out "$sdir/ab_build_${which}_$round" > "$sdir/ab_build_${which}_$round.log" 2>&1)
        note "ab_build $set $which round $round rc=$? $(elapsed)"
      done
    done
    $PY scripts/ab_build_compare.py "$sdir" --json "$sdir/ab_build.json" > "$sdir/ab_build.md" 2>&1
    note "ab_build $set compare rc=$? : $(tail -n 1 "$sdir/ab_build.md")"
    $PY scripts/ab_build_compare.py "$sdir" --field step_us --json "$sdir/ab_build_step.json" \
      > "$sdir/ab_build_step.md" 2>&1
    note "ab_build $set step compare rc=$? : $(tail -n 1 "$sdir/ab_build_step.md")"
    cat "$sdir/ab_build.md"
  done
fi
if has metadata; then
  # get_mla_metadata alone (benchmarks/bench_metadata.py): graph replay and kernel time; where the
  # ab_build stage ran first, its base build too, into $OUT/metadata_base.
  $PY benchmarks/bench_metadata.py --out "$OUT/metadata" > "$OUT/metadata.log" 2>&1
  note "metadata rc=$? $(elapsed)"
  cat "$OUT/metadata/results.md" 2>/dev/null || tail -20 "$OUT/metadata.log"
  if has ab_build; then
    (cd /tmp/flashmla_ab_base && PYTHONPATH=$PWD:$PWD/.whl/site $PY benchmarks/bench_metadata.py \
      --out "$OUT/metadata_base" > "$OUT/metadata_base.log" 2>&1)
    note "metadata base rc=$? $(elapsed)"
    cat "$OUT/metadata_base/results.md" 2>/dev/null || tail -20 "$OUT/metadata_base.log"
  fi
fi
{ echo "== summary =="; cat "$OUT/gpu.txt"; printf '%s\n' "${summary[@]}"; } | tee "$FINAL_OUT/summary.txt.tmp"
mv "$FINAL_OUT/summary.txt.tmp" "$FINAL_OUT/summary.txt"
tar czf "$FINAL_OUT/results.tar.gz" -C "$OUT" . && rm -rf "$OUT"
