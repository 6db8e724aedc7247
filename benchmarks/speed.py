"""Speed of the simulated-quantized model and of calibration, on any device (the GPU issue's item 4).

    python benchmarks/run.py speed --device cuda --models deit_tiny_patch16_224 --speed-batch 256 --speed-compile

Per model: images/s of the float model and of dopq W4/A4 / W3/A3 (simulated quantization) over the
strided evaluation images held on the device (model time only, so the ratio is the quantizers' cost,
not the loader's), timed with the device synchronized, median of ``--repeats`` passes after a warm-up
pass, the models' passes interleaved; and the calibration wall time of repq and dopq on the 32 calibration images, alternated, median
of ``--repeats`` after one untimed run of each.

``--speed-compile`` adds the same timings through ``torch.compile`` (``dopq.evaluate.CompiledModel``,
what ``--compile`` runs), the compilation time, and how the compiled model agrees with the eager one
(top-1 of each, identical predictions, largest logit difference). ``--speed-profile`` records the
eager dopq model's busiest kernels for one batch (torch.profiler).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dopq.api import quantize
from dopq.config import get_preset
from dopq.data import load_images
from dopq.evaluate import CompiledModel
from dopq.modules import constant_quantization


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def images_per_second(
    models: dict[str, nn.Module], images: torch.Tensor, batch: int, repeats: int
) -> dict[str, float]:
    """Median images/s of each model over ``images`` (already on their device) in batches of
    ``batch``: one warm-up pass each, then ``repeats`` rounds of one pass per model in turn, so that
    load from anything else running falls on every model alike and their ratios hold."""
    device = images.device

    def one_pass(model: nn.Module) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, images.shape[0], batch):
            model(images[i : i + batch])
        _sync(device)
        return time.perf_counter() - t0

    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(constant_quantization(model))  # as dopq.evaluate runs a model
        for model in models.values():
            one_pass(model)  # warm-up: kernels chosen, caches filled
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(one_pass(model))
    return {name: images.shape[0] / statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def predictions(model: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    """Logits of every image, in batches."""
    with constant_quantization(model):
        return torch.cat([model(images[i : i + batch]).float() for i in range(0, images.shape[0], batch)])


def compiled_agreement(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int
) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` through ``torch.compile``, with its compile time (the first pass over every batch
    shape) and its agreement with the eager model on the same images."""
    eager = predictions(model, images, batch)
    compiled = CompiledModel(model)
    device = images.device
    _sync(device)
    t0 = time.perf_counter()
    fused = predictions(compiled, images, batch)
    _sync(device)
    first_pass = time.perf_counter() - t0
    labels = labels.to(device)
    return compiled, {
        "first_pass_seconds": first_pass,
        "top1_eager": float((eager.argmax(1) == labels).float().mean()),
        "top1_compiled": float((fused.argmax(1) == labels).float().mean()),
        "identical_top1": float((eager.argmax(1) == fused.argmax(1)).float().mean()),
        "max_logit_diff": float((eager - fused).abs().max()),
    }


class _OpCounter(TorchDispatchMode):
    """Counts the operators dispatched to a backend (views and tiny scalar ops included)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def ops_per_forward(model: nn.Module, images: torch.Tensor) -> int:
    """Operators one eager forward pass dispatches, as in an evaluation (after a first pass): on a
    GPU each is at least one kernel launch, so this is what the eager simulation pays per batch
    whatever the batch size."""
    with constant_quantization(model):
        model(images)
        with _OpCounter() as counter:
            model(images)
    return counter.count


@torch.inference_mode()
def kernel_profile(model: nn.Module, images: torch.Tensor, top: int = 12) -> dict[str, Any]:
    """The busiest device (or CPU) ops of one forward pass, and the host time against device time:
    whether the eager simulation waits on kernel launches or on memory."""
    from torch.profiler import ProfilerActivity, profile

    device = images.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with constant_quantization(model):
        model(images)
        _sync(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            model(images)
            host = time.perf_counter() - t0
            _sync(device)
            wall = time.perf_counter() - t0
    stats = prof.key_averages()
    on_device = device.type == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    rows = sorted(stats, key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    return {
        "host_seconds_to_enqueue": host,
        "wall_seconds": wall,
        "ops": sum(e.count for e in stats if e.key.startswith("aten::")),
        "device_kernel_seconds": sum(getattr(e, key, 0.0) for e in stats) / 1e6 if on_device else None,
        "top": [{"name": e.key, "calls": e.count, "ms": getattr(e, key, 0.0) / 1e3} for e in rows],
    }


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


def _eager_row(args: Any, arch: str, model: nn.Module, images: torch.Tensor, calib: torch.Tensor) -> dict:
    """Eager images/s of FP and dopq at each width, timed interleaved (and a profile), and the
    calibration times."""
    batch = args.speed_batch
    row: dict[str, Any] = {
        "model": arch,
        "batch": batch,
        "images": int(images.shape[0]),
        "passes": "interleaved",
    }
    row["fp_ops_per_forward"] = ops_per_forward(model, images[:2])
    quantized = {
        f"dopq_w{bits}a{bits}": quantize(
            copy.deepcopy(model), calib, get_preset("dopq", w_bits=bits, a_bits=bits), progress=False
        )
        for bits in args.bits
    }
    speeds = images_per_second({"fp": model, **quantized}, images, batch, args.repeats)
    row["fp_images_per_second"] = speeds["fp"]
    for bits in args.bits:
        name, q = f"dopq_w{bits}a{bits}", quantized[f"dopq_w{bits}a{bits}"]
        row[f"{name}_images_per_second"] = speeds[name]
        row[f"{name}_over_fp"] = speeds[name] / speeds["fp"]
        row[f"{name}_ops_per_forward"] = ops_per_forward(q, images[:2])
        if args.speed_profile and bits == args.bits[0]:
            row[f"{name}_profile"] = kernel_profile(q, images[:batch])
    times = calibration_seconds(model, calib, ("repq", "dopq"), args.repeats)
    row["calib_seconds"] = times
    row["dopq_over_repq_calibration"] = statistics.median(times["dopq"]) / statistics.median(times["repq"])
    return row


def _compiled_into(row: dict, args: Any, model: nn.Module, images, labels, calib) -> None:
    """The same models through torch.compile, added to ``row``."""
    batch, bits = args.speed_batch, args.bits[0]
    compiled_fp, row["compiled_fp"] = compiled_agreement(model, images, labels, batch)
    q = quantize(copy.deepcopy(model), calib, get_preset("dopq", w_bits=bits, a_bits=bits), progress=False)
    compiled_q, fused = compiled_agreement(q, images, labels, batch)
    # eager FP again in the same run: both ratios from one interleaved timing
    timed = {"fp": compiled_fp, "dopq": compiled_q, "eager_fp": model}
    speeds = images_per_second(timed, images, batch, args.repeats)
    row["compiled_fp"]["images_per_second"] = speeds["fp"]
    fused["images_per_second"] = speeds["dopq"]
    fused["over_compiled_fp"] = speeds["dopq"] / speeds["fp"]
    fused["over_eager_fp"] = speeds["dopq"] / speeds["eager_fp"]
    row[f"compiled_dopq_w{bits}a{bits}"] = fused
    torch._dynamo.reset()  # the compiled graphs hold the models' tensors


def suite_speed(args: Any, workload: Any, save: Any) -> None:
    """Eager rows for every model first, then (``--speed-compile``) the compiled timings of each at
    the first width: a run stopped by a time limit keeps what it measured (saved after each step)."""
    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    inputs = {}

    def saved() -> None:
        if device.type == "cuda":
            for row in rows:
                row["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        save(f"speed_{device.type}{args.suffix}", {"rows": rows, "settings": vars(args)})

    for arch in args.models:
        work = workload(args, arch)
        model = work.model.to(device).eval()
        loaded = load_images(work.eval_dataset, work.eval_indices, num_workers=work.settings.workers)
        inputs[arch] = (model, loaded.images.to(device), loaded.labels, work.calib_images.to(device))
        rows.append(_eager_row(args, arch, *inputs[arch][:2], inputs[arch][3]))
        print(f"  {arch}: { ({k: v for k, v in rows[-1].items() if k != 'calib_seconds'}) }", flush=True)
        saved()
    if args.speed_compile:
        for row, arch in zip(rows, args.models, strict=True):
            _compiled_into(row, args, *inputs[arch])
            print(f"  {arch} compiled: { ({k: v for k, v in row.items() if k.startswith('compiled')}) }")
            saved()
