#!/usr/bin/env bash
# One prepared GPU run (device tool): dopq with and without block reconstruction at the paper's default
# settings (1024 images, batch 64, 1000 iterations per unit at 3-4 bits) on one shared model.
# The payload folder gpu_payload/ (git-ignored) holds the model and a CIFAR-10 subset archive: the
# 1024 reconstruction images of the seeded train permutation and the whole test split.
# To rebuild it: copy ../shared/models/MODEL.cifar10.{safetensors,json} into gpu_payload/, and write
# gpu_payload/cifar10-subset.tar.gz with train/ holding the files at indices randperm(50000, seed 0)[:1024]
# of the ImageFolder-ordered train split (class folders kept) plus the whole test/ split. The device
# tool copies at most 64 MiB: carry one model per call (the Swin checkpoint is 55 MB).
# Usage there: bash benchmarks/gpu_recon.sh MODEL [benchmarks/run.py options]   (results land in $OUT)
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1
model=$1; shift
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
python3 benchmarks/run.py recon --shared gpu_payload --data-file cifar10-subset.tar.gz --device cuda \
    --models "$model" --recon-name "recon_gpu_$model" --results-dir "$OUT" "$@" 2>&1 | tee "$OUT/log_$model.txt"
nvidia-smi --query-gpu=name,memory.used --format=csv
