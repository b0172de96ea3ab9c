#!/bin/bash
# The precision policy check, one GPU call (~9 min): every fast mode trains as well as fp32.
# Launches in parallel on the one GPU `avme train` runs that differ only in --impl/--precision
# (same seed, binarized MNIST, EPOCHS epochs): ref-fp32 (the reference), cuda-fp32 (the baseline),
# cuda-tf32 and cuda-bf16; 60 s before the deadline the runs get SIGTERM (they checkpoint and stop); then
# tools/gpu/train_compare.py checks that each run's validation -ELBO is within 0.3 nats of
# cuda-fp32's at the last epoch all runs completed. Run from the repository root on the GPU machine:
#
#     DEADLINE_S=520 bash tools/gpu/train_check.sh     (GPU call: timeout_s 560)
#     DRY_RUN=1 OUT=/tmp/gpu-train bash tools/gpu/train_check.sh   (here, on the CPU: checks the script)
#
# Environment: EPOCHS (default 10), MODES (default "ref-fp32 cuda-fp32 cuda-tf32 cuda-bf16"),
# TOLERANCE (default 0.3), TRAIN_ARGS (more `avme train` options, e.g. "--batch-size 100").
#
# Files under $OUT (7): train_check.log, summary.txt, build.log, train_check.json,
# runs/<mode>.log for each mode (4).
DEFAULT_DEADLINE_S=520
. "$(dirname "$0")/common.sh"

EPOCHS=${EPOCHS:-10}
MODES=${MODES:-"ref-fp32 cuda-fp32 cuda-tf32 cuda-bf16"}
TOLERANCE=${TOLERANCE:-0.3}
RUNS=/tmp/avme-train-check
environment
build || { finish; exit 1; }

step "training: $MODES, $EPOCHS epochs each, in parallel"
rm -rf "$RUNS"; mkdir -p "$RUNS" "$OUT/runs"
eval "EXTRA=(${TRAIN_ARGS:-})"
COMMON=(--epochs "$EPOCHS" --seed 0 --no-progress --no-tensorboard --log-every 100)
if [ "$DRY_RUN" = 1 ]; then
    EPOCHS=${EPOCHS_DRY:-2}
    COMMON=(--epochs "$EPOCHS" --seed 0 --no-progress --no-tensorboard --device cpu --enc-hidden 16
            --dec-hidden 16 --latent-dim 4 --steps 3 --train-subset 400 --valid-subset 200)
else
    COMMON+=(--device cuda)
fi
run_seconds=$(( $(left) - 60 ))   # the runs stop (SIGTERM: checkpoint, exit 143) 60 s before the deadline
pids=()
for mode in $MODES; do
    impl=${mode%%-*}; precision=${mode#*-}
    [ "$DRY_RUN" = 1 ] && impl=ref
    (
        timeout --preserve-status -s TERM -k 30 "$run_seconds" "$PY" -m avme_ext train --out "$RUNS/$mode" --overwrite \
            --impl "$impl" --precision "$precision" "${COMMON[@]}" "${EXTRA[@]}" > "$OUT/runs/$mode.log" 2>&1
        echo $? > "$RUNS/$mode.rc"
    ) &
    pids+=($!)
    echo "started $mode (--impl $impl --precision $precision), log runs/$mode.log"
done
wait "${pids[@]}"
for mode in $MODES; do
    rc=$(cat "$RUNS/$mode.rc" 2> /dev/null || echo '?')
    validations=$(grep -c '"kind": "valid"' "$RUNS/$mode/metrics.jsonl" 2> /dev/null)
    record "train $mode" "$( [ "$rc" = 0 ] && echo ok || { [ "$rc" = 143 ] && echo stopped || echo failed; })" \
        "rc=$rc; ${validations:-0} validations"
    tail -3 "$OUT/runs/$mode.log"
done

step "compare"
"$PY" tools/gpu/train_compare.py --runs "$RUNS" --baseline cuda-fp32 --tolerance "$TOLERANCE" --epochs "$EPOCHS" \
    --out "$OUT/train_check.json"
rc=$?
record compare "$( [ $rc = 0 ] && echo pass || echo FAIL)" "rc=$rc (train_check.json)"

finish
