# Sourced by the scripts of tools/gpu/ (run from the repository root on the GPU machine).
#
# Gives them: a deadline (DEADLINE_S seconds from the start, default from the script), every
# line they print teed into $OUT/<script>.log as it is printed (so a crash or a kill keeps it),
# a one-line-per-step $OUT/summary.txt, the source revision (tools/gpu/stamp.env, written by
# tools/gpu/stamp.sh before the call), and the build of the CUDA extension.
#
# Environment:
#   OUT          folder whose files come back (set by the remote call; required)
#   DEADLINE_S   seconds the whole script may take (keep it ~30 s under the call's timeout_s)
#   DRY_RUN=1    a CPU check of the script itself: no build, tiny sizes, GPU tools skipped
#   SKIP_BUILD=1 use the extension already built in place
#   PYTHON       the interpreter (default python3)

set -u -o pipefail
: "${OUT:?OUT must name the folder whose files come back (the remote call sets it)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
SCRIPT_NAME=$(basename "$0" .sh)
T0=$(date +%s)
DEADLINE=$(( T0 + ${DEADLINE_S:-$DEFAULT_DEADLINE_S} ))
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
exec > >(tee -a "$OUT/$SCRIPT_NAME.log") 2>&1
TEE_PID=$!

# Seconds left before the deadline.
left() { echo $(( DEADLINE - $(date +%s) )); }

# cap WANT [RESERVE]: WANT seconds, or fewer so that RESERVE (default 10) seconds stay before the deadline; at least 1.
cap() {
    local want=$1 reserve=${2:-10} l
    l=$(( $(left) - reserve ))
    (( l < want )) && want=$l
    (( want < 1 )) && want=1
    echo "$want"
}

# enough SECONDS: true when at least SECONDS are left.
enough() { (( $(left) >= $1 )); }

step() { echo; echo "=== $1  (t=$(( $(date +%s) - T0 )) s, left $(left) s)"; }

# record STEP STATUS [DETAIL]: one line of $OUT/summary.txt (also printed).
record() { printf '%-24s %-8s %s\n' "$1" "$2" "${3:-}" | tee -a "$SUMMARY"; }

# status_of RC: ok, timeout (124/137) or failed.
status_of() { case $1 in 0) echo ok ;; 124|137) echo timeout ;; *) echo "failed" ;; esac; }

have() { command -v "$1" > /dev/null 2>&1; }

environment() {
    step "environment"
    if [ -f tools/gpu/stamp.env ]; then
        # shellcheck disable=SC1091
        . tools/gpu/stamp.env
        export AVME_GIT_COMMIT AVME_GIT_DIRTY
        echo "source: commit ${AVME_GIT_COMMIT:-?} dirty=${AVME_GIT_DIRTY:-?} (tools/gpu/stamp.env)"
    else
        echo "source: no tools/gpu/stamp.env (run tools/gpu/stamp.sh before the call and carry it): commit unknown"
    fi
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"; echo "DRY_RUN=$DRY_RUN DEADLINE_S=$(( DEADLINE - T0 ))"
    if have nvidia-smi; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
            --format=csv 2>&1 | head -3
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    have nvcc && nvcc --version | tail -2
    for tool in ncu compute-sanitizer gdb cuda-gdb torchrun; do
        printf '%-18s %s\n' "$tool" "$(command -v $tool || echo 'not found')"
    done
}

# build: the CUDA extension in place (incremental on a warm machine), then a check that it loads.
build() {
    step "build"
    if [ "$DRY_RUN" = 1 ] || [ "${SKIP_BUILD:-0}" = 1 ]; then
        record build skipped "DRY_RUN=$DRY_RUN SKIP_BUILD=${SKIP_BUILD:-0}"
        return 0
    fi
    local start rc
    start=$(date +%s)
    CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 AVME_FORCE_CUDA=1 \
        timeout "$(cap 300 60)" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        grep -n -i -E "error|ptxas" "$OUT/build.log" | head -40
        record build "$(status_of $rc)" "rc=$rc after $(( $(date +%s) - start )) s; see build.log"
        return 1
    fi
    grep -i -E "spill|stack frame" "$OUT/build.log" | sort | uniq -c | head -20
    if "$PY" -c "import avme_ext.ops as o, sys; ok = o.is_available(); print('fused ops available:', ok, o.extension_error() or ''); print('designs:', getattr(o, 'DESIGNS', None), '| override avme_ext.ops.design:', hasattr(o, 'design')); sys.exit(0 if ok else 1)"; then
        record build ok "$(( $(date +%s) - start )) s"
    else
        record build failed "built, but avme_ext.ops.is_available() is False"
        return 1
    fi
}

# designs: the fused designs to profile/check, one per line ("auto" alone when the build cannot force one).
designs() {
    "$PY" - <<'PYEOF'
from avme_ext import ops
names = [d for d in getattr(ops, "DESIGNS", ()) if d != "auto"] if hasattr(ops, "design") else []
print("\n".join(names or ["auto"]))
PYEOF
}

finish() {
    step "summary ($SCRIPT_NAME, $(( $(date +%s) - T0 )) s)"
    cat "$SUMMARY"
    echo "files under \$OUT:"; ls -la "$OUT"
    exec 1>&- 2>&-   # let tee write the last lines before the call returns
    wait "$TEE_PID" 2> /dev/null || true
}
