#!/usr/bin/env bash
# The GPU protocol (issue 12 item 7) as one script, in stages of falling priority, so that a short lease
# gets the figures that matter first:
#   0  (always first) python -m bench.gpu_check: every CUDA path of lrd_fx on a ResNet-18, OK or traceback
#      (at most GPU_CHECK_S seconds, default 90)
#   a  bf16 autocast + channels_last, batch 64, eager: ResNet-50, ViT-S/16, ConvNeXt-T, training and
#      inference, every lrd variant (the issue's targets)
#   b  the same under torch.compile, ResNet-50 and ViT-S/16 (original, lrd, lrd+search)
#   c  fp32 with TF32 on + channels_last, batch 64, eager, the three models
#   d  bf16 + channels_last at batch 256, eager, ResNet-50 and ViT-S/16
# Each model is its own harness run (<device>-<date>-<flags>.{json,csv,png}), so a run cut short keeps
# what finished; after each run everything written so far is packed into OUT_DIR/gpu-results.tar (the
# device tool returns at most 8 files). No stage starts once DEADLINE_S seconds have passed since the
# script began, and each run is stopped at the deadline.
#
#   bench/run_gpu.sh [OUT_DIR] [STAGES]       (default OUT_DIR bench/results, STAGES abcd)
#   DEADLINE_S=540 PYTHON=python3 bench/run_gpu.sh "$OUT" ab
#   DRY=1 bench/run_gpu.sh /tmp/gpu_dry       (CPU rehearsal: tiny models and batches, no --tf32)
# PACK_TO=FILE writes the tar (and FILE.log) there instead: on the device machine, whose image lacks
# tensorly, carry a folder of its wheel (.whl, git-ignored) and run
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   PACK_TO=$OUT/gpu-results.tar bench/run_gpu.sh /tmp/gpu abcd
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
stages=${2:-abcd}
py=${PYTHON:-python3}
deadline=${DEADLINE_S:-540}
mkdir -p "$out"
start=$(date +%s)
log="$out/gpu-run.log"
lrd="original,traced,lrd,lrd+search,lrd+search+budget,lrd+round8,lrd+search+seqfreeze,lrd+fuse"

if [[ -n "${DRY:-}" ]]; then
    device=(--device cpu --size 32 --rounds 2 --warmup 0 --search-budget 5 --search-repeats 3 --threads 2)
    cnn=tiny_cnn; vit=vit_tiny_patch16_224; convnext=resnet10t; b64=4; b256=8; tf32=()
else
    device=(--device cuda --size 224 --rounds 7 --search-budget 45)
    cnn=resnet50; vit=vit_small_patch16_224; convnext=convnext_tiny; b64=64; b256=256; tf32=(--tf32)
fi

pack_to=${PACK_TO:-$out/gpu-results.tar}
pack() {
    local tmp="$pack_to.tmp"
    (cd "$out" && tar -cf "$tmp" --exclude=gpu-results.tar -- *.json *.csv *.png gpu-run.log 2>/dev/null)
    mv -f "$tmp" "$pack_to" 2>/dev/null || true
    [[ "$pack_to" != "$out/gpu-results.tar" ]] && cp -f "$log" "$pack_to.log" 2>/dev/null
    return 0
}

# one harness run: bench MODEL BATCH [flags...]
bench() {
    local model=$1 batch=$2
    shift 2
    local left=$((deadline - ($(date +%s) - start)))
    if ((left < 30)); then
        echo "run_gpu: skipped $model batch $batch $* (deadline ${deadline}s reached)" | tee -a "$log"
        return 0
    fi
    echo "run_gpu: $model batch $batch $* (${left}s left)" | tee -a "$log"
    PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=20 "$left" \
        "$py" -m bench --models "$model" --batch "$batch" "${device[@]}" --no-progress --out "$out" "$@" \
        2>&1 | tee -a "$log"
    echo "run_gpu: exit ${PIPESTATUS[0]}" | tee -a "$log"
    pack
}

[[ -z "${DRY:-}" ]] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"; }
"$py" -c "import torch, lrd_fx; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$log"
check=(--budget 8)
[[ -n "${DRY:-}" ]] && check=(--device cpu --budget 2)
PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=10 "${GPU_CHECK_S:-90}" "$py" -m bench.gpu_check "${check[@]}" \
    2>&1 | tee -a "$log"
echo "run_gpu: gpu_check exit ${PIPESTATUS[0]}" | tee -a "$log"
pack

for stage in $(echo "$stages" | grep -o .); do
    case $stage in
    a)
        bench $cnn $b64 --amp bf16 --channels-last --variants "$lrd"
        bench $vit $b64 --amp bf16 --variants "$lrd"
        bench $convnext $b64 --amp bf16 --channels-last --variants "$lrd" ;;
    b)
        bench $cnn $b64 --amp bf16 --channels-last --compile --variants original,lrd,lrd+search
        bench $vit $b64 --amp bf16 --compile --variants original,lrd,lrd+search ;;
    c)
        for m in $cnn $convnext; do bench "$m" $b64 "${tf32[@]}" --channels-last --variants "$lrd"; done
        bench $vit $b64 "${tf32[@]}" --variants "$lrd" ;;
    d)
        bench $cnn $b256 --amp bf16 --channels-last --variants "$lrd"
        bench $vit $b256 --amp bf16 --variants "$lrd" ;;
    *)
        echo "run_gpu: unknown stage '$stage' (stages: a b c d)" | tee -a "$log"; exit 2 ;;
    esac
done
echo "run_gpu: done in $(($(date +%s) - start))s; results in $out (and $pack_to)" | tee -a "$log"
pack
