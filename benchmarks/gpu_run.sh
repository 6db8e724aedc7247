#!/usr/bin/env bash
# The one prepared GPU run behind docs/gpu.md (issue 13), for the device tool's single short lease.
#
#   here:   python benchmarks/gpu_payload.py build && git rev-parse HEAD > gpu_payload/commit
#           python -m pip download --no-deps --only-binary=:all: timm==1.0.31 -d .whl   (the pinned timm)
#   there:  bash benchmarks/gpu_run.sh            (carry gpu_payload and .whl; results and logs.tgz land
#                                                  in $OUT; everything ends within GPU_RUN_BUDGET seconds)
#   check:  GPU_RUN_MODE=tiny OUT=/tmp/gpu-out bash benchmarks/gpu_run.sh   (the same steps on the CPU,
#           tiny settings, to check the script before a lease)
#
# 1. speed on a quiet device: simulated-quantized W4/A4 vs FP images/s at batch 256, eager (with a
#    kernel profile) and through torch.compile, and calibration dopq vs repq; at most SPEED_LIMIT s;
# 2. at once, side by side on the one GPU: the gpu-marked tests and block reconstructions at the
#    library's defaults (1024 images, batch 64, 1000 iterations per unit at 3-4 bits, QDrop by the
#    library's rule), each with the plain dopq row first; GPU_RUNS="arch:bits ..." picks them (default
#    Swin-Tiny at W3/A3 and W4/A4: the DeiT-Tiny rows were measured on 2026-11-30). Runs that share the
#    GPU report longer stage times than alone (on the H200, six side by side: DeiT-Tiny about 390 s,
#    Swin-Tiny over 460 s; Swin-Tiny alone 205 s); each row records its own peak GPU memory.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the results folder}
MODE=${GPU_RUN_MODE:-full}
BUDGET=${GPU_RUN_BUDGET:-570}
SPEED_LIMIT=${GPU_SPEED_LIMIT:-240}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
DATA=(--shared gpu_payload --data-file cifar10-protocol.tar.gz)
if [ "$MODE" = tiny ]; then
    DEVICE=cpu; export DOPQ_GPU_TEST_DEVICE=cpu
    SPEED=(--eval-subset 50 --repeats 1 --speed-batch 25 --models deit_tiny_patch16_224)
    RECON=(--eval-subset 50 --recon-calib-size 64 --recon-iters 2 --recon-batch-size 16)
    BUDGET=1500
else
    DEVICE=cuda
    SPEED=(--repeats 5 --speed-batch 256)
    RECON=()
fi
if compgen -G ".whl/*.whl" >/dev/null; then  # the pinned packages, where the machine has others
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

python3 benchmarks/gpu_payload.py unpack || exit 1
{
    echo "commit $(cat gpu_payload/commit 2>/dev/null || echo unknown)"
    python3 -c "import torch, timm, onnxruntime; print('torch', torch.__version__, 'timm', timm.__version__, 'onnxruntime', onnxruntime.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
} 2>&1 | tee "$LOGS/env.txt"

echo "== speed $(date +%T)"
timeout "$SPEED_LIMIT" python3 benchmarks/run.py speed "${DATA[@]}" --device "$DEVICE" --threads 4 --bits 4 \
    --speed-compile --speed-profile "${SPEED[@]}" --results-dir "$OUT" 2>&1 | tee "$LOGS/speed.txt"

RECON_LIMIT=$((BUDGET - SECONDS - 15))
echo "== tests and reconstructions $(date +%T), ${RECON_LIMIT} s each at most"
timeout 300 python3 -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider >"$LOGS/pytest_gpu.txt" 2>&1 &
for spec in ${GPU_RUNS:-swin_tiny_patch4_window7_224:3 swin_tiny_patch4_window7_224:4}; do
    arch=${spec%:*} bits=${spec#*:}
    name="recon_gpu_${arch%%_*}_w${bits}"
    timeout "$RECON_LIMIT" python3 benchmarks/run.py recon "${DATA[@]}" --device "$DEVICE" --threads 2 \
        --models "$arch" --bits "$bits" --recon-name "$name" \
        "${RECON[@]}" --results-dir "$OUT" >"$LOGS/$name.txt" 2>&1 &
done
wait
echo "== done $(date +%T)"
tail -n 3 "$LOGS/pytest_gpu.txt"
grep -h "top1" "$LOGS"/recon_gpu_*.txt
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$LOGS" .
