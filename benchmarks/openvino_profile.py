"""Where OpenVINO spends an exported model's time: per-layer counters of dopq's openvino form beside
NNCF's INT8 model of the same network.

    python benchmarks/run.py openvino-profile --models swin_tiny_patch4_window7_224 \\
        --deploy-methods recommended --widths 8/8 --repeats 5 --threads 2

Each model is compiled with ``PERF_COUNT`` and run on one batch of 32 calibration images: the wall
time per batch (median of ``--repeats``), and per layer type and kernel the time summed over layers
(mean over repeats). Stand-alone ``FakeQuantize`` layers (quantizers OpenVINO did not fuse into a
neighbour) are listed by the layer before them.
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time
from pathlib import Path
from typing import Any

from deploy import _fp32_onnx, _peer_nncf, _width, deploy_config, scratch_dir
from dopq.api import quantize_with_report
from dopq.environment import command_line, cpu_info
from dopq.export import export_onnx
from dopq.export.openvino_runtime import compile_model

BATCH = 32


def _layer_type(node: Any) -> str:
    return node.get_rt_info()["layerType"].astype(str)


def _profile(path: Path, images: Any, threads: int, repeats: int) -> dict[str, Any]:
    # the batch's static shape, as OpenVinoModel compiles (with dynamic shapes OpenVINO fuses less:
    # a 4-bit post-Softmax quantizer's comparisons then ran as 180 separate layers)
    compiled = compile_model(path, threads, tuple(images.shape), PERF_COUNT=True)
    request = compiled.create_infer_request()
    for _ in range(2):  # warm-up
        request.infer({0: images})
    walls, spent, layers = [], collections.Counter(), collections.Counter()
    per_node: dict[str, float] = collections.Counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        request.infer({0: images})
        walls.append(time.perf_counter() - t0)
        for info in request.profiling_info:
            ms = info.real_time.total_seconds() * 1e3 / repeats
            spent[(info.node_type, info.exec_type)] += ms
            layers[(info.node_type, info.exec_type)] += 1
            per_node[info.node_name] += ms
    by_type = [
        {"type": t, "kernel": k, "layers": layers[(t, k)] // repeats, "ms": ms}
        for (t, k), ms in spent.most_common()
    ]
    return {
        "wall_ms": statistics.median(walls) * 1e3,
        "summed_ms": sum(spent.values()),
        "by_type": by_type,
        "fake_quantize": _fake_quantize_placement(compiled.get_runtime_model(), per_node),
    }


def _fake_quantize_placement(runtime_model: Any, per_node: dict[str, float]) -> list[dict[str, Any]]:
    """Stand-alone FakeQuantize layers by the layer type before and after them."""
    count, spent = collections.Counter(), collections.Counter()
    for op in runtime_model.get_ordered_ops():
        if _layer_type(op) != "FakeQuantize":
            continue
        before = _layer_type(op.input_value(0).get_node())
        after = ", ".join(sorted(_layer_type(i.get_node()) for i in op.output(0).get_target_inputs()))
        count[(before, after)] += 1
        spent[(before, after)] += per_node.get(op.get_friendly_name(), 0.0)
    return [{"before": b, "after": a, "layers": n, "ms": spent[(b, a)]} for (b, a), n in count.most_common()]


def suite_openvino_profile(args: argparse.Namespace, workload, save) -> None:
    threads = args.threads or 2
    rows = []
    tmp = scratch_dir("dopq-ov-profile-")
    for arch in args.models:
        work = workload(args, arch)
        images = work.calib_images[:BATCH].numpy()
        fp_path = tmp / f"{arch}_fp32.onnx"
        _fp32_onnx(work.model, fp_path)
        paths = {"fp32": fp_path}
        for method in args.deploy_methods:
            for spec in args.widths or ["8/8"]:
                w, a = _width(spec)
                model, _ = quantize_with_report(
                    copy.deepcopy(work.model), work.calib_images, deploy_config(method, w, a), progress=False
                )
                out = tmp / f"{arch}_{method}_w{w}a{a}.onnx"
                paths[f"{method} W{w}/A{a}"] = Path(export_onnx(model, out, target="openvino").path)
        nncf_path = tmp / f"{arch}_nncf.xml"
        _peer_nncf(fp_path, nncf_path, work.calib_images)
        paths["nncf INT8 W8/A8"] = nncf_path
        for label, path in paths.items():
            row = {"model": arch, "label": label, **_profile(path, images, threads, args.repeats)}
            print(f"  {arch} {label}: {row['wall_ms']:.0f} ms per batch of {BATCH}", flush=True)
            rows.append(row)
    save(
        f"openvino_profile{args.suffix}",
        {
            "command": command_line(),
            "threads": threads,
            "batch": BATCH,
            "static_shape": True,
            "cpu": cpu_info(),
            "rows": rows,
        },
    )
