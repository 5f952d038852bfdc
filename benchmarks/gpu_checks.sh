#!/bin/bash
# GPU measurements of the shipped weights and code, in priority order, for a device
# call of under 10 minutes (the steps' limits add up to 525 s; logs go to $OUT).
#   bash benchmarks/gpu_checks.sh COCO_FOLDER [DEVICE]
# With pycocotools carried as a wheel in .whl/ (the device image lacks it).
DATA=${1:?a COCO folder: images/ + instances.json}; D=${2:-cuda}; OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
[ "$D" = cpu ] || [ ! -d .whl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
S="python3 benchmarks/speed.py $DATA --device $D --no-peer"
step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; }
step e2e_default 150 $S --limit 0 --e2e 1920
step stages_agree 110 $S --limit 60 --agree 20
step recall_default 70 python3 benchmarks/recall.py "$DATA" --device "$D" --no-peer
step recall_fp32 70 python3 benchmarks/recall.py "$DATA" --device "$D" --no-peer --set precision=fp32
step e2e_b16_w14 80 $S --limit 0 --e2e 1920 --batch-size 16 --workers 14
step profile 45 python3 benchmarks/profile_batch.py "$DATA" --device "$D" --batch-size 8
echo done
