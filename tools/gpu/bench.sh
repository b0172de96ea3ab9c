#!/bin/bash
# The committed benchmark run, one GPU call (~9.5 min): build, then bench/run.py with every
# reference mode and every fused design x precision at B in {100,256,1024,4096} (K=12), K=64 at
# B=1024, sampling 10,000 images, IWAE S=5000 and memory, within --budget-s so a partial results
# file always comes back; then bench/report.py and bench/crossover.py on it. Run from the repository
# root on the GPU machine:
#
#     DEADLINE_S=560 bash tools/gpu/bench.sh         (GPU call: timeout_s 590)
#     DRY_RUN=1 OUT=/tmp/gpu-bench bash tools/gpu/bench.sh   (here, on the CPU: checks the script)
#
# Environment: APPEND=bench/results/<file>.json adds this run's records to an earlier file (a
# record with the same workload/impl/B/K replaces the old one; the output keeps that file's name);
# BENCH_ARGS="..." more bench/run.py options (e.g. "--workloads train --impls 'ref-eager,ref-compile*'").
#
# Files under $OUT (7): bench.log, summary.txt, build.log, <date>-<gpu>.json (the results),
# bench-README.md (bench/README.md with the report), <date>-<gpu>-train-throughput.png, dispatch.py
# (avme_ext/dispatch.py with the crossover table of this run).
DEFAULT_DEADLINE_S=560
. "$(dirname "$0")/common.sh"

environment
build || { finish; exit 1; }

step "bench/run.py"
ARGS=(--config-seconds 12 --min-repeats 10 --iwae-seconds 60 --compile-reserve-s 45)
[ "$DRY_RUN" = 1 ] && ARGS=(--smoke --device cpu --repeats 2)
if [ -n "${APPEND:-}" ]; then
    ARGS+=(--append "$APPEND" --out "$OUT/$(basename "$APPEND")")
else
    ARGS+=(--out "$OUT")
fi
eval "EXTRA=(${BENCH_ARGS:-})"
budget=$(( $(left) - 50 ))
echo "$PY bench/run.py ${ARGS[*]} ${EXTRA[*]} --budget-s $budget"
timeout -k 10 "$(cap $(( $(left) - 25 )) 25)" "$PY" bench/run.py "${ARGS[@]}" "${EXTRA[@]}" --budget-s "$budget"
rc=$?
RESULTS=$(ls -t "$OUT"/*.json 2> /dev/null | head -1)
record bench "$(status_of $rc)" "rc=$rc ${RESULTS:+$(basename "$RESULTS")}"
if [ -z "$RESULTS" ]; then
    finish
    exit 1
fi

step "bench/report.py"
cp bench/README.md "$OUT/bench-README.md"
timeout "$(cap 60 5)" "$PY" bench/report.py "$RESULTS" --readme "$OUT/bench-README.md" --plot-dir "$OUT" --print-targets
rc=$?
record report "$(status_of $rc)" "rc=$rc (bench-README.md)"

step "bench/crossover.py"
CROSS=(--out "$OUT/dispatch.py" --print)
[ "$DRY_RUN" = 1 ] && CROSS+=(--allow-smoke)
timeout "$(cap 60 2)" "$PY" bench/crossover.py "$RESULTS" "${CROSS[@]}"
rc=$?
record crossover "$(status_of $rc)" "rc=$rc (dispatch.py)"

finish
