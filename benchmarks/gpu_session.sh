#!/usr/bin/env bash
# Everything chopgrad checks on a CUDA machine, in one run that fits a short
# GPU loan (about 8 minutes on one H100/H200):
#
#   1. (background, only if TRAIN_SECONDS > 0) continue training the default
#      VAE on the GPU from the shipped weights (scripts/train_default_vae.py
#      --device cuda; stages 7-8 of the shipped weights came from two such runs,
#      and the second gained only 0.06 dB, so the default is 0);
#   2. build and install the C++ engine (pip install -e . against this torch);
#   3. `chopgrad info`; the kernel tests (with CUDA present they run the
#      compiled Triton kernels on the GPU) and the CUDA-only tests; then the
#      rest of the test suite (8 pytest-xdist workers for the kernel tests, 16 for the rest);
#   4. once training is done, with the GPU to itself: the fused-kernel
#      benchmark, `chopgrad probe --device cuda` and `chopgrad bench --device
#      cuda` (fp32, then a short bf16 grid).
#
# Every step has its own time limit and writes its log under OUT_DIR, so a
# failing step costs only its own time; timestamps go to OUT_DIR/session.log.
# The session as a whole stops after SESSION_SECONDS (default 480): the test
# steps come first, and the benchmarks get what is left.
# On an H200 the steps before the benchmarks take about 4 minutes; the fp32
# bench grid did not finish in 200 s there, hence its 300 s limit (it writes
# its results after every configuration, so a cut-off run keeps what it measured).
#
#   benchmarks/gpu_session.sh OUT_DIR [TRAIN_SECONDS]     (default 0: no training)
#
# INIT_FROM=DIR starts training from DIR/default_vae.safetensors instead of the
# shipped weights. TRAIN_BASE_DIM=N first widens the starting weights to
# base_dim N (scripts/widen_vae.py: the wider model starts out computing what
# the trained one does) and trains that; base_dim 24 keeps `chopgrad bench
# --quick` at about 2.7 min on 2 CPU cores (16 now: 1.9 min). TRAIN_Z_DIM=N
# likewise adds latent channels (32 now; at 64 a linear code of the same size
# reaches 30 dB on the held-out clips, see benchmarks/RESULTS.md). INSTALL_TRAINED=1
# copies the trained weights and config over chopgrad/models/ before the
# benchmarks, so probe and bench measure them (it changes this checkout's
# default model: use it on a scratch copy).
#
# The python that runs it is $PYTHON (default python3) and must already have
# torch with CUDA and triton. Python packages the machine lacks (a GPU image
# often has no diffusers, PyAV or pytorch-msssim) travel as wheels in
# $WHEELS (default .whl, filled by benchmarks/gpu_wheels.sh on a machine with
# an index): they are installed into a folder of their own, put first on
# PYTHONPATH, and nothing already installed is replaced.
set -u
OUT_DIR=${1:?usage: gpu_session.sh OUT_DIR [TRAIN_SECONDS]}
TRAIN_SECONDS=${2:-0}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT_DIR/session.log"; }
# The whole session stays within SESSION_SECONDS (default 480: 8 minutes): each step's limit is cut to what is
# left, and a step with less than 15 s left is skipped.
SESSION_SECONDS=${SESSION_SECONDS:-480}
step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    local left=$(( SESSION_SECONDS - ($(date +%s) - T0) ))
    if [ "$left" -lt 15 ]; then stamp "skip $name (${left}s left of ${SESSION_SECONDS}s)"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    stamp "start $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    stamp "end $name rc=$?"
}

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
        >"$OUT_DIR/wheels.log" 2>&1 || { stamp "installing the wheels in $WHEELS failed (see wheels.log)"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    stamp "installed $(ls "$WHEELS"/*.whl | wc -l) carried wheels from $WHEELS"
fi
"$PY" -c "import diffusers, av, pytorch_msssim" >>"$OUT_DIR/session.log" 2>&1 \
    || stamp "missing packages: the tests that need them will fail (benchmarks/gpu_wheels.sh fetches them)"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT_DIR/gpu.txt" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$OUT_DIR/gpu.txt" 2>&1

TRAIN_PID=
INIT_DIR=${INIT_FROM:-chopgrad/models}
ARCH_ARGS=()
[ -n "${TRAIN_BASE_DIM:-}" ] && ARCH_ARGS+=(--base-dim "$TRAIN_BASE_DIM")
[ -n "${TRAIN_Z_DIM:-}" ] && ARCH_ARGS+=(--z-dim "$TRAIN_Z_DIM")
if [ "$TRAIN_SECONDS" != 0 ] && [ ${#ARCH_ARGS[@]} -gt 0 ]; then
    "$PY" scripts/widen_vae.py "$INIT_DIR" "$OUT_DIR/widened" "${ARCH_ARGS[@]}" >"$OUT_DIR/widen.log" 2>&1 \
        || { stamp "widen failed (see widen.log)"; exit 1; }
    INIT_DIR=$OUT_DIR/widened
fi
if [ "$TRAIN_SECONDS" != 0 ]; then
    stamp "start train (${TRAIN_SECONDS}s budget)"
    # Full 64x64 clips alternating 17 / 33 frames, 16 per step, generated by 8
    # CPU processes; seeds >= 7 keep the clips apart from earlier stages' and
    # from the held-out clips.
    timeout $((TRAIN_SECONDS + 90)) "$PY" scripts/train_default_vae.py --device cuda \
        --init-from "$INIT_DIR" ${ARCH_ARGS[@]+"${ARCH_ARGS[@]}"} --steps 1000000 --time-budget "$TRAIN_SECONDS" \
        --lr "${TRAIN_LR:-3e-4}" --warmup 50 --phase1-frac 1.0 --batch 16 --frames 17,33 --crop 64 \
        --eval-every 1000000 --threads 4 --workers 8 --seed "${TRAIN_SEED:-7}" \
        --out "$OUT_DIR/vae" >"$OUT_DIR/train.log" 2>&1 &
    TRAIN_PID=$!
fi

MAX_JOBS=16 step build 120 "$PY" -m pip install --no-build-isolation --no-deps -e .
step info 30 "$PY" -m chopgrad info
KERNEL_TESTS=$(ls tests/test_kernels_*.py tests/test_patch.py)
OMP_NUM_THREADS=2 step pytest_kernels 150 "$PY" -m pytest -n 8 -q -rfEs -p no:cacheprovider $KERNEL_TESTS
# The other tests run tiny models on the CPU: one worker per core, one thread each.
OMP_NUM_THREADS=1 step pytest_rest 240 "$PY" -m pytest -n 16 -q -rfEs -p no:cacheprovider \
    $(for f in $KERNEL_TESTS; do echo --ignore="$f"; done)
# A crashed test worker ("node down") leaves only a Python traceback: rerun the engine's error tests alone under
# gdb, when the machine has it, for the C++ frames.
if grep -q "node down" "$OUT_DIR/pytest_rest.log" 2>/dev/null && command -v gdb >/dev/null; then
    step engine_crash_backtrace 60 gdb -q -batch -ex run -ex bt --args "$PY" -m pytest -q -p no:cacheprovider \
        -p no:xdist tests/test_engine.py -k "rejects or propagates"
fi

if [ -n "$TRAIN_PID" ]; then
    wait "$TRAIN_PID"
    stamp "end train rc=$?"
    if [ "${INSTALL_TRAINED:-0}" = 1 ] && [ -f "$OUT_DIR/vae/default_vae.safetensors" ]; then
        cp "$OUT_DIR/vae/default_vae.safetensors" "$OUT_DIR/vae/default_vae_config.json" chopgrad/models/
        stamp "installed the trained weights and config as the default model"
    fi
fi

step bench_kernels 60 "$PY" benchmarks/bench_kernels.py --json "$OUT_DIR/kernels.json"
step probe 60 "$PY" -m chopgrad probe --device cuda --frames 33 --size 64 --out "$OUT_DIR/probe"
step bench 300 "$PY" -m chopgrad bench --device cuda --sizes 128 --frames 17 65 129 \
    --d-trunc 1 --no-progress --timeout 60 --out "$OUT_DIR/bench"
step acceptance 30 "$PY" benchmarks/acceptance.py "$OUT_DIR/bench/results.json"
step bench_bf16 90 "$PY" -m chopgrad bench --device cuda --dtype bf16 --sizes 128 --frames 17 129 \
    --d-trunc 1 --no-progress --timeout 60 --out "$OUT_DIR/bench_bf16"
stamp done
