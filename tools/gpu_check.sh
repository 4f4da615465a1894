#!/usr/bin/env bash
# The GPU check: one command that prints the GPU, the CUDA tests' results, the native renderer's
# kernel and renderer tables on CUDA, the training iteration's stage table at batch 8 and 32 (the
# released configuration on a synthetic set at the released 512 x 334; and its samples/s with the
# encoder's channels-last and bf16 options), and the whole suite's summary
# under pytest-xdist with the failing tests' names. Under 8 minutes on one GPU; each step has a time
# limit, so a hang costs its step only. Tests whose packages are missing (PyTorch3D, viser,
# playwright) skip with their reason.
#
#   bash tools/gpu_check.sh              # everything
#   bash tools/gpu_check.sh --no-train   # leave out the synthetic set and the training iterations
#   bash tools/gpu_check.sh --no-suite   # leave out the whole suite
#   bash tools/gpu_check.sh --rehearsal  # every step on this machine's CPU at the smallest sizes
#
# The rehearsal runs the same commands with the same options, on the CPU (the renderer's CUDA path
# in Triton's interpreter) at sizes that take a few minutes, and a few tests for the suite: so a
# mistake in this script or in a benchmark's options shows before a lent GPU's minutes are spent
# (tests/test_gpu_check.py runs it).
#
# PYTHON (default python3) is the interpreter; full logs go to $OUT (default output/gpu_check);
# SUITE_LIMIT (default 330) bounds the whole suite's seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
TRAIN=1
SUITE=1
REHEARSAL=0
for arg in "$@"; do
  case "$arg" in
    --no-train) TRAIN=0 ;;
    --no-suite) SUITE=0 ;;
    --rehearsal) REHEARSAL=1 ;;
    *) echo "gpu_check.sh: unknown option $arg (expected --no-train, --no-suite, --rehearsal)"; exit 2 ;;
  esac
done
CORES=$(nproc)
PY=${PYTHON:-python3}
LOG=${OUT:-output/gpu_check}
mkdir -p "$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
if [ "$REHEARSAL" = 0 ]; then
  DEVICE=cuda
  GPU=(--gpu 0)
  KERNEL=()                                      # the eight settings of the table
  RENDERER=(--sizes 64 256 --subdivide 0 2 --batch 8 --repeats 10)
  SYNTHETIC=(--sequences 2 --frames 16 --cameras 12)
  BATCHES="8 32"
  TRAIN_SIZE=(--iterations 20 --warmup 5)        # the released configuration
  PERSONALISE=(--frames 0-5)                     # 6 frames x 12 depth maps of 64x64
  SUITE_TESTS=()                                 # all of them
else
  export TRITON_INTERPRET=1
  DEVICE=cpu
  GPU=()
  KERNEL=(--size 32 --views 2 --batch 1 --repeats 1 --tiles 8x8x16x4)
  RENDERER=(--sizes 32 --subdivide 0 --batch 1 --views 2 --repeats 1)
  SYNTHETIC=(--sequences 1 --frames 4 --cameras 6 --image_size 128x84 --depth_size 128x84)
  BATCHES="2"
  TRAIN_SIZE=(--iterations 1 --warmup 1 --set resnet_type=18 --set input_img_shape=32x32
              --set rendered_img_shape=16x16 --set render_view_num=2 --set num_thread=1
              --set renderer_backend=native --set native_rasteriser=triton)  # the GPU's renderer, as there
  PERSONALISE=(--frames 0-1 --iterations 2 --render_size 16x16 --option views_per_step=1)
  SUITE_TESTS=(tests/test_docs.py)
fi

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, output in $LOG/NAME.log
  local name=$1 limit=$2
  shift 2
  local start
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(($(date +%s) - start)) s (limit $limit s)" | tee -a "$LOG/steps.log"
}

: >"$LOG/steps.log"
step environment 60 bash -c "{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  2>/dev/null || echo 'nvidia-smi: none'; }; \
  $PY -c \"import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', \
torch.version.cuda, '| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); \
import importlib.util as u; print('installed:', {m: u.find_spec(m) is not None for m in \
('triton', 'pytorch3d', 'viser', 'playwright', 'xdist', 'pytest_timeout', 'tensorboard')})\""
step cuda_tests 300 "$PY" -m pytest -q -rA -p no:cacheprovider --timeout 240 tests -k cuda
step kernel 120 "$PY" tools/bench.py kernel --device $DEVICE "${KERNEL[@]}"
step renderer 180 "$PY" tools/bench.py renderer --device $DEVICE "${RENDERER[@]}" \
  --backends native-triton native-tensor --no-memory
if [ "$TRAIN" = 1 ]; then
  step synthetic 180 "$PY" data/make_synthetic.py --out "$WORK/synth" "${SYNTHETIC[@]}"
  # Each batch size as configured (the original's settings), then with the encoder's GPU options
  # (channels-last memory order; and bf16 autocast besides), side by side in one process.
  for batch in $BATCHES; do
    step "train_b$batch" 300 "$PY" tools/bench.py train "${GPU[@]}" --data_dir "$WORK/synth" "${TRAIN_SIZE[@]}" \
      --set train_batch_size=$batch --variant "channels_last=true" --variant "channels_last=true encoder_bf16=true"
  done
  # Personalisation's time on the GPU: 6 frames x 12 depth maps of 64x64 (report.json: seconds).
  step personalise 180 "$PY" main/personalise.py "${GPU[@]}" --data_dir "$WORK/synth" "${PERSONALISE[@]}" --quiet \
    --out "$WORK/personalise"
  cp "$WORK/personalise/report.json" "$LOG/personalise_report.json" 2>/dev/null || true
fi
if [ "$SUITE" = 1 ]; then
  # -v: each test's outcome is printed as it ends, so a run cut by the step's limit still names
  # the tests that failed; --durations: where the time goes.
  step suite "${SUITE_LIMIT:-330}" "$PY" -m pytest -v -p no:cacheprovider -n "$CORES" --timeout 150 -rfE \
    --durations=15 "${SUITE_TESTS[@]}"
fi

echo
echo "================================================================ summary"
cat "$LOG/environment.log"
echo "---- CUDA tests"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|: cpu .*cuda" "$LOG/cuda_tests.log" | tail -40
echo "---- kernel"
tail -n 12 "$LOG/kernel.log"
echo "---- renderer"
tail -n 8 "$LOG/renderer.log"
if [ "$TRAIN" = 1 ]; then
  for batch in $BATCHES; do
    echo "---- training iteration, batch $batch"
    grep -B2 -A11 -m1 "^stage " "$LOG/train_b$batch.log"             # the table as configured
    tail -n 5 "$LOG/train_b$batch.log"                              # the variants side by side
  done
  echo "---- personalisation"
  tail -n 4 "$LOG/personalise.log"
fi
if [ "$SUITE" = 1 ]; then
  echo "---- suite"
  grep -E " (FAILED|ERROR) |^(FAILED|ERROR)|passed|failed|Timeout" "$LOG/suite.log" | tail -40
  grep -A16 "slowest 15" "$LOG/suite.log" | tail -16
fi
echo "---- steps"
cat "$LOG/steps.log"
