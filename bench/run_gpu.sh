#!/usr/bin/env bash
# The GPU benchmark of the README: ResNet-50 and ViT-S/16 at batch 64, fp32 and bf16 autocast, training
# and inference, every variant of the harness. Writes <device>-<date>[-bf16].{json,csv,png} to OUT_DIR.
#   bench/run_gpu.sh [OUT_DIR] [extra harness flags]        (default OUT_DIR: bench/results)
# The rank search of the first run fills the timing cache; the bf16 run re-uses it (the search times
# layers in the model's dtype, fp32, whatever the autocast).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
shift || true
py=${PYTHON:-python3}
for amp in "" "--amp bf16"; do
    # shellcheck disable=SC2086
    PYTHONUNBUFFERED=1 "$py" -m bench --models resnet50,vit_small_patch16_224 --batch 64 --size 224 \
        --device cuda $amp --rounds 7 --search-budget 45 --no-progress --out "$out" "$@"
done
