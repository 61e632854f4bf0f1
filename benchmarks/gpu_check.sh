#!/usr/bin/env bash
# Everything issue 5 asks of a machine with a CUDA GPU, in one run of about 8 minutes:
#   1. the GPU tests (pytest -m gpu: the LRN's torch path on CUDA, the augmentation's
#      whole-batch gathers against the CPU loop, a CUDA run's weights wherever it augments,
#      a CUDA evaluation against the CPU's);
#   2. alexnet bench on the GPU at batch 128 and 256 (bf16 autocast, channels-last,
#      torch.compile), training and inference, table and JSON;
#   3. the input pipeline beside the GPU: loader throughput and each worker's CPU per image,
#      then training fed from memory against training fed by the loader, with the
#      augmentation in the loader and on the GPU, 0/4/8 workers.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]     (default $OUT, else gpu-results)
#
# DEVICE=cpu QUICK=1 runs the same steps small on a CPU, to check the script itself.
# It uses the machine's own python3 and torch (PYTHON= to choose another), with this
# checkout on PYTHONPATH, so nothing is installed. Each step has its own time limit and a
# failed step does not stop the next; the exit code is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${1:-${OUT:-gpu-results}}"
mkdir -p "$RES"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ALEXNET_CACHE="${ALEXNET_CACHE:-/tmp/alexnet-cache}"
failed=0

step() {  # step NAME SECONDS COMMAND...: run it, its output to RES/NAME.log and the screen
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$RES/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
torch.backends.cudnn.version(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    echo "cores: $(nproc)"
} 2>&1 | tee "$RES/machine.txt"

if [ -n "${QUICK:-}" ]; then  # a dry run of this script's mechanics, e.g. DEVICE=cpu QUICK=1 on a laptop
    batches=(16) steps=2 images=96 lbatch=16 tbatch=8 tsteps=2 workers=(0 1)
else
    batches=(128 256) steps=20 images=2048 lbatch=128 tbatch=256 tsteps=8 workers=(0 4 8)
fi
compile=(--compile)
[ "$DEVICE" = cuda ] || compile=()

export ALEXNET_TEST_DEVICE=$DEVICE
step tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
    tests/test_lrn.py
step bench 240 "$PY" -m alexnet bench --device "$DEVICE" --batch "${batches[@]}" --steps $steps "${compile[@]}" \
    --markdown --json "$RES/bench-$DEVICE.json"
step loader 150 "$PY" benchmarks/bench_loader.py --images $images --batch $lbatch --workers "${workers[@]}" \
    --train-batch $tbatch --train-steps $tsteps --rounds 2 --train-workers "${workers[@]}" --worker-nice 0 \
    --device "$DEVICE" --json "$RES/loader-$DEVICE.json"
echo "failed steps: $failed"
exit "$failed"
