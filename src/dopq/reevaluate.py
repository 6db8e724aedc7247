"""Evaluating a quantized model again: a ``dopq quantize --save`` file (:func:`evaluate_saved`) or an
exported ONNX graph on onnxruntime or OpenVINO (:func:`evaluate_onnx`), under the protocol and with
the result fields of a quantize run (:mod:`dopq.experiment`): the work behind ``dopq evaluate``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dopq import distributed
from dopq.config import QuantConfig
from dopq.data import (
    ImageLoader,
    Preprocess,
    SkippedImage,
    build_transform,
    default_workers,
    open_split,
    preprocess_from_model,
    resolve_eval_split,
    single_line_errors,
    strided_indices,
)
from dopq.devices import resolve_device
from dopq.environment import environment, file_sha256, provenance
from dopq.errors import ConfigError
from dopq.evaluate import evaluate
from dopq.experiment import (
    accuracy_fields,
    across_processes,
    check_labels,
    check_same_inputs,
    data_entry,
    maybe_compiled,
    sharded_loader,
)
from dopq.models.loading import HF_PREFIX
from dopq.modules import in_dtype

__all__ = ["evaluate_onnx", "evaluate_saved"]


def _eval_set(
    data: str, split: str | None, subset: int | None, pre: Preprocess, skip_bad_images: bool = False
) -> tuple[Any, list[int]]:
    """``data``'s evaluation split, preprocessed by ``pre``, and the indices of its strided subset."""
    dataset = open_split(data, resolve_eval_split(data, split), build_transform(pre), skip_bad_images)
    return dataset, strided_indices(len(dataset), subset)


def _eval_loader(
    dataset: Any, indices: list[int], batch_size: int, workers: int | None, device: str = "cpu"
) -> ImageLoader:
    """This process's share of ``indices`` (``workers=None``: :func:`dopq.data.default_workers`)."""
    workers = default_workers(device) if workers is None else workers
    return sharded_loader(dataset, indices, batch_size, workers, device)


def _loader_data_report(
    loader: ImageLoader,
    skip_bad_images: bool,
    skipped: list[SkippedImage] | None = None,
    requested: int | None = None,
) -> dict[str, Any]:
    """``data`` entry of an evaluation through ``loader``; ``skipped`` and ``requested`` are the
    whole run's when several processes shared the images."""
    dataset = loader.dataset.dataset  # the split under the strided Subset
    skipped_sets = {"evaluation": loader.skipped if skipped is None else skipped}
    requested = len(loader.dataset) if requested is None else requested
    return data_entry(dataset, requested, loader.num_workers, skip_bad_images, skipped_sets)


def evaluate_saved(
    path: str | Path,
    data: str,
    arch: str | None = None,
    eval_split: str | None = None,
    eval_subset: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    skip_bad_images: bool = False,
    eval_dtype: str = "float32",
    compile: bool = False,
) -> dict[str, Any]:
    """Evaluate a model saved by ``dopq quantize --save`` with its recorded preprocessing
    (``overrides`` replaces fields of it, e.g. ``{"crop_pct": 1.0}``; ``workers=None`` picks
    :func:`dopq.data.default_workers`; ``skip_bad_images`` leaves out undecodable images and reports
    them under ``data``; ``compile`` runs the model through :class:`dopq.evaluate.CompiledModel`)."""
    from dopq.serialize import load_quantized

    start = time.perf_counter()
    resolve_device(device)
    model, config, meta = load_quantized(path, arch=arch, device=device)
    digest = file_sha256(path)  # of the file just read: another run may overwrite it meanwhile
    pre = replace(Preprocess(**meta["preprocess"]), **(overrides or {}))
    dataset, indices = _eval_set(data, eval_split, eval_subset, pre, skip_bad_images)
    check_labels(
        getattr(model, "num_classes", None), dataset, class_names=getattr(model, "class_names", None)
    )
    # before sharding: a process with another listing would refuse "more processes than images"
    check_same_inputs(model, dataset)
    loader = _eval_loader(dataset, indices, batch_size, workers, device)
    loading = time.perf_counter() - start
    with single_line_errors():
        model = maybe_compiled(in_dtype(model, eval_dtype), compile)
        res = evaluate(model, loader, device=device, progress=progress, desc="saved")
    res, skipped = across_processes(res, loader.skipped)
    return {
        "model": model.pretrained_cfg.get("architecture"),
        "method": "saved",
        "w_bits": config.w_bits,
        "a_bits": config.a_bits,
        **accuracy_fields(res),
        "eval_dtype": eval_dtype,
        "compiled": compile,
        "timings": {"load": loading, "evaluation": res.seconds},  # seconds, named as a quantize run's
        "quantized_path": str(path),
        "quantized_sha256": digest,
        "recorded_quant_top1": meta.get("quant_top1"),
        "recorded_command": meta.get("command"),
        "recorded_threads": meta.get("threads"),
        "recorded_versions": meta.get("versions"),
        "recorded_checkpoint_sha256": meta.get("checkpoint_sha256"),
        "config": {"recipe": config.to_dict(), "preprocess": pre.to_dict()},
        "data": _loader_data_report(loader, skip_bad_images, skipped, res.images + len(skipped)),
        "distributed": distributed.current().to_dict(),
        **environment(device),
    }


def _check_same_model(
    meta: dict[str, Any],
    config: QuantConfig,
    model: nn.Module,
    quantized: str | Path,
    onnx: str | Path,
    saved: dict[str, Any] | None = None,
) -> None:
    """Refuse to compare a graph with a saved model it was not exported from: the disagreement
    would read as an inexact export. The graph's metadata record its architecture and recipe, and
    both files the float weights they were made from (``saved``: the saved file's metadata)."""
    arch = model.pretrained_cfg.get("architecture")
    if meta.get("arch") not in (None, arch):
        raise ConfigError(f"--onnx {onnx} is a {meta['arch']} graph, --quantized {quantized} a {arch} model")
    # same architecture and recipe, other weights (a colleague's fine-tune, another checkpoint): the
    # comparison ran and its differences read as the export's
    ours, theirs = (saved or {}).get("checkpoint_sha256"), meta.get("checkpoint_sha256")
    if ours and theirs and ours != theirs:
        raise ConfigError(
            f"--onnx {onnx} was made from other float weights than --quantized {quantized} "
            f"(checkpoint SHA-256 {str(theirs)[:12]}... there, {str(ours)[:12]}... here): compare a graph "
            "with the model it was exported from"
        )
    recipe, ours = meta.get("recipe"), config.to_dict()
    if isinstance(recipe, dict):
        differ = sorted(k for k, v in ours.items() if k in recipe and recipe[k] != v)
        if differ:
            k = differ[0]
            raise ConfigError(
                f"--onnx {onnx} was exported from another recipe than --quantized {quantized} "
                f"({k}: {recipe[k]!r} there, {ours[k]!r} here): compare a graph with the "
                "model it was exported from"
            )


def _onnx_preprocess(meta: dict[str, Any], overrides: dict[str, Any] | None) -> Preprocess:
    if isinstance(meta.get("preprocess"), dict):
        try:
            pre = Preprocess(**meta["preprocess"])
        except TypeError as exc:  # keys missing or unknown: not what dopq export writes
            raise ConfigError(f"the ONNX model's preprocess metadata is unusable: {exc}") from None
    elif meta.get("arch") and not str(meta["arch"]).startswith(HF_PREFIX):  # an older file without it
        pre = preprocess_from_model(timm.create_model(meta["arch"], pretrained=False))
    else:
        raise ConfigError("the ONNX model records no preprocessing (export it with dopq export)")
    return replace(pre, **(overrides or {}))


def evaluate_onnx(
    path: str | Path,
    data: str,
    quantized: str | Path | None = None,
    eval_split: str | None = None,
    eval_subset: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    skip_bad_images: bool = False,
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Evaluate an exported ONNX model with onnxruntime or OpenVINO (``runtime``, CPU) under the
    usual protocol.

    With ``quantized`` (a ``dopq quantize --save`` file) both run on the same images and the result
    also holds the share of identical top-1 predictions and the largest logit difference; the
    simulation runs in the graph's float dtype (its ``float_dtype`` metadata), so a float64 graph
    is compared with the float64 simulation it reproduces.
    """
    from dopq.evaluate import compare
    from dopq.export import external_data_files, load_runtime
    from dopq.export.runtime import logits_width, read_graph

    start = time.perf_counter()
    onnx_model = load_runtime(path, runtime, threads=threads)
    graph = read_graph(path)  # once: the data files it names and the logits it outputs
    # of the files just read (another run may overwrite them meanwhile): the graph and the data
    # files a large graph keeps its tensors in
    digest = file_sha256(path)
    data_files = external_data_files(graph) if graph is not None else []
    data_digests = {name: file_sha256(Path(path).parent / name) for name in data_files}
    meta = onnx_model.metadata()
    pre = _onnx_preprocess(meta, overrides)
    dataset, indices = _eval_set(data, eval_split, eval_subset, pre, skip_bad_images)
    # as for a saved model: folders that cannot be the graph's classes score a meaningless accuracy
    num_classes = meta.get("num_classes")
    width = logits_width(graph) if graph is not None else None
    # the metadata are text anyone can edit: a class count the graph does not output made the
    # folders' check refuse good data or pass folders that cannot be the graph's classes
    if isinstance(num_classes, int) and num_classes > 0 and width is not None and width != num_classes:
        raise ConfigError(
            f"--onnx {path}: its metadata say {num_classes} classes, its graph outputs {width} logits "
            "(metadata edited, or written for another graph): re-export it with dopq export"
        )
    check_labels(
        num_classes if isinstance(num_classes, int) else None, dataset, class_names=meta.get("class_names")
    )
    loader = _eval_loader(dataset, indices, batch_size, workers)
    timings = {"load": time.perf_counter() - start}
    with single_line_errors():
        res = evaluate(onnx_model, loader, progress=progress, desc=runtime)
    timings["evaluation"] = res.seconds
    recipe = meta.get("recipe") or {}
    result: dict[str, Any] = {
        "model": meta.get("arch"),
        "method": "onnx",
        "w_bits": recipe.get("w_bits", meta.get("w_bits")),  # an API export records no recipe
        "a_bits": recipe.get("a_bits", meta.get("a_bits")),
        **accuracy_fields(res),
        "timings": timings,  # seconds; with --quantized also the comparison's pass over both models
        "onnx_path": str(path),
        "onnx_sha256": digest,
        **({"onnx_data_sha256": data_digests} if data_digests else {}),
        "runtime": runtime,
        "onnx_metadata": {k: v for k, v in meta.items() if k != "preprocess"},
        "config": {"preprocess": pre.to_dict()},
        **provenance(),
        # the runtime's threads; None: its own default, which is not torch's (onnxruntime's pool
        # has one thread per physical core whatever torch or OMP_NUM_THREADS say)
        "threads": threads or None,
    }
    if quantized is not None:
        from dopq.serialize import load_quantized

        comparing = time.perf_counter()
        model, config, saved = load_quantized(quantized)
        _check_same_model(meta, config, model, quantized, path, saved)
        dtype = meta.get("float_dtype", "float32")
        agreement = compare(
            in_dtype(model, dtype), onnx_model, loader, progress=progress, desc=f"simulation vs {runtime}"
        )
        timings["comparison"] = time.perf_counter() - comparing
        result["comparison"] = {
            "quantized_path": str(quantized),
            "simulation_dtype": dtype,
            # torch's threads, which the simulated logits depend on (the result's threads are the runtime's)
            "simulation_threads": torch.get_num_threads(),
            **agreement.to_dict(),
        }
    result["data"] = _loader_data_report(loader, skip_bad_images)
    return result
