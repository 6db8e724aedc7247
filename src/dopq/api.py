"""The Python API: ``quantize(model, calib_data, config) -> model``, in torchao's style."""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from dopq.calibrate import calibrate, capture_inputs, correct_bias
from dopq.centring import CentringReport, centre_values
from dopq.checkpoint import ReconstructionCheckpoint, SavedRun, restore_model
from dopq.config import RECIPE_ATTRIBUTE, RECOMMENDED, QuantConfig, get_preset
from dopq.errors import ConfigError
from dopq.gptq import gptq_model
from dopq.models import Coverage, QuantPlan, prepare_model, softmax_kinds, softmax_off_grid
from dopq.models.loading import as_dopq_model, weights_dtype
from dopq.modules import float_logits, quantizers_of
from dopq.reconstruct import ReconstructionProgress, check_processes, reconstruct
from dopq.reparam import ReparamReport, reparameterize
from dopq.rounding_check import can_keep_gptq, keep_better_rounding, last_output

__all__ = ["QuantizationReport", "as_image_tensor", "check_model_runs", "quantize", "quantize_with_report"]

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
            # the attention modules whose v value centring could not shift (their v keeps its mean)
            "centring_skipped": None if self.centring is None else list(self.centring.skipped),
            "reconstruction": self.reconstruction,
            "gptq": self.gptq,
            "coverage": None if self.coverage is None else self.coverage.to_dict(),
        }


def as_image_tensor(
    data: torch.Tensor | Iterable[Any] | Any, device: torch.device | str, model: nn.Module | None = None
) -> torch.Tensor:
    """Calibration images as one float32 ``(N, C, H, W)`` tensor on ``device``.

    ``data`` is a tensor or array of images (``(N, C, H, W)``, or one ``(C, H, W)`` image), one
    ``(images, labels)`` batch (``next(iter(loader))``), or an iterable (a list, a ``Dataset``, a
    ``DataLoader``, a generator) of batches or single images,
    each bare, the first item of a tuple or list (``(images, labels)``), or a dict's
    ``pixel_values`` (what ``transformers`` image processors give). The images must be
    preprocessed as the model expects (resized, scaled and normalized); PIL images are
    preprocessed with the model's own preprocessing (its ``pretrained_cfg``), so ``model`` is
    needed for them.

    Raises:
        ConfigError: no images; a form or layout that is not one of the above (uint8 pixels,
            channels last, another number of channels); values that cannot be normalized images.
    """
    if data is None:
        raise ConfigError("calibration data is None: give images as a tensor or an iterable of batches")
    transform = functools.cache(lambda: _model_transform(model))  # built at the first PIL image
    # a transformers BatchFeature (what image processors return) is a Mapping, not a dict
    if isinstance(data, Mapping) or _is_labelled_batch(data) or not _is_iterable_collection(data):
        images = _image_batch(data, transform)
    else:
        items = (
            data if isinstance(data, Iterable) else (data[i] for i in range(len(data)))
        )  # a map-style Dataset
        batches = [_image_batch(item, transform) for item in items]
        if not batches:
            raise ConfigError("calibration data is empty")
        shapes = {tuple(b.shape[1:]) for b in batches}
        if len(shapes) > 1:
            raise ConfigError(
                f"calibration images of different shapes {sorted(shapes)}: resize them to one size"
            )
        images = torch.cat(batches)
    _check_images(images, model)
    images = images.to(device)
    # images made under torch.inference_mode cannot enter a computation autograd records
    # (reconstruction's): a copy made outside it can
    return images.clone() if images.is_inference() and not torch.is_inference_mode_enabled() else images


def _is_labelled_batch(data: Any) -> bool:
    """One ``(images, targets)`` batch, as ``next(iter(loader))`` gives it: a pair of a 4-d image
    batch and one target per image (it was read as two batches, the targets refused): integer
    labels, a list of them, or anything that cannot be an image batch: float targets of at most two
    dimensions (soft or one-hot labels, timm's mixup), integer masks."""
    if not (isinstance(data, tuple | list) and len(data) == 2):
        return False
    images, targets = data
    if not (isinstance(images, torch.Tensor | np.ndarray) and images.ndim == 4):
        return False
    if isinstance(targets, list | tuple):
        return len(targets) == len(images) and all(isinstance(t, int | float) for t in targets)
    if not isinstance(targets, torch.Tensor | np.ndarray) or targets.ndim == 0:
        return False
    floating = torch.as_tensor(targets).is_floating_point()
    return targets.shape[0] == images.shape[0] and (not floating or targets.ndim <= 2)


def _is_iterable_collection(data: Any) -> bool:
    """An iterable of batches or images, not one array or tensor."""
    return not isinstance(data, torch.Tensor | np.ndarray | Image.Image) and (
        isinstance(data, Iterable) or hasattr(data, "__getitem__")
    )


def _image_batch(item: Any, transform: Callable[[], Any]) -> torch.Tensor:
    """One element of the calibration data as a float32 ``(n, C, H, W)`` batch."""
    if isinstance(item, tuple | list) and item and not isinstance(item[0], int | float):
        item = item[0]  # (images, labels)
    if isinstance(item, Mapping):
        if "pixel_values" not in item:
            raise ConfigError(
                f"a calibration batch given as a dict needs 'pixel_values'; it has {sorted(item)}"
            )
        item = item["pixel_values"]
        if isinstance(item, list | tuple) and item:
            item = _stacked(item)
    if isinstance(item, Image.Image):
        from dopq.data import as_rgb

        item = transform()(as_rgb(item))
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if not isinstance(item, torch.Tensor):
        raise ConfigError(
            f"calibration data holds a {type(item).__name__}: give tensors, arrays or PIL images, "
            "alone, in (images, labels) pairs or in dicts with 'pixel_values'"
        )
    if not item.is_floating_point():
        raise ConfigError(
            f"calibration images of dtype {item.dtype}: give float images preprocessed (scaled and "
            "normalized) as the model expects, or PIL images"
        )
    if item.ndim == 3:
        item = item.unsqueeze(0)
    if item.ndim != 4:
        raise ConfigError(
            f"calibration images must be (N, C, H, W) or (C, H, W), got shape {tuple(item.shape)}"
        )
    return item.detach().float()


def _stacked(values: list | tuple) -> Any:
    """``pixel_values`` held in a list: one array per image (a processor's output without
    ``return_tensors``) or nested lists of numbers (a ``datasets`` row in its default format), as
    one tensor; anything else as it was, for the error that names it."""
    if all(isinstance(v, np.ndarray | torch.Tensor) for v in values):
        return torch.stack([torch.as_tensor(v) for v in values])
    if any(isinstance(v, Image.Image) for v in values):
        return values  # numpy would read PIL images as channels-last arrays
    try:
        return torch.as_tensor(np.asarray(values, dtype=np.float32))
    except (TypeError, ValueError):  # ragged or not numbers
        return values


def _model_transform(model: nn.Module | None) -> Any:
    """The model's own evaluation transform, which PIL calibration images go through."""
    from dopq.data import build_transform, preprocess_from_model

    if model is None:
        raise ConfigError("PIL calibration images need the model, whose preprocessing they go through")
    return build_transform(preprocess_from_model(model))


# normalized images: (pixel - mean) / std with pixels in [0, 1] and std of at least ~0.2 stay
# within a few units; raw 0..255 pixels do not
NORMALIZED_MAX_ABS = 20.0


def _input_channels(model: nn.Module) -> int | None:
    """The channels the model's first convolution (its patch embedding) reads."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


def _check_images(images: torch.Tensor, model: nn.Module | None) -> None:
    """Refuse what cannot be the model's preprocessed input; warn where normalization looks skipped."""
    if images.shape[0] == 0:
        raise ConfigError("calibration data is empty")
    channels = None if model is None else _input_channels(model)
    if channels is not None and images.shape[1] != channels:
        layout = " (channels last? give (N, C, H, W))" if images.shape[-1] == channels else ""
        raise ConfigError(
            f"calibration images of shape {tuple(images.shape)} have {images.shape[1]} channels, the "
            f"model reads {channels}{layout}"
        )
    if not torch.isfinite(images).all():
        return  # calibration names the non-finite values
    largest = float(images.abs().max())
    if largest > NORMALIZED_MAX_ABS:
        raise ConfigError(
            f"calibration images reach {largest:.4g}: raw pixel values? Scale and normalize them as the "
            "model expects (its mean and std), or give PIL images"
        )
    if model is not None and float(images.min()) >= 0:
        from dopq.models.loading import model_preprocess

        pre = model_preprocess(model)
        lowest = min((0 - m) / s for m, s in zip(pre["mean"], pre["std"], strict=True))
        if lowest < -0.5:
            log.warning(
                "calibration images are all >= 0, while the model's normalization (mean %s, std %s) "
                "makes dark pixels negative: are they normalized?", pre["mean"], pre["std"],
            )  # fmt: skip


def _check_not_quantized(model: nn.Module) -> None:
    """Quantizing works in place: a second call on the returned model would calibrate quantizers on
    top of quantizers, and its re-parameterization check failed with a RuntimeError."""
    if any(True for _ in quantizers_of(model)):
        raise ConfigError(
            "the model is already quantized (dopq.quantize changes the model it is given): quantize "
            "a fresh float model, e.g. a copy.deepcopy made before the first call"
        )


def check_model_runs(model: nn.Module, images: torch.Tensor) -> None:
    """One image through the float model, so that a size the model cannot take is one clear error
    (a ``transformers`` processor config's size other than the model's, say).

    Raises:
        ConfigError: the model's error, in one line.
    """
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(images[:1])
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(
            f"the model cannot run on calibration images of shape {tuple(images.shape[1:])}: {reason}"
        ) from exc
    finally:
        model.train(training)


@contextmanager
def _timed(timings: dict[str, float], stage: str, bar: tqdm | None = None) -> Iterator[None]:
    """Add the wall time of the block to ``timings[stage]``; ``bar`` names the stage while it runs."""
    if bar is not None:
        bar.set_postfix_str(f"now {stage.replace('_', ' ')}")
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
        if bar is not None:
            bar.update()


def _stage_bar(progress: bool) -> tqdm:
    """The bar of the stages before reconstruction: which one runs, and since when. Without it a
    terminal showed nothing between the float evaluation and the quantized one, minutes on a large
    model (GPTQ, its check)."""
    return tqdm(
        desc="quantize",
        disable=not progress,
        leave=False,
        bar_format="{desc}{postfix} [{elapsed}]",
    )


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


def _stages_before_reconstruction(
    model: nn.Module,
    plan: QuantPlan,
    images: torch.Tensor,
    config: QuantConfig,
    report: QuantizationReport,
    bar: tqdm,
) -> None:
    """Value centring, calibration, re-parameterization, GPTQ (and its check) and bias correction,
    each named on ``bar`` (:func:`_stage_bar`) while it runs."""
    timings = report.timings
    if config.centre_values:
        with _timed(timings, "value_centring", bar):
            report.centring = centre_values(model, images)
        if report.centring.skipped:
            skipped = report.centring.skipped
            log.warning(
                "value centring (centre_values, --centre-values) could not shift v in %d attention "
                "modules (%s): a norm or a gate sits between attn @ v and the output projection, or no "
                "image reaches it; their v keeps its mean", len(skipped), _some(skipped),
            )  # fmt: skip
    capture = plan.paired_linears if config.ln_scale == "search" else ()
    with _timed(timings, "calibration", bar), capture_inputs(model, capture) as captured:
        calibrate(model, images)
    with _timed(timings, "reparameterization", bar):
        report.reparam = reparameterize(
            model,
            plan,
            rule=config.ln_scale,
            integer_zero_point=config.integer_zero_point,
            shift=config.ln_shift,
            check_images=images[:4],
            captured=captured,
        )
    float_weights, nearest, reference = _gptq_stage(model, images, config, report, bar)
    corrected_logits = None
    if config.bias_correction:  # a stage the recipe skips has no time (repq printed 0.00 s)
        with _timed(timings, "bias_correction", bar):
            corrected_logits = _correct_bias(model, images, config, float_weights)
    if nearest is not None:
        with _timed(timings, "gptq_check", bar):
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


def _gptq_stage(
    model: nn.Module, images: torch.Tensor, config: QuantConfig, report: QuantizationReport, bar: tqdm
) -> tuple[dict[str, torch.Tensor] | None, nn.Module | None, torch.Tensor | None]:
    """GPTQ rounding where the recipe has it: the float weights it aimed at (for bias correction),
    and for its calibration check the round-to-nearest model and the float logits; Nones without."""
    if config.weight_rounding != "gptq":
        return None, None, None
    if config.gptq_check and not can_keep_gptq(len(images)):
        # the check would put round-to-nearest back whatever GPTQ did: the same model, without
        # GPTQ's time (minutes on a ViT-L)
        report.gptq = {"target": config.gptq_target_used, "layers": 0, "skipped": "too few images"}
        log.info("GPTQ skipped: its check cannot keep it on %d calibration images", len(images))
        return None, None, None
    timings = report.timings
    nearest = reference = None
    if config.gptq_check:  # the round-to-nearest model, finished by the caller for the check
        with _timed(timings, "gptq_check", bar):
            reference = float_logits(model, images)
            nearest = copy.deepcopy(model)
    with _timed(timings, "gptq", bar):
        target = config.gptq_target_used
        float_weights = gptq_model(
            model,
            images,
            config.gptq_damp,
            config.gptq_act_order,
            target=target,
            target_shrink=config.gptq_target_shrink,
            unrounded=nearest,
        )
        shrink = config.gptq_target_shrink if target == "float" else None
        report.gptq = {"target": target, "target_shrink": shrink, "layers": len(float_weights)}
    return float_weights, nearest, reference


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
    # under the caller's torch.inference_mode, which torch.enable_grad does not lift, the forward
    # that finds the LayerNorm -> Linear pairs had no autograd graph: the re-parameterization did
    # nothing without a word, and the folded weights were inference tensors no training could use
    with torch.inference_mode(False):
        return _quantize_with_report(
            model, calib_data, config, recon_data, progress, allow_partial, checkpoint
        )


def _quantize_with_report(
    model: nn.Module,
    calib_data: torch.Tensor | Iterable[Any],
    config: QuantConfig | str | None,
    recon_data: torch.Tensor | Iterable[Any] | None,
    progress: bool,
    allow_partial: bool,
    checkpoint: ReconstructionCheckpoint | None,
) -> tuple[nn.Module, QuantizationReport]:
    config = _as_config(config)
    if checkpoint is not None and config.reconstruct is None:
        raise ConfigError("a reconstruction checkpoint needs a recipe with reconstruction")
    if config.reconstruct is not None:
        check_processes(config.reconstruct.grad_shards)  # before calibration's work
    model = _float32_model(model)
    images = as_image_tensor(calib_data, next(model.parameters()).device, model)
    check_model_runs(model, images)
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
        with _stage_bar(progress) as bar:
            _stages_before_reconstruction(model, plan, images, config, report, bar)
    else:
        restore_model(model, saved, checkpoint.path)
        _resume_stages(report, saved.stages)
    if plan.coverage is not None:
        plan.coverage.softmax_kinds = softmax_kinds(model)
    if config.reconstruct is not None:
        # reconstruction's own images stay on the CPU (1024 by default): it moves each batch to the device
        recon_images = images if recon_data is None else as_image_tensor(recon_data, "cpu", model)
        _reconstruction_stage(
            model, fp_model, plan, recon_images, config, report, checkpoint, saved, progress
        )
    if plan.coverage is not None:
        _report_off_grid(plan.coverage, softmax_off_grid(model), config)
    setattr(model, RECIPE_ATTRIBUTE, config.to_dict())  # what save_quantized may record
    log.info("quantized %s: %s", plan.adapter.family, {k: round(v, 2) for k, v in timings.items()})
    return model, report


def _report_off_grid(coverage: Coverage, off_grid: list[str], config: QuantConfig) -> None:
    """Record, and say, where the recipe's TanQ threshold grid did not fit: those tables keep their
    exact midpoints (the simulation and the export agree), so the switch did nothing there."""
    coverage.softmax_off_grid = off_grid
    if off_grid:
        total = sum(kind == "tanq" for kind in coverage.softmax_kinds.values())
        log.warning(
            "softmax_grid_bits %s (--softmax-grid-bits) is too coarse for the TanQ levels of %d of %d "
            "attention modules (%s): they keep the exact midpoints, and the export compares with each "
            "threshold there instead of reading one table", config.softmax_grid_bits, len(off_grid),
            total, _some(off_grid),
        )  # fmt: skip


def _some(names: list[str]) -> str:
    """The first three of ``names`` for a warning line, and ``...`` where there are more."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _as_config(config: QuantConfig | str | None) -> QuantConfig:
    """The recipe a ``quantize`` call asks for: a preset by name (None: the recommended one) or a
    config, validated again (fields assigned after construction are checked too)."""
    if config is None or isinstance(config, str):
        return get_preset(config or RECOMMENDED)
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, a preset name or None, got {type(config).__name__}")
    return config.checked()


def _float32_model(model: nn.Module) -> nn.Module:
    """``model`` as dopq quantizes it (a ``transformers`` model wrapped), refused unless it is a
    float32 model that dopq has not quantized already."""
    model = as_dopq_model(model)
    _check_not_quantized(model)
    dtype = weights_dtype(model, ConfigError)
    if dtype != torch.float32:
        raise ConfigError(f"dopq quantizes float32 models; this one is {dtype}: call model.float() first")
    _replace_inference_tensors(model)
    return model


def _replace_inference_tensors(model: nn.Module) -> None:
    """Parameters and buffers made under ``torch.inference_mode`` (a model built inside it) become
    ordinary copies, shared ones still shared: autograd, which finds the LayerNorm -> Linear pairs
    and runs reconstruction, cannot record them."""
    copies: dict[int, torch.Tensor] = {}

    def ordinary(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in copies:
            copies[id(t)] = (
                nn.Parameter(t.clone(), t.requires_grad) if isinstance(t, nn.Parameter) else t.clone()
            )
        return copies[id(t)]

    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is not None and t.is_inference():
                    tensors[name] = ordinary(t)


def _reconstruction_stage(
    model: nn.Module,
    fp_model: nn.Module,
    plan: QuantPlan,
    images: torch.Tensor,
    config: QuantConfig,
    report: QuantizationReport,
    checkpoint: ReconstructionCheckpoint | None,
    saved: SavedRun | None,
    progress: bool,
) -> None:
    """Block reconstruction, checkpointed after calibration (unless resumed) and after every unit."""
    units = len(plan.adapter.units(model))
    stages = _stages(report)
    if checkpoint is not None and saved is None:
        checkpoint.write(model, stages, None, units)

    def after_unit(state: ReconstructionProgress) -> None:
        if checkpoint is not None:
            checkpoint.write(model, stages, state, units)

    with _timed(report.timings, "reconstruction"):
        report.reconstruction = reconstruct(
            model,
            fp_model,
            plan,
            images,
            config,
            progress=progress,
            resume_from=None if saved is None else saved.progress,
            after_unit=after_unit,
        )
    if saved is not None and saved.progress is not None:
        # the units the stopped run finished are part of this reconstruction (and of its
        # "seconds"), as the restored stages before it are: not only this run's share
        report.timings["reconstruction"] += saved.progress.seconds


def quantize(
    model: nn.Module,
    calib_data: torch.Tensor | Iterable[Any],
    config: QuantConfig | str | None = None,
    recon_data: torch.Tensor | Iterable[Any] | None = None,
    progress: bool = True,
    allow_partial: bool = False,
) -> nn.Module:
    """Quantize a timm ViT/DeiT/Swin (or a ``transformers`` ViT/DeiT/Swin/BEiT/DINOv2 classifier,
    returned wrapped as ``forward(images) -> logits``; see :func:`quantize_with_report`) in place and
    return it.

    Example:
        >>> import timm, torch, dopq
        >>> model = timm.create_model("test_vit", num_classes=10).eval()
        >>> qmodel = dopq.quantize(model, torch.randn(4, 3, 160, 160), dopq.get_preset("repq", w_bits=8, a_bits=8))
        >>> qmodel(torch.randn(1, 3, 160, 160)).shape
        torch.Size([1, 10])
    """
    return quantize_with_report(model, calib_data, config, recon_data, progress, allow_partial)[0]
