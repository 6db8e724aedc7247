#!/usr/bin/env bash
# The main job: quantize the shared DeiT-Tiny reference at W4/A4 with DopQ-ViT and print FP vs
# quantized accuracy (strided 1000 CIFAR-10 test images) and timings; writes results/demo.json/.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
SHARED=${DOPQ_SHARED:-../shared}
exec .venv/bin/dopq quantize \
    --model deit_tiny_patch16_224 \
    --checkpoint "$SHARED/models/deit_tiny_patch16_224.cifar10.safetensors" \
    --data "$SHARED/data/cifar10-jpeg.tar.gz" \
    --method "${METHOD:-dopq}" --w-bits 4 --a-bits 4 \
    --calib-size 32 --seed 0 --eval-subset 1000 \
    --output results/demo.json "$@"
