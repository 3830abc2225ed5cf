#!/usr/bin/env bash
# One call for a GPU session, ordered by what its results are worth, that cannot lose what it measured.
#
#     benchmarks/gpu_session.sh OUTDIR            on the GPU machine (one 600 s device call)
#     benchmarks/gpu_session.sh --dry-run OUTDIR  every step through the Triton interpreter at tiny sizes
#
# Steps, in order (their names in GPU_SESSION_STEPS): launch, the launch check (launch_check.py, seconds:
# each kernel kind through kernels/launch.py's direct launch and through plain kernel[grid], bit for
# bit and against float64; on a mismatch or an error every later step runs with FUSEDLORA_FAST_LAUNCH=0,
# and the summary says so); versions; benchmark, the headline benchmark (run.py, MoE rows included); host,
# host time per eager call (host.py); serve, serving (serve.py); serve-dora, its DoRA and RL cases;
# train_moe and serve_moe, the MoE training step (train.py --moe) and MoE serving (serve.py --moe);
# plans, the plan crossover (run.py --plans); tune,
# kernel tuning (tune.py, which writes kernels/configs/<gpu>.json into OUTDIR); train, the training
# step (train.py); tests, the CUDA test suite; plain, the kernel tests again with plain Triton launches
# (FUSEDLORA_FAST_LAUNCH=0), if budget is left and the fast path was not already off. Each step runs
# under `timeout` for at most its cap and at most what is left of the budget; a step with under 20 s
# left is skipped. `timeout` sends SIGTERM first: every Python step but host.py (seconds long, its JSON
# written at the end) then writes the JSON (and markdown) of its finished rows, marked partial, and
# every finished row is already in its .jsonl (benchmarks/record.py), so a cut-off step still yields
# what it measured. The tests print one line per finished test (-v).
#
# Writes into OUTDIR: session.log (every step's output, then the summary), versions.txt, the steps'
# .jsonl/.json/.md, and the tuned table. The last lines give each step's exit status (124: timed out);
# the script exits 1 if any step failed or was skipped.
#
# The GPU machine has no package index: nothing is installed. A folder holding only a `fusedlora` link
# goes on PYTHONPATH (never the repository root, whose kernels/ folder would shadow the PyPI package
# `kernels` that transformers imports), with fusedlora/kernels linked to ../kernels as in a checkout.
#
# Environment: PYTHON (default python3); GPU_SESSION_BUDGET_S (default 540: the work that fits one
# 600 s device call after the machine's start); GPU_SESSION_STEPS (the steps to run, by name,
# space-separated; they run in the order above; default all); GPU_SESSION_TAR (below). On the device machine:
#     GPU_SESSION_TAR=$OUT/gpu-session.tgz benchmarks/gpu_session.sh /tmp/gpu-session; cp /tmp/gpu-session/session.log $OUT/
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: benchmarks/gpu_session.sh [--dry-run] OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
# The dry run is not timed against a lease: no caps (a busy CI machine runs the interpreter slowly).
BUDGET=${GPU_SESSION_BUDGET_S:-$([ "$DRY" = 1 ] && echo 3600 || echo 540)}
LOG=$OUT/session.log
: > "$LOG"
SUMMARY=()
FAILED=0
FAST_NOTE=""
STEP_RC=-1  # the exit status of the last step run
STEPS="launch versions benchmark host serve serve-dora train_moe serve_moe plans tune train tests plain"
WANTED=${GPU_SESSION_STEPS:-$STEPS}
for name in $WANTED; do
    case " $STEPS " in
        *" $name "*) ;;
        *) echo "GPU_SESSION_STEPS: unknown step '$name' (steps: $STEPS)" >&2; exit 2 ;;
    esac
done

export PYTHONUNBUFFERED=1
# Offline: nothing may try the network (the PEFT-suite test would run `pip download`; it is excluded too).
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# One Inductor compile worker pool, small: several test workers each starting 16 would fight for the CPUs.
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 FUSEDLORA_BACKEND=triton
fi

[ -e fusedlora/kernels ] || ln -sfn ../kernels fusedlora/kernels
PATHDIR=$(mktemp -d)
ln -s "$ROOT/fusedlora" "$PATHDIR/fusedlora"
# GPU_SESSION_TAR=FILE: OUTDIR packed into FILE at exit, however the script ends (the device call returns
# at most 8 files: one archive, plus session.log beside it if wanted).
trap 'rm -rf "$PATHDIR"; [ -z "${GPU_SESSION_TAR:-}" ] || tar -czf "$GPU_SESSION_TAR" -C "$OUT" .' EXIT
export PYTHONPATH=$PATHDIR${PYTHONPATH:+:$PYTHONPATH}

# step NAME CAP_S COMMAND...: runs COMMAND under timeout for CAP_S seconds, or for what is left of the
# budget if that is less; a step with under 20 s left is skipped (and counts as failed).
step() {
    local name=$1 cap=$2 left limit t0 rc
    shift 2
    case " $WANTED " in
        *" $name "*) ;;
        *) return 0 ;;
    esac
    left=$((BUDGET - SECONDS))
    [ "$DRY" = 1 ] && cap=$left
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 20 ]; then
        SUMMARY+=("$(printf '%-10s skipped: %s s of the %s s budget left' "$name" "$left" "$BUDGET")")
        FAILED=1
        return
    fi
    echo "=== $name (timeout ${limit} s${FUSEDLORA_FAST_LAUNCH:+, FUSEDLORA_FAST_LAUNCH=$FUSEDLORA_FAST_LAUNCH}): $*" \
        | tee -a "$LOG"
    t0=$SECONDS
    # SIGTERM at the limit (the steps write their partial records), SIGKILL 15 s later.
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    STEP_RC=$rc
    [ "$rc" -eq 0 ] || FAILED=1
    SUMMARY+=("$(printf '%-10s exit %3s  %4s s%s' "$name" "$rc" $((SECONDS - t0)) \
        "$( { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || [ "$rc" -eq 143 ]; } && echo '  (timed out)')")")
}

# bash -c script for the versions step: $0 is the file to write, $1 the python.
read -r -d '' VERSIONS <<'EOF_VERSIONS'
{
    nvidia-smi 2>&1 || echo "nvidia-smi: none"
    # From /: the repository root must stay off sys.path (its kernels/ would shadow the PyPI `kernels`);
    # fusedlora comes from the path folder on PYTHONPATH. (python -P would do it, but only from 3.11.)
    (cd / && "$1" -c 'import os, sys, torch, triton, transformers, peft, fusedlora.kernels
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
from fusedlora.kernels import launch
print("fast launch: FUSEDLORA_FAST_LAUNCH=" + os.environ.get("FUSEDLORA_FAST_LAUNCH", "unset"), "| direct launches",
      "on" if launch.fast_launch() else "off")')
    rc=$?
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$0" 2>&1
cat "$0"
exit $rc
EOF_VERSIONS

# The kernel tests again with every launch through Triton's plain kernel[grid] path
# (FUSEDLORA_FAST_LAUNCH=0), since the suite's launches take the fast path after each first sight.
PLAIN_TESTS=(tests/test_lora_linear.py tests/test_lora_add.py tests/test_multi_lora.py tests/test_fast_path_train.py)
if [ "$DRY" = 1 ]; then
    DRYARG=(--dry-run)
    # One small file, collected only: running the suite is CI's job; the dry run checks the step's command.
    TESTS=(--collect-only -q tests/test_dropout.py)
    PLAIN=(--collect-only -q "${PLAIN_TESTS[0]}")
    # host.py measures Triton's GPU launch path: without a GPU, the sm_90 host path (not the interpreter).
    HOST=(env -u TRITON_INTERPRET -u FUSEDLORA_BACKEND "$PY" benchmarks/host.py --repeats 1 --calls 1)
else
    DRYARG=()
    TESTS=(-n 8 -v --durations=15 tests)
    PLAIN=(-n 8 -q "${PLAIN_TESTS[@]}")
    HOST=("$PY" benchmarks/host.py)
fi

# The direct launch has never run on a GPU: check it first, and fall back to Triton's own launches for
# the whole session if it disagrees, so that one wrong path cannot cost every later step. Cap: ~16
# kernel variants compiled cold.
step launch 90 "$PY" benchmarks/launch_check.py --json "$OUT/launch_check.json"
LAUNCH_RC=$STEP_RC  # -1: not run
if [ "$LAUNCH_RC" -gt 0 ]; then
    export FUSEDLORA_FAST_LAUNCH=0
    FAST_NOTE="the launch check failed (exit $LAUNCH_RC, launch_check.json): every later step ran with FUSEDLORA_FAST_LAUNCH=0"
    echo "=== $FAST_NOTE" | tee -a "$LOG"
fi
step versions 30 bash -c "$VERSIONS" "$OUT/versions.txt" "$PY"
# Caps: the headline benchmark took ~150 s on an H200 at commit 8bd3736 with fewer providers.
step benchmark 200 "$PY" benchmarks/run.py "${DRYARG[@]}" --out "$OUT"
step host 40 "${HOST[@]}" --json "$OUT/host.json"
step serve 110 "$PY" benchmarks/serve.py "${DRYARG[@]}" --cases main --out "$OUT"
step serve-dora 90 "$PY" benchmarks/serve.py "${DRYARG[@]}" --cases dora,rl --out "$OUT"
# The MoE rows beside run.py's moe_fwd / moe_fwd_bwd: a Qwen3-MoE training step and a mixed-adapter MoE batch
# (caps not yet measured on a GPU).
step train_moe 60 "$PY" benchmarks/train.py --moe "${DRYARG[@]}" --out "$OUT"
step serve_moe 60 "$PY" benchmarks/serve.py --moe "${DRYARG[@]}" --out "$OUT"
step plans 90 "$PY" benchmarks/run.py --plans "${DRYARG[@]}" --out "$OUT"
step tune 60 "$PY" benchmarks/tune.py "${DRYARG[@]}" --out "$OUT"
step train 80 "$PY" benchmarks/train.py "${DRYARG[@]}" --out "$OUT"
# tests/conftest.py drops the repository root from sys.path (kernels/ would shadow the PyPI `kernels`).
step tests 600 "$PY" -m pytest -p no:cacheprovider --ignore=tests/test_peft_suite.py "${TESTS[@]}"
# With the fast path already off, the tests step ran the plain launches.
[ "$LAUNCH_RC" -gt 0 ] || step plain 60 env FUSEDLORA_FAST_LAUNCH=0 "$PY" -m pytest -p no:cacheprovider "${PLAIN[@]}"

{
    echo "=== summary ($SECONDS s of the $BUDGET s budget; results in $OUT)"
    printf '%s\n' "${SUMMARY[@]}"
    case $LAUNCH_RC in
        -1) echo "fast launch: the launch check did not run; FUSEDLORA_FAST_LAUNCH=${FUSEDLORA_FAST_LAUNCH:-unset}" ;;
        0) echo "fast launch: the launch check passed; the later steps kept the direct launches" ;;
        *) echo "fast launch: OFF: $FAST_NOTE" ;;
    esac
} | tee -a "$LOG"
exit $FAILED
