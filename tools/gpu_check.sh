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
#
# PYTHON (default python3) is the interpreter; full logs go to $OUT (default output/gpu_check);
# SUITE_LIMIT (default 330) bounds the whole suite's seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-output/gpu_check}
mkdir -p "$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
TRAIN=1
SUITE=1
for arg in "$@"; do
  case "$arg" in
    --no-train) TRAIN=0 ;;
    --no-suite) SUITE=0 ;;
    *) echo "gpu_check.sh: unknown option $arg (expected --no-train, --no-suite)"; exit 2 ;;
  esac
done
CORES=$(nproc)

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
step environment 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
  $PY -c \"import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', \
torch.version.cuda, '| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); \
import importlib.util as u; print('installed:', {m: u.find_spec(m) is not None for m in \
('triton', 'pytorch3d', 'viser', 'playwright', 'xdist', 'pytest_timeout', 'tensorboard')})\""
step cuda_tests 300 "$PY" -m pytest -q -rA -p no:cacheprovider --timeout 240 tests -k cuda
step kernel 120 "$PY" tools/bench.py kernel --device cuda
step renderer 180 "$PY" tools/bench.py renderer --device cuda --sizes 64 256 --subdivide 0 2 --batch 8 \
  --backends native-triton native-tensor --no-memory --repeats 10
if [ "$TRAIN" = 1 ]; then
  step synthetic 180 "$PY" data/make_synthetic.py --out "$WORK/synth" --sequences 2 --frames 16 --cameras 12
  # Each batch size as configured (the original's settings), then with the encoder's GPU options
  # (channels-last memory order; and bf16 autocast besides), side by side in one process.
  for batch in 8 32; do
    step "train_b$batch" 300 "$PY" tools/bench.py train --gpu 0 --data_dir "$WORK/synth" --iterations 20 --warmup 5 \
      --set train_batch_size=$batch --variant "channels_last=true" --variant "channels_last=true encoder_bf16=true"
  done
  # Personalisation's time on the GPU: 6 frames x 12 depth maps of 64x64 (report.json: seconds).
  step personalise 180 "$PY" main/personalise.py --gpu 0 --data_dir "$WORK/synth" --frames 0-5 --quiet \
    --out "$WORK/personalise"
  cp "$WORK/personalise/report.json" "$LOG/personalise_report.json" 2>/dev/null || true
fi
if [ "$SUITE" = 1 ]; then
  # -v: each test's outcome is printed as it ends, so a run cut by the step's limit still names
  # the tests that failed; --durations: where the time goes.
  step suite "${SUITE_LIMIT:-330}" "$PY" -m pytest -v -p no:cacheprovider -n "$CORES" --timeout 150 -rfE \
    --durations=15
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
  for batch in 8 32; do
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
