"""The ``data`` suite: do streamed evaluation images keep up with the model, and is memory flat?

    python benchmarks/run.py data [--threads N] [--eval-subset 1000] [--batch-size 100]

Throughput: the shared DeiT-Tiny (FP) evaluates the strided CIFAR-10 test subset straight from the
archive through :func:`dopq.data.make_loader` with the default workers, against the model alone on
pre-made tensors (same batch size, same torch threads, same number of images; measured before and
after, the ratio uses their mean), and with the images decoded in the main process (0 workers).

Memory: peak RSS of the real command line, ``dopq evaluate --quantized``, under GNU ``time -v``
(its "Maximum resident set size": the largest single process, main or loader worker), for all
10 000 CIFAR-10 test images (a W8/A8 DeiT-Tiny) and for a generated ImageNet-layout folder
(``val/<wnid>/<name>.JPEG``, 1000 classes) of 50 000 small JPEGs against one of 5 000 (a W8/A8
timm ``test_vit``, which keeps the run short: what grows with the image count is the data side).
The folders are written under ``--data-tmp`` (default ``$TMPDIR/dopq-data-bench``), never into the
repository, and reused by later runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image

from dopq.api import quantize
from dopq.config import get_preset
from dopq.data import (
    build_transform,
    calibration_indices,
    card_path_for,
    default_workers,
    load_batch,
    make_loader,
    open_split,
    preprocess_from_card,
    preprocess_from_model,
    strided_indices,
)
from dopq.environment import command_line
from dopq.evaluate import evaluate
from dopq.models import build_model
from dopq.serialize import save_quantized
from measure import run_measured

ARCH = "deit_tiny_patch16_224"
CHECKPOINT = "deit_tiny_patch16_224.cifar10.safetensors"
DOPQ = Path(sys.executable).parent / "dopq"


# -- throughput --------------------------------------------------------------------------------------


def _model_only(model: torch.nn.Module, premade: torch.Tensor, n: int, batch_size: int) -> float:
    """Images/s of the model alone on pre-made tensors, in the loader's batch sizes."""
    with torch.inference_mode():
        model(premade[:2])  # warm-up
        start = time.perf_counter()
        for first in range(0, n, batch_size):
            model(premade[: min(batch_size, n - first)])
        return n / (time.perf_counter() - start)


def _streamed(
    model: torch.nn.Module, dataset: Any, indices: list[int], batch_size: int, workers: int
) -> dict:
    loader = make_loader(dataset, indices, batch_size, workers)
    res = evaluate(model, loader, progress=False, desc=f"{workers} workers")
    return {
        "workers": workers,
        "images_per_second": res.images_per_second,
        "top1": res.top1,
        "images": res.images,
    }


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Streamed FP evaluation from the CIFAR-10 archive against the model alone."""
    shared = Path(args.shared)
    checkpoint = shared / "models" / CHECKPOINT
    data = shared / "data" / args.data_file
    model = build_model(ARCH, str(checkpoint)).eval()
    pre = preprocess_from_card(card_path_for(checkpoint))
    dataset = open_split(data, "test", build_transform(pre))
    indices = strided_indices(len(dataset), args.eval_subset)
    bs = args.batch_size
    premade = load_batch(dataset, indices[:bs])[0]
    workers = default_workers("cpu")
    before = _model_only(model, premade, len(indices), bs)
    print(f"  model only: {before:.1f} img/s", flush=True)
    default = _streamed(model, dataset, indices, bs, workers)
    print(f"  streamed, {workers} worker(s): {default['images_per_second']:.1f} img/s", flush=True)
    after = _model_only(model, premade, len(indices), bs)
    print(f"  model only again: {after:.1f} img/s", flush=True)
    in_process = _streamed(model, dataset, indices, bs, 0)
    print(f"  streamed, 0 workers: {in_process['images_per_second']:.1f} img/s", flush=True)
    model_only = statistics.mean([before, after])
    return {
        "data": str(data),
        "model": ARCH,
        "images": len(indices),
        "batch_size": bs,
        "torch_threads": torch.get_num_threads(),
        "default_workers": workers,
        "model_only_images_per_second": [before, after],
        "streamed_default_workers": default,
        "streamed_no_workers": in_process,
        "ratio_default_workers": default["images_per_second"] / model_only,
        "ratio_no_workers": in_process["images_per_second"] / model_only,
    }


# -- memory ------------------------------------------------------------------------------------------


def _peak_rss(command: list[str]) -> dict[str, Any]:
    """Run ``command``; its peak RSS in MB (see :func:`measure.run_measured`) and wall time."""
    run = run_measured(command)
    if run["returncode"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{run['stderr'][-2000:]}")
    rss = run["peak_rss_bytes"]
    return {
        "peak_rss_mb": rss / 1024**2 if rss else None,
        "wall_seconds": run["wall_seconds"],
        "tool": run["tool"],
    }


def _evaluate_cli(saved: Path, data: Path, out: Path, threads: int) -> dict[str, Any]:
    command = [str(DOPQ), "evaluate", "--quantized", str(saved), "--data", str(data), "--quiet",
               "--threads", str(threads), "--output", str(out)]  # fmt: skip
    row = _peak_rss(command)
    result = json.loads(out.read_text())
    row.update(
        command=" ".join(["dopq", *command[1:]]),
        eval_images=result["eval_images"],
        quant_top1=result["quant_top1"],
        images_per_second=result["eval_images_per_second"],
        workers=result["data"]["workers"],
    )
    print(f"  {data.name}: {row['eval_images']} images, peak RSS {row['peak_rss_mb']:.0f} MB, "
          f"{row['wall_seconds']:.0f} s", flush=True)  # fmt: skip
    return row


def _quantized_deit(args: argparse.Namespace, path: Path) -> Path:
    shared = Path(args.shared)
    checkpoint = shared / "models" / CHECKPOINT
    model = build_model(ARCH, str(checkpoint)).eval()
    pre = preprocess_from_card(card_path_for(checkpoint))
    calib_ds = open_split(shared / "data" / args.data_file, "train", build_transform(pre))
    calib = load_batch(calib_ds, calibration_indices(len(calib_ds), 32, seed=0))[0]
    config = get_preset("dopq", w_bits=8, a_bits=8)
    return save_quantized(quantize(model, calib, config, progress=False), path, config,
                          {"preprocess": pre.to_dict()})  # fmt: skip


def _quantized_test_vit(path: Path) -> Path:
    model = timm.create_model("test_vit").eval()
    pre = preprocess_from_model(model)
    calib = torch.randn(8, *pre.input_size, generator=torch.Generator().manual_seed(0))
    config = get_preset("dopq", w_bits=8, a_bits=8)
    return save_quantized(quantize(model, calib, config, progress=False), path, config,
                          {"preprocess": pre.to_dict()})  # fmt: skip


def make_imagenet_layout(root: Path, classes: int = 1000, per_class: int = 50) -> Path:
    """Write ``root/val/n<8 digits>/ILSVRC2012_val_<8 digits>.JPEG``: small JPEGs of varied sizes
    (997 distinct images written in turn). Reused when ``root`` already holds the full set."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{classes}x{per_class}":
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(997):
        h, w = (int(v) for v in rng.integers(48, 97, 2))
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        encoded.append(buf.getvalue())
    k = 0
    for c in range(classes):
        folder = root / "val" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for _ in range(per_class):
            k += 1
            (folder / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(encoded[k % len(encoded)])
    done.write_text(f"{classes}x{per_class}")
    return root


def _subset_layout(full: Path, root: Path, per_class: int) -> Path:
    """The first ``per_class`` images of every class of ``full``, as hard links (or copies)."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == str(per_class):
        return root
    shutil.rmtree(root, ignore_errors=True)
    for folder in sorted((full / "val").iterdir()):
        target = root / "val" / folder.name
        target.mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            try:
                os.link(image, target / image.name)
            except OSError:
                shutil.copyfile(image, target / image.name)
    done.write_text(str(per_class))
    return root


def memory(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Peak RSS of ``dopq evaluate`` on all CIFAR-10 test images, and on 50 000 vs 5 000 JPEGs."""
    threads = torch.get_num_threads()
    deit = _quantized_deit(args, tmp / "deit_w8a8.pt")
    cifar = _evaluate_cli(deit, Path(args.shared) / "data" / args.data_file, tmp / "cifar.json", threads)
    start = time.perf_counter()
    big = make_imagenet_layout(tmp / "imagenet-layout-50000")
    small = _subset_layout(big, tmp / "imagenet-layout-5000", per_class=5)
    made = time.perf_counter() - start
    vit = _quantized_test_vit(tmp / "test_vit_w8a8.pt")
    rows = {
        "5000": _evaluate_cli(vit, small, tmp / "small.json", threads),
        "50000": _evaluate_cli(vit, big, tmp / "big.json", threads),
    }
    return {
        "cifar10_test_all": {**cifar, "model": f"{ARCH} dopq W8/A8"},
        "imagenet_layout": {
            "model": "test_vit dopq W8/A8 (random init, 1000 classes)",
            "folders": {"5000": str(small), "50000": str(big)},
            "generate_seconds": made,
            "runs": rows,
            "rss_ratio_50000_over_5000": rows["50000"]["peak_rss_mb"] / rows["5000"]["peak_rss_mb"],
        },
        "threads": threads,
    }


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def suite_data(args: argparse.Namespace, workload, save) -> None:
    """Run the asked-for parts; the JSON (benchmarks/results/data.json) is written after each. A part
    not run this time is kept from the file, with the command, threads and load it was measured with."""
    del workload  # this suite builds its own loaders
    tmp = Path(getattr(args, "data_tmp", None) or Path(tempfile.gettempdir()) / "dopq-data-bench")
    tmp.mkdir(parents=True, exist_ok=True)
    results_file = (getattr(args, "results_dir", None) or RESULTS_DIR) / "data.json"  # where save() writes
    previous = (results_file.is_file() and json.loads(results_file.read_text())) or {}
    out: dict[str, Any] = {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    }
    for part in ("throughput", "memory"):
        if part in previous:  # files written before parts carried their own provenance: the file's
            out[part] = {"command": previous.get("command"), "threads": previous.get("threads"),
                         "load_average_before": previous.get("load_average_at_start"), **previous[part]}  # fmt: skip
    for part, measure in (("throughput", lambda: throughput(args)), ("memory", lambda: memory(args, tmp))):
        if part in args.data_parts:
            load_before = os.getloadavg()
            out[part] = {**measure(), "command": command_line(), "threads": torch.get_num_threads(),
                         "load_average_before": load_before, "load_average_after": os.getloadavg()}  # fmt: skip
            save("data", out)
