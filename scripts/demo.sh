#!/usr/bin/env bash
# The main job: quantize the shared DeiT-Tiny reference at W4/A4 with the recommended preset (DopQ-ViT
# plus the calibration-time gains that win at each width) and print FP vs
# quantized accuracy (strided 1000 CIFAR-10 test images) and timings; writes results/demo.json/.md.
# Reads ../shared (or $DOPQ_SHARED) when present, else the bundled demo/ (the same checkpoint, the
# same 1000 test images, 256 CIFAR-10 train images to calibrate from; scripts/make_demo_bundle.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
SHARED=${DOPQ_SHARED:-../shared}
CKPT="$SHARED/models/deit_tiny_patch16_224.cifar10.safetensors"
DATA="$SHARED/data/cifar10-jpeg.tar.gz"
if [ ! -f "$CKPT" ] || [ ! -f "$DATA" ]; then
    echo "dopq demo: no $SHARED here; using the bundled demo/ (DeiT-Tiny, 256 train + the strided 1000 test CIFAR-10 images)" >&2
    CKPT=demo/deit_tiny_patch16_224.cifar10.safetensors
    DATA=demo/cifar10-demo.tar
fi
exec .venv/bin/dopq quantize \
    --model deit_tiny_patch16_224 \
    --checkpoint "$CKPT" \
    --data "$DATA" \
    --method "${METHOD:-recommended}" --w-bits 4 --a-bits 4 \
    --calib-size 32 --seed 0 --eval-subset 1000 \
    --output results/demo.json "$@"
