#!/bin/bash
# The GPU check, one GPU call (~8 min): environment, build, the op tests on CUDA (a debugger
# backtrace if they crash), compute-sanitizer memcheck and racecheck per design, the cost of a
# grid barrier round (bench/barrier.py), the one-GPU DDP equality check, a quick benchmark subset, and an Nsight Compute profile of one training step
# per design. Run from the repository root on the GPU machine:
#
#     DEADLINE_S=500 bash tools/gpu/check.sh          (GPU call: timeout_s 540)
#     DRY_RUN=1 OUT=/tmp/gpu-check bash tools/gpu/check.sh   (here, on the CPU: checks the script)
#
# Environment: TESTS (default tests/ops, or tests/test_ops_cuda.py where tests/ops does not exist,
# plus tests/test_training_cuda.py and the barrier benchmark's test).
#
# Files under $OUT (8, the most that come back): check.log (everything printed), summary.txt (one
# line per step), build.log, tests.log, sanitizer.log, ddp.json, bench.json, ncu.log.
DEFAULT_DEADLINE_S=480
. "$(dirname "$0")/common.sh"

environment
build || { finish; exit 1; }

# ---------------------------------------------------------------- op tests on CUDA
step "op tests"
if [ -z "${TESTS:-}" ]; then
    if [ -d tests/ops ]; then TESTS=tests/ops; else TESTS=tests/test_ops_cuda.py; fi
    # and the other tests that only run on a GPU: CUDA-graph training steps, the barrier benchmark
    TESTS="$TESTS tests/test_training_cuda.py tests/test_bench.py::test_barrier_benchmark_measures_both_barriers"
fi
# The CPU emulator backend is CI's; here only the CUDA backend, and a missing extension fails.
# --runslow: the CUDA cases of the tests marked slow too (they are the emulator's that are slow).
export AVME_EMULATION=0
[ "$DRY_RUN" = 1 ] || export AVME_EXPECT_EXTENSION=1
TIMEOUT_FLAG=()
"$PY" -c "import pytest_timeout" 2> /dev/null && TIMEOUT_FLAG=(--timeout 150)
timeout "$(cap 240 200)" "$PY" -X faulthandler -m pytest $TESTS --runslow -v -p no:cacheprovider -rfEs "${TIMEOUT_FLAG[@]}" \
    > "$OUT/tests.log" 2>&1
rc=$?
tail -25 "$OUT/tests.log"
counts=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)" "$OUT/tests.log" | tail -1)
record tests "$(status_of $rc)" "rc=$rc $TESTS: ${counts:-no pytest summary line}"
if [ $rc -ge 128 ] || grep -q "Fatal Python error" "$OUT/tests.log"; then
    # A crash: rerun the test that was running under a debugger for a native backtrace.
    node=$(grep -o -E "^tests/[^ ]+::[^ ]+" "$OUT/tests.log" | tail -1)
    debugger=$(command -v gdb || command -v cuda-gdb || true)
    if [ -n "$node" ] && [ -n "$debugger" ] && enough 120; then
        step "backtrace of $node ($debugger)"
        timeout "$(cap 120 150)" "$debugger" -batch -ex "set pagination off" -ex run -ex bt -ex "info threads" \
            --args "$PY" -X faulthandler -m pytest "$node" -p no:cacheprovider -x -q >> "$OUT/tests.log" 2>&1
        grep -A 30 -E "^#0 |signal SIG" "$OUT/tests.log" | tail -40
        record backtrace done "$node: see the end of tests.log"
    else
        record backtrace skipped "node=${node:-?} debugger=${debugger:-none}"
    fi
fi

# ---------------------------------------------------------------- compute-sanitizer
step "compute-sanitizer"
if [ "$DRY_RUN" = 1 ] || ! have compute-sanitizer; then
    record sanitizer skipped "$( [ "$DRY_RUN" = 1 ] && echo DRY_RUN || echo 'compute-sanitizer not found')"
else
    for tool in memcheck racecheck; do
        for design in $(designs); do
            enough 200 || { record "sanitizer $tool" skipped "deadline"; break 2; }
            echo "--- $tool, design $design" >> "$OUT/sanitizer.log"
            timeout "$(cap 60 200)" compute-sanitizer --tool "$tool" --error-exitcode 99 \
                "$PY" tools/gpu/with_design.py "$design" tests/sanitizer_case.py >> "$OUT/sanitizer.log" 2>&1
            rc=$?
            summary_line=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.log" | tail -1)
            record "sanitizer $tool $design" "$(status_of $rc)" "rc=$rc ${summary_line}"
        done
    done
    # The bad-input table on CUDA under memcheck: the cases where an earlier build of the ops
    # killed the process; tiny tensors, so it is quick even under the sanitizer.
    if enough 260; then
        echo "--- memcheck, tests/ops/test_bad_inputs.py on CUDA" >> "$OUT/sanitizer.log"
        timeout "$(cap 90 200)" compute-sanitizer --tool memcheck --error-exitcode 99 \
            "$PY" -m pytest -x -q -p no:cacheprovider tests/ops/test_bad_inputs.py -k cuda >> "$OUT/sanitizer.log" 2>&1
        rc=$?
        record "sanitizer memcheck bad-inputs" "$(status_of $rc)" "rc=$rc $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
    else
        record "sanitizer memcheck bad-inputs" skipped "deadline"
    fi
    tail -30 "$OUT/sanitizer.log"
fi

# ---------------------------------------------------------------- grid barrier cost
step "grid barrier: microseconds per round (bench/barrier.py)"
if [ "$DRY_RUN" = 1 ]; then
    "$PY" bench/barrier.py --help > /dev/null
    record barrier skipped "DRY_RUN (needs a GPU; --help ran, rc=$?)"
elif enough 60; then
    # printed into check.log; a barrier that hangs is cut by the timeout, the lines before it stay
    timeout "$(cap 45 40)" "$PY" bench/barrier.py --repeats 7
    rc=$?
    record barrier "$(status_of $rc)" "rc=$rc (lines in check.log)"
else
    record barrier skipped deadline
fi

# ---------------------------------------------------------------- one-GPU DDP equality
step "DDP equality (torchrun, 1 process)"
if enough 150; then
    if [ "$DRY_RUN" = 1 ]; then
        DDP_ARGS=(--device cpu --impl ref --tiny --train-subset 200 --batch-size 50)
    else
        DDP_ARGS=(--device cuda --impl cuda --precision fp32)
    fi
    timeout "$(cap 150 130)" "$PY" tools/gpu/ddp_equal.py "${DDP_ARGS[@]}" --timeout "$(cap 140 140)" \
        --out-json "$OUT/ddp.json"
    rc=$?
    record ddp "$(status_of $rc)" "rc=$rc (ddp.json)"
else
    record ddp skipped deadline
fi

# ---------------------------------------------------------------- quick benchmark subset
step "bench subset"
if enough 100; then
    if [ "$DRY_RUN" = 1 ]; then
        BENCH_ARGS=(--smoke --device cpu --workloads roofline,train --repeats 2)
    else
        BENCH_ARGS=(--workloads roofline,train --batches 100,1024,4096 --steps 12 --repeats 10 --warmup 2
                    --config-seconds 8 --min-repeats 5
                    --impls 'ref-eager,ref-cudagraph,fused-*-fp32,fused-*-bf16,fused-auto-bf16-graph')
    fi
    budget=$(( $(cap 100 90) - 15 ))
    timeout "$(cap 100 90)" "$PY" bench/run.py "${BENCH_ARGS[@]}" --out "$OUT/bench.json" --budget-s "$budget"
    rc=$?
    record bench "$(status_of $rc)" "rc=$rc (bench.json)"
else
    record bench skipped deadline
fi

# ---------------------------------------------------------------- Nsight Compute, one training step per design
step "ncu: one training step per design"
if [ "$DRY_RUN" = 1 ] || ! have ncu; then
    for design in $(designs); do
        "$PY" tools/gpu/profile_step.py --design "$design" --impl ref --device cpu --tiny --batch 8 --steps 3 \
            >> "$OUT/ncu.log" 2>&1
        record "ncu $design" skipped "$( [ "$DRY_RUN" = 1 ] && echo 'DRY_RUN (the step ran without ncu)' || echo 'ncu not found')"
    done
else
    for design in $(designs); do
        enough 40 || { record "ncu $design" skipped deadline; continue; }
        echo "--- design $design" >> "$OUT/ncu.log"
        timeout "$(cap 90 20)" ncu --profile-from-start off --clock-control none --launch-count 60 \
            --section SpeedOfLight --section Occupancy --section LaunchStats \
            "$PY" tools/gpu/profile_step.py --design "$design" --precision bf16 >> "$OUT/ncu.log" 2>&1
        rc=$?
        record "ncu $design" "$(status_of $rc)" "rc=$rc; $(grep -c -E ', Context [0-9]+, Stream [0-9]+' "$OUT/ncu.log") kernels profiled in ncu.log so far"
    done
    grep -E ", Context [0-9]+, Stream|^--- design|Duration|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy" \
        "$OUT/ncu.log" | head -100
fi

finish
