"""The Python API: ``quantize(model, calib_data, config) -> model``, in torchao's style."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dopq.calibrate import calibrate, capture_inputs, correct_bias
from dopq.centring import CentringReport, centre_values
from dopq.checkpoint import ReconstructionCheckpoint, restore_model
from dopq.config import RECOMMENDED, QuantConfig, get_preset
from dopq.errors import ConfigError
from dopq.gptq import gptq_model
from dopq.models import Coverage, QuantPlan, prepare_model, softmax_kinds
from dopq.models.loading import as_dopq_model
from dopq.reconstruct import ReconstructionProgress, reconstruct
from dopq.reparam import ReparamReport, reparameterize
from dopq.rounding_check import float_logits, keep_better_rounding, last_output

__all__ = ["QuantizationReport", "as_image_tensor", "quantize", "quantize_with_report"]

log = logging.getLogger(__name__)


@dataclass
class QuantizationReport:
    """What :func:`quantize_with_report` did and how long each stage took (seconds)."""

    config: QuantConfig
    family: str
    timings: dict[str, float] = field(default_factory=dict)
    reparam: ReparamReport | None = None
    centring: CentringReport | None = None
    reconstruction: dict[str, Any] | None = None
    gptq: dict[str, Any] | None = None  # the objective GPTQ used and how many layers it rounded
    coverage: Coverage | None = None

    @property
    def calib_seconds(self) -> float:
        """Value centring + calibration + re-parameterization (with its weight re-calibration) + GPTQ
        (with its check) + bias correction: everything but data loading, reconstruction and evaluation."""
        stages = (
            "value_centring",
            "calibration",
            "reparameterization",
            "gptq",
            "gptq_check",
            "bias_correction",
        )
        return sum(self.timings.get(stage, 0.0) for stage in stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "timings": dict(self.timings),
            "calib_seconds": self.calib_seconds,
            "reparam_max_logit_change": None if self.reparam is None else self.reparam.max_logit_change,
            "centring_max_logit_change": None if self.centring is None else self.centring.max_logit_change,
            "reconstruction": self.reconstruction,
            "gptq": self.gptq,
            "coverage": None if self.coverage is None else self.coverage.to_dict(),
        }


def as_image_tensor(data: torch.Tensor | Iterable[Any], device: torch.device | str) -> torch.Tensor:
    """Stack calibration data given as a tensor, or as batches of images or (images, labels)."""
    if isinstance(data, torch.Tensor):
        images = data
    else:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
        if not batches:
            raise ConfigError("calibration data is empty")
        images = torch.cat(batches)
    if images.ndim != 4:
        raise ConfigError(f"calibration images must be (N, C, H, W), got shape {tuple(images.shape)}")
    return images.to(device)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[stage]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def _stages(report: QuantizationReport) -> dict[str, Any]:
    """The report of the stages before reconstruction, as a checkpoint keeps it."""
    reparam = None if report.reparam is None else asdict(report.reparam)
    centring = None if report.centring is None else asdict(report.centring)
    return {"timings": dict(report.timings), "reparam": reparam, "centring": centring, "gptq": report.gptq}


def _resume_stages(report: QuantizationReport, stages: dict[str, Any]) -> None:
    report.timings.update(stages["timings"])
    report.reparam = None if stages["reparam"] is None else ReparamReport(**stages["reparam"])
    report.gptq = stages["gptq"]
    centring = stages.get("centring")  # absent from checkpoints written before value centring
    report.centring = None if centring is None else CentringReport(**centring)


def _calibrate_and_reparameterize(
    model: nn.Module, plan: QuantPlan, images: torch.Tensor, config: QuantConfig, report: QuantizationReport
) -> None:
    """Calibration, re-parameterization, GPTQ and bias correction: everything before reconstruction."""
    timings = report.timings
    if config.centre_values:
        with _timed(timings, "value_centring"):
            report.centring = centre_values(model, images)
    capture = plan.paired_linears if config.ln_scale == "search" else ()
    with _timed(timings, "calibration"), capture_inputs(model, capture) as captured:
        calibrate(model, images)
    with _timed(timings, "reparameterization"):
        report.reparam = reparameterize(
            model,
            plan,
            rule=config.ln_scale,
            integer_zero_point=config.integer_zero_point,
            shift=config.ln_shift,
            check_images=images[:4],
            captured=captured,
        )
    float_weights = nearest = reference = None
    if config.weight_rounding == "gptq":
        if config.gptq_check:  # the round-to-nearest model, finished below for the check
            with _timed(timings, "gptq_check"):
                reference = float_logits(model, images)
                nearest = copy.deepcopy(model)
        with _timed(timings, "gptq"):
            target = config.gptq_target_used
            float_weights = gptq_model(
                model,
                images,
                config.gptq_damp,
                config.gptq_act_order,
                target=target,
                target_shrink=config.gptq_target_shrink,
            )
            shrink = config.gptq_target_shrink if target == "float" else None
            report.gptq = {"target": target, "target_shrink": shrink, "layers": len(float_weights)}
    with _timed(timings, "bias_correction"):
        corrected_logits = _correct_bias(model, images, config, float_weights)
    if nearest is not None:
        with _timed(timings, "gptq_check"):
            check = keep_better_rounding(
                model,
                nearest,
                images,
                reference,
                corrected_logits,
                lambda m: _correct_bias(m, images, config),
            )
            report.gptq["check"] = check.to_dict()
            log.info("GPTQ rounding %s: %s", "kept" if check.keep_gptq else "dropped", check)


def _correct_bias(
    model: nn.Module,
    images: torch.Tensor,
    config: QuantConfig,
    float_weights: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Bias correction where the recipe has it; the logits its pass computed (those of the
    corrected model on the images it corrected on), else None."""
    if not config.bias_correction:
        return None
    with last_output(model) as correction_pass:
        correct_bias(model, images, reference_weights=float_weights)
    return correction_pass.value


def quantize_with_report(
    model: nn.Module,
    calib_data: torch.Tensor | Iterable[Any],
    config: QuantConfig | str | None = None,
    recon_data: torch.Tensor | Iterable[Any] | None = None,
    progress: bool = True,
    allow_partial: bool = False,
    checkpoint: ReconstructionCheckpoint | None = None,
) -> tuple[nn.Module, QuantizationReport]:
    """Quantize ``model`` in place and report per-stage timings.

    Args:
        model: a float timm ViT/DeiT/Swin, or a ``transformers`` ViT/DeiT/Swin/BEiT/DINOv2 image
            classifier (returned wrapped as ``forward(images) -> logits``; its modules are
            quantized in place).
        calib_data: calibration images (RepQ-ViT protocol: 32 images in one batch).
        config: a :class:`QuantConfig`, a preset name (``"recommended"``, ``"dopq"``, ``"repq"``) or
            None for the recommended preset at W4/A4.
        recon_data: images for block reconstruction (defaults to ``calib_data``); only used when
            ``config.reconstruct`` is set.
        progress: show progress bars.
        allow_partial: quantize what dopq can and keep the rest float (listed in the report's
            coverage) instead of refusing a model with layers it cannot quantize.
        checkpoint: with reconstruction, where to checkpoint after calibration and after every
            unit, and to resume from (:mod:`dopq.checkpoint`); the result is the uninterrupted one.

    Returns:
        The quantized model (same object; a ``transformers`` model comes back wrapped) and the report.
    """
    if config is None or isinstance(config, str):
        config = get_preset(config or RECOMMENDED)
    if checkpoint is not None and config.reconstruct is None:
        raise ConfigError("a reconstruction checkpoint needs a recipe with reconstruction")
    model = as_dopq_model(model)
    device = next(model.parameters()).device
    images = as_image_tensor(calib_data, device)
    timings: dict[str, float] = {}
    saved = checkpoint.load() if checkpoint is not None else None
    fp_model = copy.deepcopy(model) if config.reconstruct is not None else None
    with _timed(timings, "prepare"):
        plan: QuantPlan = prepare_model(model, config, allow_partial)
    report = QuantizationReport(
        config=config, family=plan.adapter.family, timings=timings, coverage=plan.coverage
    )
    log.info("coverage: %s", plan.coverage.summary())
    if saved is None:
        _calibrate_and_reparameterize(model, plan, images, config, report)
    else:
        restore_model(model, saved, checkpoint.path)
        _resume_stages(report, saved.stages)
    if plan.coverage is not None:
        plan.coverage.softmax_kinds = softmax_kinds(model)
    if config.reconstruct is not None:
        units = len(plan.adapter.units(model))
        stages = _stages(report)
        if checkpoint is not None and saved is None:
            checkpoint.write(model, stages, None, units)

        def after_unit(state: ReconstructionProgress) -> None:
            if checkpoint is not None:
                checkpoint.write(model, stages, state, units)

        recon_images = images if recon_data is None else as_image_tensor(recon_data, "cpu")
        with _timed(timings, "reconstruction"):
            report.reconstruction = reconstruct(
                model,
                fp_model,
                plan,
                recon_images,
                config,
                progress=progress,
                resume_from=None if saved is None else saved.progress,
                after_unit=after_unit,
            )
    log.info("quantized %s: %s", plan.adapter.family, {k: round(v, 2) for k, v in timings.items()})
    return model, report


def quantize(
    model: nn.Module,
    calib_data: torch.Tensor | Iterable[Any],
    config: QuantConfig | str | None = None,
    recon_data: torch.Tensor | Iterable[Any] | None = None,
    progress: bool = True,
    allow_partial: bool = False,
) -> nn.Module:
    """Quantize a timm ViT/DeiT/Swin in place and return it.

    Example:
        >>> import timm, torch, dopq
        >>> model = timm.create_model("test_vit", num_classes=10).eval()
        >>> qmodel = dopq.quantize(model, torch.randn(4, 3, 160, 160), dopq.get_preset("repq", w_bits=8, a_bits=8))
        >>> qmodel(torch.randn(1, 3, 160, 160)).shape
        torch.Size([1, 10])
    """
    return quantize_with_report(model, calib_data, config, recon_data, progress, allow_partial)[0]
