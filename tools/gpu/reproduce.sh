#!/bin/bash
# The paper's reproduction, one GPU call: python/reproduce_paper.py on the state carried in (RUN,
# default .carry/repro) for the models of MODELS, until it ends or STOP_S seconds before the
# deadline, when it gets SIGTERM (its training processes save their checkpoints, the evaluation
# keeps its finished chunks); then what the call added to RUN (float16 weights, metrics, training
# summaries, test chunks, logs, progress.json with the measured rates) is packed into at most 5
# parts under $OUT. The checkpoints of an unfinished run (57 MiB of optimizer state at the paper's
# sizes) stay behind: `python tools/gpu/reproduce_call.py next` plans calls whose runs finish.
#
#     MODELS=avme-canvas DEADLINE_S=540 bash tools/gpu/reproduce.sh     (GPU call: timeout_s 570)
#     DRY_RUN=1 OUT=/tmp/gpu-repro RUN=/tmp/gpu-repro-run bash tools/gpu/reproduce.sh   (here: --smoke on the CPU)
#
# Environment: RUN, MODELS (comma-separated, default all four), IMPL (ref), STOP_S (seconds kept
# after the SIGTERM for the checkpoints and the packing, default 75), BUILD=1 (build the CUDA
# extension first, for IMPL=cuda or auto).
#
# Files under $OUT (at most 8): reproduce.log (everything printed), summary.txt, build.log (with
# BUILD=1), repro.tar.gz.000 ... (at most 5 parts of 15 MiB; here: reproduce_call.py unpack).
DEFAULT_DEADLINE_S=540
. "$(dirname "$0")/common.sh"

RUN=${RUN:-.carry/repro}
MODELS=${MODELS:-avme-canvas,avme-canvas-conditional,avme-error,avme-error-conditional}
IMPL=${IMPL:-ref}
STOP_S=${STOP_S:-75}
environment
if [ "${BUILD:-0}" = 1 ]; then build || { finish; exit 1; }; fi

step "reproduce: $MODELS (--impl $IMPL)"
mkdir -p "$RUN"
SINCE=$(mktemp /tmp/avme-repro-start.XXXXXX)   # what is newer than this file goes back
EXTRA=()
[ "$DRY_RUN" = 1 ] && EXTRA=(--smoke --device cpu)
run_s=$(( $(left) - STOP_S ))
(( run_s < 1 )) && run_s=1
# SIGTERM to reproduce_paper.py alone (its training processes run in sessions of their own and get
# SIGINT from it); SIGKILL 45 s later if it has not exited (they still save their checkpoints)
timeout -s TERM -k 45 "$run_s" "$PY" python/reproduce_paper.py --out "$RUN" --docs /tmp/avme-repro-docs \
    --models "$MODELS" --impl "$IMPL" "${EXTRA[@]}"
rc=$?
case $rc in
    0) status=done ;;
    124|143) status=stopped ;;
    *) status=failed ;;
esac
record reproduce "$status" "rc=$rc after $(( $(date +%s) - T0 )) s"
"$PY" -c "import json, sys; p = json.load(open(sys.argv[1])); print('progress:', json.dumps({k: p[k] for k in ('stage', 'jobs', 'seconds_left')}))" \
    "$RUN/progress.json" 2> /dev/null

step "pack"
"$PY" tools/gpu/reproduce_call.py --run "$RUN" pack --since "$SINCE" --out "$OUT"
rc=$?
record pack "$( [ $rc = 0 ] && echo ok || echo failed)" "rc=$rc"
rm -f "$SINCE"
finish
