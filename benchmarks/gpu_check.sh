#!/usr/bin/env bash
# Every CUDA check of covidxr in one go, for a GPU machine held only for minutes:
#   1. versions and the card;
#   2. python -m covidxr.bench: training (fp32 vs AMP + channels_last, MFU), training fed by the real loaders
#      against synthetic tensors, loader epochs, head-only epochs, inference at batch 1 and 32;
#   3. torchrun with the NCCL backend: a short resnet50 run on real images with --gpu-cache;
#   4. evaluation and prediction + Grad-CAM of that checkpoint on CUDA.
# Usage: bash benchmarks/gpu_check.sh DATA [OUT]   (DATA: a covidxr dataset folder; OUT: where logs go)
# Needs covidxr importable (installed, or run from the checkout: the script puts it on PYTHONPATH).
# BENCH_ARGS and TRAIN_ARGS replace the benchmark's and the training run's settings (a quick CPU dry run).
set -uo pipefail
DATA=${1:?usage: bash benchmarks/gpu_check.sh DATA [OUT]}
OUT=${2:-${OUT:-/tmp/covidxr-gpu-check}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
COVIDXR_CACHE=$(mktemp -d) && export COVIDXR_CACHE
WORK=$(mktemp -d)
RUN=$WORK/run
BENCH_ARGS=${BENCH_ARGS:--b 256 --steps 30 --images 256 --repeats 3 -j 16}
TRAIN_ARGS=${TRAIN_ARGS:---arch resnet50 --img-size 224 --epochs 3 --freeze-epochs 1 --batch-size 64 --gpu-cache on}

step() {  # step NAME COMMAND...: run, then print its exit status and seconds
    local name=$1 start=$SECONDS rc
    shift
    echo "== $name: $*"
    "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
}

{
    step versions "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
    # shellcheck disable=SC2086  # the settings are meant to split into arguments
    step bench timeout 330 "$PY" -m covidxr.bench --data "$DATA" $BENCH_ARGS
    # shellcheck disable=SC2086
    step torchrun timeout 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m covidxr.train \
        --data "$DATA" --weights none $TRAIN_ARGS --out "$RUN"
    step evaluate timeout 120 "$PY" -m covidxr.evaluate --checkpoint "$RUN/best.pt" --data "$DATA" --split all \
        --bootstrap 200 --out "$WORK/eval"
    mapfile -t images < <(find "$DATA" -type f \( -name '*.png' -o -name '*.jp*g' \) | sort | head -n 8)
    step predict timeout 90 "$PY" -m covidxr.predict --checkpoint "$RUN/best.pt" --cam gradcam \
        --out "$WORK/predict" "${images[@]}"
    ls "$WORK/predict" | head -n 4
    cp "$RUN/history.csv" "$OUT/history.csv"
    cp "$WORK/eval/metrics.json" "$OUT/metrics.json"
} 2>&1 | tee "$OUT/gpu_check.log"
