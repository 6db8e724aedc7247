"""Quantize-and-evaluate runs: the work behind ``dopq quantize`` and the benchmark scripts.

A :class:`Workload` holds what does not change between recipes (model source, preprocessing,
calibration images, evaluation subset); :func:`run_recipe` quantizes a fresh copy of the model
with one recipe and evaluates it, returning a JSON-ready result.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import dopq
from dopq.api import quantize_with_report
from dopq.config import QuantConfig
from dopq.data import (
    Preprocess,
    build_transform,
    calibration_indices,
    card_path_for,
    load_batch,
    make_loader,
    open_split,
    preprocess_from_card,
    preprocess_from_model,
    resolve_eval_split,
    single_line_errors,
    strided_indices,
)
from dopq.errors import ConfigError
from dopq.evaluate import EvalResult, evaluate
from dopq.models import build_model, get_adapter

__all__ = [
    "RunSettings",
    "Workload",
    "evaluate_onnx",
    "evaluate_saved",
    "load_workload",
    "resolve_device",
    "run_recipe",
]

log = logging.getLogger(__name__)


@dataclass
class RunSettings:
    """Everything about a run that is not the recipe: model source, data, subsets, device."""

    model: str
    data: str
    checkpoint: str | None = None
    num_classes: int | None = None
    pretrained: bool = False
    calib_split: str = "train"
    eval_split: str | None = None
    calib_size: int = 32
    seed: int = 0
    eval_subset: int | None = None
    batch_size: int = 64
    workers: int = 0
    device: str = "cpu"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    fp_eval: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:i]``, refusing CUDA when none is available."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {name!r}")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def command_line() -> str:
    """The command that is running, as a user would retype it."""
    args = [shlex.quote(a) for a in sys.argv[1:]]
    prog = "dopq" if Path(sys.argv[0]).name in ("dopq", "cli.py", "__main__.py") else sys.argv[0]
    return " ".join([prog, *args])


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


PREPROCESS_OVERRIDES = ("mean", "std", "interpolation", "crop_pct")


def preprocess_overrides(source: Any) -> dict[str, Any]:
    """The preprocessing fields set on ``source`` (run settings or parsed CLI arguments)."""
    values = {k: getattr(source, k, None) for k in PREPROCESS_OVERRIDES}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


def _preprocess(settings: RunSettings, model: nn.Module) -> Preprocess:
    card = card_path_for(settings.checkpoint) if settings.checkpoint else None
    pre = preprocess_from_card(card) if card else preprocess_from_model(model)
    overrides = preprocess_overrides(settings)
    return replace(pre, **overrides) if overrides else pre


@dataclass
class Workload:
    """Loaded inputs shared by every recipe of a run."""

    settings: RunSettings
    model: nn.Module
    preprocess: Preprocess
    calib_images: torch.Tensor
    eval_dataset: Any
    eval_indices: list[int]
    calib_dataset: Any
    timings: dict[str, float] = field(default_factory=dict)
    fp_result: EvalResult | None = None

    def recon_images(self, n: int) -> torch.Tensor:
        """The first ``n`` images of the seeded permutation (the calibration set is its prefix)."""
        idx = calibration_indices(len(self.calib_dataset), n, self.settings.seed)
        with single_line_errors():
            return load_batch(self.calib_dataset, idx, num_workers=self.settings.workers)[0]


def load_workload(settings: RunSettings) -> Workload:
    """Build the float model and load the calibration images and the evaluation subset."""
    t0 = time.perf_counter()
    resolve_device(settings.device)
    model = build_model(settings.model, settings.checkpoint, settings.num_classes, settings.pretrained)
    get_adapter(model)  # refuse unsupported families before touching the data
    pre = _preprocess(settings, model)
    transform = build_transform(pre)
    calib_ds = open_split(settings.data, settings.calib_split, transform)
    eval_ds = open_split(settings.data, resolve_eval_split(settings.data, settings.eval_split), transform)
    idx = calibration_indices(len(calib_ds), settings.calib_size, settings.seed)
    with single_line_errors():
        calib = load_batch(calib_ds, idx, num_workers=settings.workers)[0]
    eval_idx = strided_indices(len(eval_ds), settings.eval_subset)
    timings = {"load": time.perf_counter() - t0}
    return Workload(settings, model, pre, calib, eval_ds, eval_idx, calib_ds, timings)


def _evaluate(work: Workload, model: nn.Module, desc: str, progress: bool) -> EvalResult:
    s = work.settings
    loader = make_loader(work.eval_dataset, work.eval_indices, s.batch_size, s.workers)
    with single_line_errors():
        return evaluate(model, loader, device=s.device, progress=progress, desc=desc)


def fp_baseline(work: Workload, progress: bool = True) -> EvalResult:
    """Evaluate the float model once per workload."""
    if work.fp_result is None:
        model = copy.deepcopy(work.model).to(work.settings.device)
        work.fp_result = _evaluate(work, model, "fp32", progress)
    return work.fp_result


def git_revision() -> dict[str, Any] | None:
    """The dopq checkout's commit and whether its tree has uncommitted changes (None outside git)."""
    import subprocess

    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if here != top / "src" / "dopq":  # an installed copy inside some other repository
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "dopq": dopq.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnxruntime": ort_version,
        "python": platform.python_version(),
    }


def _provenance(work: Workload) -> dict[str, Any]:
    s = work.settings
    return {
        "command": command_line(),
        "checkpoint_sha256": _sha256(s.checkpoint) if s.checkpoint else None,
        "versions": _versions(),
        "git": git_revision(),
        "device_name": torch.cuda.get_device_name()
        if s.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


def run_recipe(
    work: Workload,
    config: QuantConfig,
    method: str = "custom",
    progress: bool = True,
    recon_size: int | None = None,
    allow_partial: bool = False,
) -> tuple[dict[str, Any], nn.Module]:
    """Quantize a copy of the workload's model with ``config`` and evaluate it.

    Returns:
        ``(result, quantized_model)``; ``result`` has the fields of the CLI's JSON output.
    """
    s = work.settings
    fp = fp_baseline(work, progress) if s.fp_eval else None
    model = copy.deepcopy(work.model).to(s.device)
    recon = None
    if config.reconstruct is not None:
        recon = work.recon_images(recon_size or config.reconstruct.calib_size)
    model, report = quantize_with_report(
        model,
        work.calib_images.to(s.device),
        config,
        recon_data=recon,
        progress=progress,
        allow_partial=allow_partial,
    )
    quant = _evaluate(work, model, f"{method} W{config.w_bits}A{config.a_bits}", progress)
    result = {
        "model": s.model,
        "method": method,
        "w_bits": config.w_bits,
        "a_bits": config.a_bits,
        "fp_top1": fp.top1 if fp else None,
        "quant_top1": quant.top1,
        "fp_top5": fp.top5 if fp else None,
        "quant_top5": quant.top5,
        "fp_top1_correct": fp.top1_correct if fp else None,
        "quant_top1_correct": quant.top1_correct,
        "calib_seconds": report.calib_seconds,
        "eval_images": quant.images,
        "eval_images_per_second": quant.images_per_second,
        "fp_eval_images_per_second": fp.images_per_second if fp else None,
        "timings": {**work.timings, **report.timings},
        "reconstruction": report.reconstruction,
        "reparam_max_logit_change": report.reparam.max_logit_change if report.reparam else None,
        "coverage": report.coverage.to_dict() if report.coverage else None,
        "coverage_summary": report.coverage.summary() if report.coverage else None,
        "config": {"recipe": config.to_dict(), "run": s.to_dict(), "preprocess": work.preprocess.to_dict()},
        **_provenance(work),
    }
    return result, model


def _eval_loader(
    data: str, split: str | None, subset: int | None, pre: Preprocess, batch_size: int, workers: int
) -> Any:
    """The strided evaluation subset of ``data``'s evaluation split, preprocessed by ``pre``."""
    dataset = open_split(data, resolve_eval_split(data, split), build_transform(pre))
    return make_loader(dataset, strided_indices(len(dataset), subset), batch_size, workers)


def evaluate_saved(
    path: str | Path,
    data: str,
    arch: str | None = None,
    eval_split: str | None = None,
    eval_subset: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a model saved by ``dopq quantize --save`` with its recorded preprocessing
    (``overrides`` replaces fields of it, e.g. ``{"crop_pct": 1.0}``)."""
    from dopq.serialize import load_quantized

    resolve_device(device)
    model, config, meta = load_quantized(path, arch=arch, device=device)
    pre = replace(Preprocess(**meta["preprocess"]), **(overrides or {}))
    loader = _eval_loader(data, eval_split, eval_subset, pre, batch_size, workers)
    with single_line_errors():
        res = evaluate(model, loader, device=device, progress=progress, desc="saved")
    return {
        "model": model.pretrained_cfg.get("architecture"),
        "method": "saved",
        "w_bits": config.w_bits,
        "a_bits": config.a_bits,
        "fp_top1": None,
        "fp_top5": None,
        "quant_top1": res.top1,
        "quant_top5": res.top5,
        "eval_images": res.images,
        "eval_images_per_second": res.images_per_second,
        "quantized_path": str(path),
        "recorded_quant_top1": meta.get("quant_top1"),
        "config": {"recipe": config.to_dict(), "preprocess": pre.to_dict()},
        "command": command_line(),
    }


def _onnx_preprocess(meta: dict[str, Any], overrides: dict[str, Any] | None) -> Preprocess:
    if isinstance(meta.get("preprocess"), dict):
        pre = Preprocess(**meta["preprocess"])
    elif meta.get("arch"):
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
    workers: int = 0,
    threads: int | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate an exported ONNX model with onnxruntime (CPU) under the usual protocol.

    With ``quantized`` (a ``dopq quantize --save`` file) both run on the same images and the result
    also holds the share of identical top-1 predictions and the largest logit difference.
    """
    from dopq.evaluate import compare
    from dopq.export import OnnxModel

    onnx_model = OnnxModel(path, threads=threads)
    meta = onnx_model.metadata()
    pre = _onnx_preprocess(meta, overrides)
    loader = _eval_loader(data, eval_split, eval_subset, pre, batch_size, workers)
    with single_line_errors():
        res = evaluate(onnx_model, loader, progress=progress, desc="onnxruntime")
    recipe = meta.get("recipe") or {}
    result: dict[str, Any] = {
        "model": meta.get("arch"),
        "method": "onnx",
        "w_bits": recipe.get("w_bits"),
        "a_bits": recipe.get("a_bits"),
        "fp_top1": None,
        "fp_top5": None,
        "quant_top1": res.top1,
        "quant_top5": res.top5,
        "quant_top1_correct": res.top1_correct,
        "eval_images": res.images,
        "eval_images_per_second": res.images_per_second,
        "onnx_path": str(path),
        "onnx_metadata": {k: v for k, v in meta.items() if k != "preprocess"},
        "config": {"preprocess": pre.to_dict()},
        "command": command_line(),
        "versions": _versions(),
        "git": git_revision(),
        "threads": threads or torch.get_num_threads(),
    }
    if quantized is not None:
        from dopq.serialize import load_quantized

        model, _, _ = load_quantized(quantized)
        agreement = compare(model, onnx_model, loader, progress=progress, desc="simulation vs onnxruntime")
        result["comparison"] = {"quantized_path": str(quantized), **agreement.to_dict()}
    return result
