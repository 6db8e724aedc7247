"""The ``deploy`` suite: exported ONNX models on onnxruntime against the simulation and FP32.

Per model and bit width (dopq recipe, and dopq with a uniform post-Softmax quantizer): simulated
top-1, onnxruntime top-1, identical top-1 predictions, file sizes, and, against the FP32 ONNX export
on the same threads, throughput at batch 32 and latency at batch 1 (interleaved repeats, medians).
onnxruntime's own ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax, the
same 32 calibration images) is the peer row at W8/A8.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dopq.api import quantize_with_report
from dopq.config import QuantConfig, get_preset
from dopq.environment import command_line
from dopq.errors import ConfigError
from dopq.export import OnnxModel, export_onnx, optimized_op_counts
from dopq.export.runtime import INTEGER_OPS
from dopq.modules import float64_copy, quantizers_of, removing_hooks, weight_quantizer_ids

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _fp32_onnx(model: torch.nn.Module, path: Path) -> None:
    from dopq.models import example_input

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example_input(model),), str(path), dynamo=False, opset_version=21,
            input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip


def _peer_quantize_static(fp_path: Path, out: Path, calib: torch.Tensor) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": calib.numpy()}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(
        str(fp_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for a suite's exported files, removed when the process exits: a Swin-Tiny
    deploy run writes about 300 MB there, and runtime sessions that outlive the suite's loop (see
    ``_RUNNERS``) may hold its files until then."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def interleaved_times(
    models: dict[Any, Any], batch: Any, repeats: int, inner: int = 1
) -> dict[Any, list[float]]:
    """Seconds of one call per model and repeat (any callable on ``batch``, the mean of ``inner``
    calls), models interleaved within each repeat, after one warm-up call each."""
    for m in models.values():
        m(batch)
    times: dict[Any, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                m(batch)
            times[name].append((time.perf_counter() - t0) / inner)
    return times


def timed_runs(models: dict[Any, Any], batch: Any, repeats: int, inner: int = 1) -> dict[Any, float]:
    """Median seconds of one call per model (:func:`interleaved_times`)."""
    return {k: statistics.median(v) for k, v in interleaved_times(models, batch, repeats, inner).items()}


DEPLOY_WIDTHS = ("8/8", "4/8", "4/4")
RUNTIMES = ("onnxruntime", "openvino")
NNCF_PEER = "nncf INT8"
ORT_PEER = "onnxruntime quantize_static"


def _width(spec: str) -> tuple[int, int]:
    w, a = spec.split("/")
    return int(w), int(a)


def suite_deploy(args: argparse.Namespace, workload, save) -> None:
    """Exported models on onnxruntime and OpenVINO against the simulation, FP32 and the peers.

    Per model and width (``--widths``, dopq preset: uniform post-Softmax at 8 bits, TanQ below):
    one ONNX export, run by both runtimes; simulated and runtime top-1, identical predictions,
    file size; the peers are onnxruntime's ``quantize_static`` (run by onnxruntime) and NNCF's
    INT8 model (run by OpenVINO), both W8/A8 from the same 32 calibration images. Two parts
    (``--deploy-parts``): ``accuracy`` (the 1000 images) and ``timing`` (throughput at batch 32
    and latency at batch 1 of every model on both runtimes against the FP32 model on the same
    runtime, interleaved repeats, medians), so that the speed can be measured on a quiet machine.
    """
    from dopq.environment import cpu_info

    threads = args.threads or 2
    name = f"deploy_runtimes{args.suffix}"
    path = (args.results_dir or RESULTS_DIR) / f"{name}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    rows = {_row_key(r): r for r in previous.get("rows", [])}
    out = {k: previous[k] for k in ("accuracy", "timing") if k in previous}
    tmp = scratch_dir("dopq-deploy-")
    for arch in args.models:
        work = workload(args, arch)
        models = _deploy_models(args, work, arch, tmp)
        _RUNNERS.clear()
        for part in args.deploy_parts:
            measure = _deploy_accuracy if part == "accuracy" else _deploy_timing
            for row in measure(args, work, arch, models, threads):
                rows.setdefault(_row_key(row), {}).update(row)
            out[part] = {"command": command_line(), "threads": threads, "load_average": os.getloadavg()}
            save(name, {**out, "cpu": cpu_info(), "onnx_threads": threads, "rows": list(rows.values())})


# The timing part's sessions stay alive until the next model: freeing OpenVINO's compiled models
# together with onnxruntime sessions and NNCF's model at once crashed the process (SIGSEGV) here
# before the results were written, so they are dropped only after ``save``.
_RUNNERS: list[dict[Any, Any]] = []


def _row_key(row: dict[str, Any]) -> tuple:
    return row["model"], row["method"], row["w_bits"], row["a_bits"], row["runtime"]


def deploy_config(method: str, w: int, a: int) -> QuantConfig:
    """A preset by name, or one of calib-gains' named variants of it (``recommended+gptq``)."""
    from calib_gains import TANQ_ROWS, calib_gain_recipes  # calib_gains imports this module

    variants = calib_gain_recipes(w, a)
    if method in TANQ_ROWS and method not in variants:
        raise ConfigError(
            f"{method} at W{w}/A{a}: dopq's post-Softmax grid is uniform there, no TanQ to vary"
        )
    return variants[method] if method in variants else get_preset(method, w_bits=w, a_bits=a)


def _deploy_models(args, work, arch: str, tmp: Path) -> dict[str, dict[str, Any]]:
    """FP32, the dopq exports and the peers, by label: path, bits, and the quantized model."""
    fp_path = tmp / f"{arch}_fp32.onnx"
    _fp32_onnx(work.model, fp_path)
    models: dict[str, dict[str, Any]] = {"fp32": {"path": fp_path, "w_bits": 32, "a_bits": 32}}
    for method in args.deploy_methods:
        for spec in args.widths or DEPLOY_WIDTHS:
            w, a = _width(spec)
            config = deploy_config(method, w, a)
            model, qreport = quantize_with_report(
                copy.deepcopy(work.model), work.calib_images, config, progress=False
            )
            paths = {}
            for runtime in RUNTIMES:  # the graph shaped for each runtime's integer kernels (same codes)
                out = tmp / f"{arch}_{method}_w{w}a{a}_{runtime}.onnx"
                report = export_onnx(model, out, target=runtime)
                paths[runtime] = Path(report.path)
            models[f"{method} W{w}/A{a}"] = {
                "path": paths, "w_bits": w, "a_bits": a, "model": model, "method": method,
                "post_softmax": config.softmax_quantizer, "weight_storage": report.weight_storage,
                "calib_seconds": qreport.calib_seconds, "recipe": config.to_dict(),
            }  # fmt: skip
            for weight_type in args.deploy_weight_types if w == 8 else ():
                # the same model with another container of its 8-bit weights (onnxruntime only)
                out = tmp / f"{arch}_{method}_w{w}a{a}_{weight_type}.onnx"
                report = export_onnx(model, out, target="onnxruntime", weight_type=weight_type)
                models[f"{method} W{w}/A{a} {weight_type} weights"] = {
                    **models[f"{method} W{w}/A{a}"], "path": {"onnxruntime": Path(report.path)},
                    "method": f"{method} ({weight_type} weights)", "runtimes": ("onnxruntime",),
                    "weight_storage": report.weight_storage,
                }  # fmt: skip
    if not args.deploy_peers:
        return models
    ort_peer, nncf_peer = tmp / f"{arch}_ort_peer.onnx", tmp / f"{arch}_nncf_int8.xml"
    _peer_quantize_static(fp_path, ort_peer, work.calib_images)
    _peer_nncf(fp_path, nncf_peer, work.calib_images)
    models[f"{ORT_PEER} W8/A8"] = {"path": ort_peer, "w_bits": 8, "a_bits": 8, "method": ORT_PEER,
                                   "runtimes": ("onnxruntime",)}  # fmt: skip
    models[f"{NNCF_PEER} W8/A8"] = {"path": nncf_peer, "w_bits": 8, "a_bits": 8, "method": NNCF_PEER,
                                    "runtimes": ("openvino",)}  # fmt: skip
    return models


def _peer_nncf(fp_path: Path, out: Path, calib: torch.Tensor) -> None:
    """NNCF's post-training INT8 model of the FP32 graph (transformer preset), saved as OpenVINO IR."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp_path))
    items = [calib[i : i + 1].numpy() for i in range(len(calib))]
    quantized = nncf.quantize(
        model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items)
    )
    ov.save_model(quantized, str(out))


TIMING_BATCH = 32  # throughput is timed on the first 32 evaluation images, latency on one


def timing_batch(work: Any) -> torch.Tensor:
    """The evaluation images throughput is timed on: the first :data:`TIMING_BATCH`, fewer where
    ``--eval-subset`` is smaller (images/s are counted over the images the batch holds)."""
    return torch.stack([work.eval_dataset[i][0] for i in work.eval_indices[:TIMING_BATCH]])


def _runtimes_of(entry: dict[str, Any]) -> tuple[str, ...]:
    return entry.get("runtimes", RUNTIMES)


def _path(entry: dict[str, Any], runtime: str) -> Path:
    """The model file a runtime runs: the export shaped for it, or the entry's one file."""
    return entry["path"][runtime] if isinstance(entry["path"], dict) else entry["path"]


def _deploy_accuracy(args, work, arch: str, models: dict[str, dict[str, Any]], threads: int) -> list[dict]:
    from dopq.export import load_runtime, openvino_layer_precisions

    loader = _loader(work)
    fp_logits, labels = _logits_and_labels(work.model, loader)
    hits = lambda logits: "".join("1" if h else "0" for h in (logits.argmax(1) == labels).tolist())  # noqa: E731
    rows = []
    for label, entry in models.items():
        simulated = _logits(entry["model"], loader) if "model" in entry else None
        for runtime in _runtimes_of(entry):
            path = _path(entry, runtime)
            logits = _logits(load_runtime(path, runtime, threads), loader)
            row = {
                "model": arch, "method": entry.get("method", label), "w_bits": entry["w_bits"],
                "a_bits": entry["a_bits"], "runtime": runtime, "label": label,
                "runtime_top1": float((logits.argmax(1) == labels).float().mean()),
                "runtime_top1_correct": hits(logits), "fp_top1": float((fp_logits.argmax(1) == labels).float().mean()),
                "fp_top1_correct": hits(fp_logits), "bytes": _size(path),
            }  # fmt: skip
            if simulated is not None:
                same, diff = _agreement(simulated, logits)
                row.update(sim_top1=float((simulated.argmax(1) == labels).float().mean()),
                           sim_top1_correct=hits(simulated), identical_top1=same, max_logit_diff=diff,
                           post_softmax=entry["post_softmax"], weight_storage=entry["weight_storage"],
                           calib_seconds=entry["calib_seconds"], recipe=entry["recipe"])  # fmt: skip
            if runtime == "onnxruntime":
                ops = optimized_op_counts(path, threads)
                row["integer_ops"] = {k: v for k, v in ops.items() if k in INTEGER_OPS}
            else:
                row["kernel_precisions"] = _precision_counts(openvino_layer_precisions(path, threads))
            rows.append(row)
            print(f"  {arch} {label} on {runtime}: top-1 {row['runtime_top1']:.4f}"
                  + (f" (simulation {row['sim_top1']:.4f}, identical {row['identical_top1']:.4f})" if simulated is not None else ""),
                  flush=True)  # fmt: skip
    return rows


def _precision_counts(layers: list[tuple[str, str]]) -> dict[str, int]:
    """``"FullyConnected u8"``-style counts of the compiled model's compute layers."""
    counts: dict[str, int] = {}
    for kind, precision in layers:
        if kind in ("FullyConnected", "MatMul", "Convolution"):
            key = f"{kind} {precision}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _size(path: Path) -> int:
    """Bytes of a model file (with an OpenVINO IR's weights file)."""
    weights = path.with_suffix(".bin")
    return path.stat().st_size + (
        weights.stat().st_size if path.suffix == ".xml" and weights.is_file() else 0
    )


def _deploy_timing(args, work, arch: str, models: dict[str, dict[str, Any]], threads: int) -> list[dict]:
    from dopq.export import load_runtime

    runners = {
        (label, runtime): load_runtime(_path(entry, runtime), runtime, threads)
        for label, entry in models.items()
        for runtime in _runtimes_of(entry)
    }
    _RUNNERS.append(runners)  # freed after the results are saved (see _RUNNERS)
    batch = timing_batch(work)
    n = batch.shape[0]
    # every repeat's time is kept, so that the spread and paired ratios can be read from the file
    batch_times = interleaved_times(runners, batch, args.repeats)
    through = {k: statistics.median(v) for k, v in batch_times.items()}
    latency = timed_runs(runners, batch[:1], args.repeats, 10)
    rows = []
    for (label, runtime), seconds in through.items():
        entry, path = models[label], _path(models[label], runtime)
        fp = ("fp32", runtime)
        rows.append({
            "model": arch, "method": entry.get("method", label), "w_bits": entry["w_bits"],
            "a_bits": entry["a_bits"], "runtime": runtime, "label": label,
            "batch": n, "images_per_second": n / seconds, "throughput_ratio": through[fp] / seconds,
            "latency_ms": 1e3 * latency[(label, runtime)], "latency_ratio": latency[fp] / latency[(label, runtime)],
            "bytes": _size(path), "size_ratio": _size(path) / _size(models["fp32"]["path"]),
            "fp32_images_per_second": n / through[fp], "repeats": args.repeats,
            "batch_seconds": batch_times[(label, runtime)],
        })  # fmt: skip
        if "recipe" in entry:
            rows[-1]["recipe"] = entry["recipe"]
        print(f"  {arch} {label} on {runtime}: {rows[-1]['images_per_second']:.1f} img/s "
              f"({rows[-1]['throughput_ratio']:.2f}x fp32), {rows[-1]['latency_ms']:.1f} ms", flush=True)  # fmt: skip
    return rows


def _loader(work):
    from dopq.data import make_loader

    # streamed: the images are decoded by the workload's workers on every pass, never held as a set
    return make_loader(work.eval_dataset, work.eval_indices, 32, work.settings.workers)


def _workloads(args: argparse.Namespace, workload):
    """Each model of ``--models`` with its workload and its streamed evaluation loader."""
    for arch in args.models:
        work = workload(args, arch)
        yield arch, work, _loader(work)


def _logits(model: torch.nn.Module, loader) -> torch.Tensor:
    return _logits_and_labels(model, loader)[0]


@torch.no_grad()
def _logits_and_labels(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [(model(images).float().cpu(), labels) for images, labels in loader]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def suite_deploy_sensitivity(args: argparse.Namespace, workload, save) -> None:
    """How often do two computations of the same quantized network pick different top-1 classes?

    The simulation, its deploy form in torch, and the exported graph in onnxruntime with and without
    its graph optimizations (integer GEMMs vs float GEMMs of dequantized values): each pair differs
    only in float rounding.
    """
    from dopq.export import to_deploy

    threads = args.threads or 2
    rows: list[dict[str, Any]] = []
    tmp = scratch_dir("dopq-sensitivity-")
    for arch, work, loader in _workloads(args, workload):
        for bits in args.bits:
            config = get_preset("dopq", w_bits=bits, a_bits=bits, softmax_quantizer="tanq")
            model, _ = quantize_with_report(
                copy.deepcopy(work.model), work.calib_images, config, progress=False
            )
            path = tmp / f"{arch}_w{bits}.onnx"
            export_onnx(model, path)
            logits = {
                "simulation": _logits(model, loader),
                "deploy form (torch)": _logits(to_deploy(model), loader),
                "onnxruntime": _logits(OnnxModel(path, threads=threads), loader),
                "onnxruntime, no graph optimizations": _logits(
                    OnnxModel(path, threads=threads, optimize=False), loader
                ),
            }
            names = list(logits)
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    same, diff = _agreement(logits[a], logits[b])
                    rows.append({"model": arch, "w_bits": bits, "a_bits": bits, "a": a, "b": b,
                                 "identical_top1": same, "max_logit_diff": diff, "images": len(logits[a])})  # fmt: skip
                    print(
                        f"  {arch} W{bits}/A{bits} {a} vs {b}: identical {same:.4f}, max logit diff {diff:.3f}",
                        flush=True,
                    )
            save("deploy_sensitivity", {"rows": rows, "onnx_threads": threads})


NOISE_RELATIVE = 1e-7  # about float32's unit roundoff: the size of one reordered float sum's error


def suite_deploy_noise(args: argparse.Namespace, workload, save) -> None:
    """How far apart can two float computations of one quantized network be? The agreement floor.

    Each exported runtime computes the simulation's network in another float order; a value within
    rounding of a code boundary then lands on the neighbouring code. The same happens inside torch
    when every activation quantizer's input gets a relative error of ``NOISE_RELATIVE`` (seeded, one
    run per ``--seeds`` entry): its identical-top-1 rate against the plain simulation is a floor that
    no export can be expected to beat. Per model, preset
    (``--deploy-methods``) and width (``--widths``, default 8/8): the noisy simulations, onnxruntime
    (onnxruntime form) and OpenVINO (openvino form), each against the simulation, and the runtimes
    against each other.
    """
    from dopq.environment import cpu_info
    from dopq.export import load_runtime

    threads = args.threads or 2
    rows: list[dict[str, Any]] = []
    tmp = scratch_dir("dopq-noise-")
    for arch, work, loader in _workloads(args, workload):
        for method in args.deploy_methods:
            for spec in args.widths or ["8/8"]:
                w, a = _width(spec)
                model, _ = quantize_with_report(
                    copy.deepcopy(work.model), work.calib_images, deploy_config(method, w, a), progress=False
                )
                simulation, labels = _logits_and_labels(model, loader)
                logits = {}
                for seed in args.seeds or [0, 1, 2, 3]:
                    with _noisy_activation_inputs(model, NOISE_RELATIVE, seed):
                        logits[f"simulation, noise seed {seed}"] = _logits(model, loader)
                for runtime in RUNTIMES:
                    path = tmp / f"{arch}_{method}_w{w}a{a}_{runtime}.onnx"
                    export_onnx(model, path, target=runtime)
                    logits[runtime] = _logits(load_runtime(path, runtime, threads), loader)
                pairs = [("simulation", name) for name in logits] + [("onnxruntime", "openvino")]
                logits["simulation"] = simulation
                for first, second in pairs:
                    same, diff = _agreement(logits[first], logits[second])
                    rows.append({"model": arch, "method": method, "w_bits": w, "a_bits": a, "a": first,
                                 "b": second, "identical_top1": same, "max_logit_diff": diff,
                                 "mean_logit_diff": float((logits[first] - logits[second]).abs().mean()),
                                 "top1_b": _top1(logits[second], labels), "images": len(labels)})  # fmt: skip
                    print(
                        f"  {arch} {method} W{w}/A{a} {first} vs {second}: identical {same:.4f}", flush=True
                    )
                save("deploy_noise" + args.suffix, {"rows": rows, "onnx_threads": threads, "cpu": cpu_info(),
                                                    "noise_relative": NOISE_RELATIVE})  # fmt: skip


@contextlib.contextmanager
def _noisy_activation_inputs(model: torch.nn.Module, relative: float, seed: int):
    """Every activation quantizer's input times ``1 + relative * N(0, 1)`` (weights untouched: the
    quantizers in a layer's weight slot, :func:`dopq.modules.weight_quantizer_ids`, are left out)."""
    generator = torch.Generator().manual_seed(seed)

    def perturb(module, args):
        x = args[0]
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return (x * (1 + relative * noise), *args[1:])

    weights = weight_quantizer_ids(model)
    activations = [q for _, q in quantizers_of(model) if id(q) not in weights]
    with removing_hooks([q.register_forward_pre_hook(perturb) for q in activations]):
        yield


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Share of identical top-1 predictions and the largest logit difference."""
    return float((a.argmax(1) == b.argmax(1)).float().mean()), float((a - b).abs().max())


def suite_deploy_float64(args: argparse.Namespace, workload, save) -> None:
    """The float64 export against the float64 simulation, the float32 simulation and FP32 ONNX.

    Two parts (``--float64-parts``), each kept in the JSON with its own command, so that the speed
    can be measured on a quiet machine apart from the long accuracy runs:

    * ``accuracy``, per model and bit width (dopq preset): top-1 of the float32 and float64
      simulations and of the float64 graph in onnxruntime; identical predictions and the largest
      logit difference of the graph against the float64 simulation, and of the float32 simulation
      against the float64 one (how far float32 rounding alone moves the quantized network); the
      float64 simulation and graph again on another thread count (``--thread-check`` images).
    * ``timing``: throughput at batch 32 and latency at batch 1 of the float64 and the float32
      export against the FP32 ONNX export (interleaved repeats, medians).
    """
    threads = args.threads or 2
    path = (args.results_dir or RESULTS_DIR) / "deploy_float64.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    rows = {(r["model"], r["w_bits"]): r for r in previous.get("rows", [])}
    out = {k: previous[k] for k in ("accuracy", "timing") if k in previous}
    if previous and not out:  # a file from one run of both parts: its command measured both
        out = {k: {"command": previous["command"], "threads": threads} for k in ("accuracy", "timing")}
    tmp = scratch_dir("dopq-float64-")
    for part in ("accuracy", "timing"):
        if part not in args.float64_parts:
            continue
        load_before = os.getloadavg()
        for arch in args.models:
            work = workload(args, arch)
            measure = _float64_accuracy if part == "accuracy" else _float64_timing
            for bits, fields in measure(args, work, arch, tmp, threads).items():
                if part == "timing" and (arch, bits) not in rows:
                    raise SystemExit(f"deploy-float64: run the accuracy part for {arch} W{bits} first")
                rows.setdefault((arch, bits), {}).update(fields)
            out[part] = {"command": command_line(), "threads": threads, "load_average_before": load_before,
                         "load_average_after": os.getloadavg()}  # fmt: skip
            save("deploy_float64", {**out, "rows": list(rows.values()), "onnx_threads": threads})


def _float64_model(work, bits: int):
    config = get_preset("dopq", w_bits=bits, a_bits=bits)
    model, report = quantize_with_report(copy.deepcopy(work.model), work.calib_images, config, progress=False)
    return config, model, report


def _export_both(model, arch: str, bits: int, tmp: Path) -> dict[str, Any]:
    paths = {dtype: tmp / f"{arch}_w{bits}_{dtype}.onnx" for dtype in ("float32", "float64")}
    return {dtype: export_onnx(model, path, float_dtype=dtype) for dtype, path in paths.items()}


def _float64_accuracy(args, work, arch: str, tmp: Path, threads: int) -> dict[int, dict[str, Any]]:
    loader = _loader(work)
    entries: dict[int, dict[str, Any]] = {}
    for bits in args.bits:
        config, model, qreport = _float64_model(work, bits)
        reports = _export_both(model, arch, bits, tmp)
        graph_path = Path(reports["float64"].path)
        simulation64 = float64_copy(model)
        sim32, labels = _logits_and_labels(model, loader)
        logits = {
            "sim32": sim32,
            "sim64": _logits(simulation64, loader),
            "onnx64": _logits(OnnxModel(graph_path, threads=threads), loader),
        }
        identical, max_diff = _agreement(logits["sim64"], logits["onnx64"])
        float32_moves, _ = _agreement(logits["sim32"], logits["sim64"])
        other = 1 if threads != 1 else 2
        threads_same = _thread_check(simulation64, graph_path, loader, args.thread_check, threads, other)
        entries[bits] = {
            "model": arch, "w_bits": bits, "a_bits": bits, "recipe": config.to_dict(),
            "sim32_top1": _top1(logits["sim32"], labels), "sim64_top1": _top1(logits["sim64"], labels),
            "onnx64_top1": _top1(logits["onnx64"], labels),
            "identical_top1": identical, "max_logit_diff": max_diff,
            "sim32_vs_sim64_identical_top1": float32_moves, **threads_same,
            "bytes": reports["float64"].bytes, "float32_bytes": reports["float32"].bytes,
            "integer_ops": {k: v for k, v in optimized_op_counts(graph_path, threads).items() if k in INTEGER_OPS},
            "calib_seconds": qreport.calib_seconds, "images": len(labels),
            "sim64_top1_correct": _correct(logits["sim64"], labels), "onnx64_top1_correct": _correct(logits["onnx64"], labels),
            "sim32_top1_correct": _correct(logits["sim32"], labels),
        }  # fmt: skip
        e = entries[bits]
        print(f"  {arch} W{bits}/A{bits}: sim32 {e['sim32_top1']:.4f} sim64 {e['sim64_top1']:.4f} onnx64 "
              f"{e['onnx64_top1']:.4f} identical {identical:.4f} (max diff {max_diff:.2e}); sim32 vs sim64 "
              f"{float32_moves:.4f}; {threads_same}", flush=True)  # fmt: skip
    return entries


def _float64_timing(args, work, arch: str, tmp: Path, threads: int) -> dict[int, dict[str, Any]]:
    fp_path = tmp / f"{arch}_fp32.onnx"
    _fp32_onnx(work.model, fp_path)
    sessions = {"fp32": OnnxModel(fp_path, threads=threads)}
    for bits in args.bits:
        _, model, _ = _float64_model(work, bits)
        for dtype, report in _export_both(model, arch, bits, tmp).items():
            sessions[(bits, dtype)] = OnnxModel(report.path, threads=threads)
    batch = timing_batch(work)
    n = batch.shape[0]
    through = timed_runs(sessions, batch, args.repeats, 1)
    latency = timed_runs(sessions, batch[:1], args.repeats, 10)
    entries: dict[int, dict[str, Any]] = {}
    for bits in args.bits:
        e: dict[str, Any] = {}
        for dtype in ("float64", "float32"):
            key = (bits, dtype)
            e[f"{dtype}_images_per_second"] = n / through[key]
            e[f"{dtype}_throughput_ratio"] = through["fp32"] / through[key]
            e[f"{dtype}_latency_ms"] = 1e3 * latency[key]
            e[f"{dtype}_latency_ratio"] = latency["fp32"] / latency[key]
        e.update(batch=n, fp32_images_per_second=n / through["fp32"], fp32_latency_ms=1e3 * latency["fp32"],
                 fp32_bytes=fp_path.stat().st_size, onnx_threads=threads, repeats=args.repeats)  # fmt: skip
        entries[bits] = e
        print(f"  {arch} W{bits}/A{bits}: float64 {e['float64_images_per_second']:.1f} img/s "
              f"({e['float64_throughput_ratio']:.2f}x fp32), float32 {e['float32_images_per_second']:.1f} img/s "
              f"({e['float32_throughput_ratio']:.2f}x); latency {e['float64_latency_ms']:.1f} ms "
              f"({e['float64_latency_ratio']:.2f}x)", flush=True)  # fmt: skip
    return entries


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> str:
    return "".join("1" if hit else "0" for hit in (logits.argmax(1) == labels).tolist())


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def _thread_check(simulation, path: Path, loader, images: int, threads: int, other: int) -> dict[str, Any]:
    """The float64 simulation and graph on ``other`` threads against ``threads``, on the first images."""
    if not images:
        return {}
    from dopq.data import make_loader

    work_loader = make_loader(loader.dataset.dataset, loader.dataset.indices[:images], 32, loader.num_workers)
    out: dict[str, Any] = {"thread_check_images": images, "thread_check_threads": [threads, other]}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        sim_a, onnx_a = (
            _logits(simulation, work_loader),
            _logits(OnnxModel(path, threads=threads), work_loader),
        )
        torch.set_num_threads(other)
        sim_b, onnx_b = _logits(simulation, work_loader), _logits(OnnxModel(path, threads=other), work_loader)
    finally:
        torch.set_num_threads(before)
    out["sim64_threads_identical_top1"], out["sim64_threads_max_logit_diff"] = _agreement(sim_a, sim_b)
    out["onnx64_threads_identical_top1"], out["onnx64_threads_max_logit_diff"] = _agreement(onnx_a, onnx_b)
    return out


def suite_save_size(args: argparse.Namespace, workload, save) -> None:
    """Bytes of ``--save`` files (integer weight codes) against the float checkpoints."""
    from dopq.serialize import save_quantized

    rows: list[dict[str, Any]] = []
    tmp = scratch_dir("dopq-save-")
    for arch in args.models:
        work = workload(args, arch)
        fp32 = tmp / f"{arch}_fp32_state.pt"
        torch.save(work.model.state_dict(), fp32)
        for bits in args.bits:
            config = get_preset("dopq", w_bits=bits, a_bits=bits)
            model, _ = quantize_with_report(
                copy.deepcopy(work.model), work.calib_images, config, progress=False
            )
            path = save_quantized(model, tmp / f"{arch}_w{bits}.pt", config)
            row = {
                "model": arch, "w_bits": bits, "save_bytes": path.stat().st_size,
                "fp32_state_dict_bytes": fp32.stat().st_size,
                "checkpoint_bytes": Path(work.settings.checkpoint).stat().st_size,
                "checkpoint": Path(work.settings.checkpoint).name,
            }  # fmt: skip
            row["ratio_to_fp32_state_dict"] = row["save_bytes"] / row["fp32_state_dict_bytes"]
            row["ratio_to_checkpoint"] = row["save_bytes"] / row["checkpoint_bytes"]
            rows.append(row)
            print(f"  {arch} W{bits}: {row['save_bytes'] / 1e6:.2f} MB = {row['ratio_to_fp32_state_dict']:.3f}x fp32, "
                  f"{row['ratio_to_checkpoint']:.3f}x {row['checkpoint']}", flush=True)  # fmt: skip
            save("save_size", {"rows": rows})
