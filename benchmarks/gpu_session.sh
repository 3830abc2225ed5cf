#!/usr/bin/env bash
# One call for a GPU session: install offline, the CUDA test suite, the serving benchmark, the headline
# benchmark, the plan crossover, the training step and the large serving scenario, each under
# `timeout`, all within one time budget.
#
#     benchmarks/gpu_session.sh OUTDIR
#
# Writes into OUTDIR: session.log (every step's output, in order, then the summary), versions.txt
# (nvidia-smi, Python packages, commit), <gpu>.json/.md/.png from benchmarks/run.py, <gpu>-plans.*
# from run.py --plans, serve-<gpu>.json and serve-<gpu>-large.json from benchmarks/serve.py, and
# <gpu>-train.json from benchmarks/train.py. A failed step does not stop the next; the last lines give
# each step's exit status (124: timed out), and the script exits 1 if any step failed. The plan
# crossover, the training step and the large serving scenario are optional: each runs only if
# PLANS_MIN_S / TRAIN_MIN_S / LARGE_MIN_S of the budget are left, and is otherwise skipped without
# counting as a failure. Environment: PYTHON (default python3), GPU_SESSION_BUDGET_S (default 520,
# for a 9-minute slot: on an H200 at commit 8bd3736 the tests took 126 s, the benchmark about 150 s
# and the serving benchmark 60-90 s).
set -u
if [ $# -ne 1 ]; then
    echo "usage: benchmarks/gpu_session.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_SESSION_BUDGET_S:-520}
LOG=$OUT/session.log
export PYTHONUNBUFFERED=1
: > "$LOG"
SUMMARY=()
FAILED=0

# step NAME CAP_S COMMAND...: runs COMMAND under timeout for CAP_S seconds, or for what is left of the
# budget if that is less; a step with under 20 s left is skipped (and counts as failed).
step() {
    local name=$1 cap=$2 left limit t0 rc
    shift 2
    left=$((BUDGET - SECONDS))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 20 ]; then
        SUMMARY+=("$(printf '%-12s skipped: %s s of the %s s budget left' "$name" "$left" "$BUDGET")")
        FAILED=1
        return
    fi
    echo "=== $name (timeout ${limit} s): $(echo "$*" | head -c 160 | tr '\n' ' ')" | tee -a "$LOG"
    t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || FAILED=1
    SUMMARY+=("$(printf '%-12s exit %3s  %4s s%s' "$name" "$rc" $((SECONDS - t0)) \
        "$([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo '  (timed out)')")")
}

# bash -c script for the versions step: $0 is the file to write, $1 the python.
read -r -d '' VERSIONS <<'EOF_VERSIONS'
rc=0
{
    nvidia-smi || rc=1
    "$1" -c 'import sys, torch, triton, transformers, peft
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' || rc=1
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$0" 2>&1
cat "$0"
exit $rc
EOF_VERSIONS

# No package index on the GPU machine: pyproject.toml lets pip build with the setuptools installed.
step install 90 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
if ! "$PY" -c "import fusedlora.kernels" 2>/dev/null; then
    # Without the install, fusedlora.kernels (kernels/ in the tree) can still be reached through a link;
    # removed again when the script ends.
    echo "fusedlora.kernels not importable: linking fusedlora/kernels -> ../kernels for this session" | tee -a "$LOG"
    ln -sfn ../kernels fusedlora/kernels && trap 'rm -f fusedlora/kernels' EXIT
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
step versions 60 bash -c "$VERSIONS" "$OUT/versions.txt" "$PY"
# -v: one line per finished test, so that a run cut off by its timeout still names what passed and failed.
step tests 240 "$PY" -m pytest -n 12 -v -p no:cacheprovider --durations=15 tests
step serve 150 "$PY" benchmarks/serve.py --out "$OUT"
step benchmark 260 "$PY" benchmarks/run.py --out "$OUT"
PLANS_MIN_S=90  # 32 rows of 5 providers: where the planner should switch from the fused to the split plan
if [ $((BUDGET - SECONDS)) -ge $PLANS_MIN_S ]; then
    step plans 120 "$PY" benchmarks/run.py --plans --out "$OUT"
else
    SUMMARY+=("$(printf '%-12s skipped (optional): under %s s of the budget left' plans $PLANS_MIN_S)")
fi
TRAIN_MIN_S=100  # two 8B-class Llama copies, a float32 check and 42 timed optimizer steps
if [ $((BUDGET - SECONDS)) -ge $TRAIN_MIN_S ]; then
    step train 150 "$PY" benchmarks/train.py --out "$OUT"
else
    SUMMARY+=("$(printf '%-12s skipped (optional): under %s s of the budget left' train $TRAIN_MIN_S)")
fi
LARGE_MIN_S=120  # 64 adapters' setup and PEFT's loop over them: a cut-off run would give nothing
if [ $((BUDGET - SECONDS)) -ge $LARGE_MIN_S ]; then
    step serve-large 150 "$PY" benchmarks/serve.py --scenario large --out "$OUT"
else
    SUMMARY+=("$(printf '%-12s skipped (optional): under %s s of the budget left' serve-large $LARGE_MIN_S)")
fi

{
    echo "=== summary ($SECONDS s of the $BUDGET s budget; results in $OUT)"
    printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
exit $FAILED
