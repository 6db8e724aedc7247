"""Speed of the simulated-quantized model and of calibration, on any device (the GPU issue's item 4).

    python benchmarks/run.py speed --device cuda --models deit_tiny_patch16_224 --speed-batch 256

Per model: images/s of the float model and of dopq W4/A4 / W3/A3 (simulated quantization) over the
strided evaluation images held on the device (model time only, so the ratio is the quantizers' cost,
not the loader's), timed with the device synchronized, median of ``--repeats`` passes after a warm-up
pass; and the calibration wall time of repq and dopq on the 32 calibration images, alternated, median
of ``--repeats`` after one untimed run of each.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from dopq.api import quantize
from dopq.config import get_preset
from dopq.data import load_images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def images_per_second(model: nn.Module, images: torch.Tensor, batch: int, repeats: int) -> float:
    """Median images/s of ``model`` over ``images`` (already on its device) in batches of ``batch``."""
    device = images.device

    def one_pass() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, images.shape[0], batch):
            model(images[i : i + batch])
        _sync(device)
        return time.perf_counter() - t0

    one_pass()  # warm-up: kernels chosen, caches filled
    return images.shape[0] / statistics.median(one_pass() for _ in range(repeats))


def calibration_seconds(
    model: nn.Module, images: torch.Tensor, methods: tuple[str, ...], repeats: int
) -> dict[str, list[float]]:
    """Wall time of each preset's calibration at W4/A4, alternated between presets."""
    device = images.device
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(repeats + 1):
        for method in methods:
            candidate = copy.deepcopy(model)
            _sync(device)
            t0 = time.perf_counter()
            quantize(candidate, images, get_preset(method, w_bits=4, a_bits=4), progress=False)
            _sync(device)
            if rep:  # the first round is a warm-up
                times[method].append(time.perf_counter() - t0)
    return times


def suite_speed(args: Any, workload: Any, save: Any) -> None:
    rows = []
    for arch in args.models:
        work = workload(args, arch)
        device = torch.device(args.device)
        model = work.model.to(device).eval()
        images = load_images(work.eval_dataset, work.eval_indices, num_workers=work.settings.workers).images
        images = images.to(device)
        calib = work.calib_images.to(device)
        row: dict[str, Any] = {"model": arch, "batch": args.speed_batch, "images": int(images.shape[0])}
        row["fp_images_per_second"] = images_per_second(model, images, args.speed_batch, args.repeats)
        for bits in args.bits:
            q = quantize(
                copy.deepcopy(model), calib, get_preset("dopq", w_bits=bits, a_bits=bits), progress=False
            )
            ips = images_per_second(q, images, args.speed_batch, args.repeats)
            row[f"dopq_w{bits}a{bits}_images_per_second"] = ips
            row[f"dopq_w{bits}a{bits}_over_fp"] = ips / row["fp_images_per_second"]
            del q
        times = calibration_seconds(model, calib, ("repq", "dopq"), args.repeats)
        row["calib_seconds"] = times
        row["dopq_over_repq_calibration"] = statistics.median(times["dopq"]) / statistics.median(
            times["repq"]
        )
        if device.type == "cuda":
            row["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
        print(f"  {arch}: { ({k: v for k, v in row.items() if k != 'calib_seconds'}) }", flush=True)
        save(f"speed_{device.type}", {"rows": rows, "settings": vars(args)})
