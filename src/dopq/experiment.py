"""Quantize-and-evaluate runs: the work behind ``dopq quantize`` and the benchmark scripts.

A :class:`Workload` holds what does not change between recipes (model source, preprocessing,
calibration images, evaluation subset); :func:`run_recipe` quantizes a fresh copy of the model
with one recipe and evaluates it, returning a JSON-ready result. Evaluating a saved model or an
exported graph again is :mod:`dopq.reevaluate`'s, with the result fields defined here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dopq import distributed
from dopq.api import check_model_runs, quantize_with_report
from dopq.checkpoint import ReconstructionCheckpoint, RunIdentity
from dopq.config import QuantConfig
from dopq.data import (
    ImageLoader,
    Preprocess,
    SkippedImage,
    build_transform,
    calibration_indices,
    default_workers,
    load_images,
    make_loader,
    open_split,
    preprocess_for,
    resolve_eval_split,
    single_line_errors,
    skipped_report,
    strided_indices,
)
from dopq.devices import resolve_device
from dopq.environment import environment, file_sha256
from dopq.errors import ConfigError, DataError
from dopq.evaluate import CompiledModel, EvalResult, evaluate, merge_results
from dopq.models import build_model, get_adapter
from dopq.models.loading import HF_PREFIX, hf_folder, pretrained_weights
from dopq.modules import in_dtype

__all__ = [
    "RunSettings",
    "Workload",
    "accuracy_fields",
    "across_processes",
    "check_labels",
    "check_same_inputs",
    "checkpoint_identity",
    "data_entry",
    "load_workload",
    "maybe_compiled",
    "run_recipe",
    "sharded_loader",
    "weights_identity",
]

log = logging.getLogger(__name__)


@dataclass
class RunSettings:
    """Everything about a run that is not the recipe: model source, data, subsets, device.

    ``workers=None`` picks :func:`dopq.data.default_workers` for the device (the resolved number is
    what the result records); ``skip_bad_images`` leaves out undecodable images and reports them.
    """

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
    workers: int | None = None
    device: str = "cpu"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    fp_eval: bool = True
    skip_bad_images: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.workers is None:
            self.workers = default_workers(self.device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PREPROCESS_OVERRIDES = ("mean", "std", "interpolation", "crop_pct")


def preprocess_overrides(source: Any) -> dict[str, Any]:
    """The preprocessing fields set on ``source`` (run settings or parsed CLI arguments)."""
    values = {k: getattr(source, k, None) for k in PREPROCESS_OVERRIDES}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


def _pretrained_cfg_source(model: str) -> str:
    """Where the model's ``pretrained_cfg`` preprocessing came from: an ``hf:`` folder's is its
    image processor config, or ``transformers``' ViT processor defaults without one."""
    if not model.startswith(HF_PREFIX):
        return "the model's pretrained_cfg"
    processor = hf_folder(model) / "preprocessor_config.json"
    if processor.is_file():
        return f"image processor config {processor}"
    return "transformers' ViT processor defaults (the folder has no preprocessor_config.json)"


def _preprocess(settings: RunSettings, model: nn.Module) -> tuple[Preprocess, str]:
    """The run's preprocessing and where it came from: the model card beside the checkpoint, else
    the architecture's own ``pretrained_cfg``, with the user's overrides on top."""
    pre, card = preprocess_for(model, settings.checkpoint)
    source = f"card {card}" if card else _pretrained_cfg_source(settings.model)
    overrides = preprocess_overrides(settings)
    if overrides:
        return replace(pre, **overrides), f"{source}, with {', '.join(sorted(overrides))} given"
    if settings.checkpoint and card is None:
        log.warning(
            "no model card beside %s: its preprocessing is %s's default (%s); give --mean, --std, "
            "--interpolation and --crop-pct if it was trained otherwise", settings.checkpoint,
            settings.model, pre.to_dict(),
        )  # fmt: skip
    return pre, source


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
    skipped: dict[str, list[SkippedImage]] = field(default_factory=dict)
    preprocess_source: str = ""  # where the preprocessing came from (card, pretrained_cfg, overrides)
    # the seeded draw's images (<class>/.../<file> in the calibration split): what --seed picked
    # from this listing, which another copy of the data (an image added or removed) changes
    calibration_images: list[str] = field(default_factory=list)
    # which weights the model was built from, hashed when they were read (:func:`weights_identity`)
    weights: dict[str, Any] = field(default_factory=dict)
    _loader: tuple[Any, ImageLoader] | None = field(default=None, repr=False)

    def recon_images(self, n: int) -> torch.Tensor:
        """The first ``n`` images of the seeded permutation (the calibration set is its prefix)."""
        total = len(self.calib_dataset)
        if n > total:  # named as the option that asked for them, not as the calibration size
            raise DataError(
                f"--recon-calib-size {n} exceeds the {total} images of the calibration split "
                f"'{self.settings.calib_split}'; use at most that"
            )
        idx = calibration_indices(total, n, self.settings.seed)
        with single_line_errors():
            loaded = load_images(self.calib_dataset, idx, num_workers=self.settings.workers)
        self.skipped["reconstruction"] = loaded.skipped
        return loaded.images

    def eval_loader(self) -> ImageLoader:
        """The evaluation loader, built once (its workers persist across the FP and quantized passes)."""
        key = (self.eval_dataset, self.eval_indices)
        if self._loader is None or any(a is not b for a, b in zip(self._loader[0], key, strict=True)):
            s = self.settings
            loader = sharded_loader(self.eval_dataset, self.eval_indices, s.batch_size, s.workers, s.device)
            self._loader = (key, loader)
        return self._loader[1]

    def weights_read(self) -> dict[str, Any]:
        """Which weights the model was built from (:func:`weights_identity`): taken by
        :func:`load_workload` when it read them, else now, once."""
        if not self.weights:
            self.weights = weights_identity(self.settings)
        return self.weights

    def data_report(self) -> dict[str, Any]:
        """What the run read: the evaluation split, images asked for, what was skipped, empty
        classes, and the calibration images the seed drew."""
        s = self.settings
        entry = data_entry(
            self.eval_dataset, len(self.eval_indices), s.workers, s.skip_bad_images, self.skipped
        )
        return {**entry, "calibration_images": self.calibration_images}


def sharded_loader(
    dataset: Any, indices: list[int], batch_size: int, workers: int, device: str | torch.device
) -> ImageLoader:
    """The loader of this process's share of the evaluation ``indices`` (all of them in one
    process); its workers persist across passes, and it pins memory for a CUDA device."""
    cuda = resolve_device(str(device)).type == "cuda"
    return make_loader(
        dataset, distributed.shard(indices), batch_size, workers, pin_memory=cuda, persistent_workers=True
    )


def data_entry(
    dataset: Any, requested: int, workers: int, skip: bool, skipped: dict[str, list[SkippedImage]]
) -> dict[str, Any]:
    """The result's ``data`` entry; logs one warning line per set with skipped images."""
    return {
        "eval_split": getattr(dataset, "split", None),
        "eval_images_requested": requested,
        "workers": workers,
        "skip_bad_images": skip,
        "skipped": {what: skipped_report(items, f"{what} set") for what, items in skipped.items()},
        "empty_classes": getattr(dataset, "empty_classes", []),
    }


def check_labels(
    num_classes: int | None,
    eval_ds: Any,
    calib_ds: Any = None,
    trained: bool = True,
    class_names: Sequence[str] | None = None,
) -> None:
    """Refuse an evaluation split whose labels cannot be the model's classes. A label is the
    position of its class folder in the sorted list, so a split with more classes than the model
    has outputs, or one that lacks class folders the calibration split has (a missing folder
    shifts every label after it), scores a meaningless accuracy; so does one whose folders carry
    the model's ``class_names`` (a ``transformers`` config's ``id2label``) in another order. Fewer
    classes than outputs (one dataset's subset) gets a warning where the model's weights were
    ``trained`` (loaded).

    Raises:
        DataError: any case above but the warning.
    """
    classes = list(eval_ds.classes)
    where = f"the evaluation split {eval_ds.split!r}"
    _check_class_order(classes, class_names, where)
    # any calibration class folder missing shifts the labels, extra evaluation folders or not
    missing = sorted(set(calib_ds.classes) - set(classes)) if calib_ds is not None else []
    if missing:
        raise DataError(
            f"{where} lacks the class folder(s) {', '.join(missing[:5])} that the calibration split "
            f"{calib_ds.split!r} has: its labels (sorted class folder positions) would shift; add "
            "the missing folders, empty if need be (an empty class keeps its index)"
        )
    if num_classes is None:
        return
    if len(classes) > num_classes:
        raise DataError(
            f"{where} has {len(classes)} classes but the model has {num_classes} outputs: its labels "
            "cannot be the model's classes"
        )
    if len(classes) < num_classes and trained:
        log.warning(
            "%s has %d classes and the model %d outputs: label i is the i-th class folder in sorted "
            "order, which must be the model's class i", where, len(classes), num_classes,
        )  # fmt: skip


def _check_class_order(classes: list[str], class_names: Sequence[str] | None, where: str) -> None:
    """Folders named as the model's classes must sit at the model's indices: label i is the i-th
    folder in sorted order, and another order would score every image against another class."""
    if not class_names or not set(classes) <= set(class_names):
        return  # other names (ImageNet's synset folders): nothing to compare
    # by position, not by a name -> index map: ImageNet's id2label repeats a few names
    moved = [(i, name) for i, name in enumerate(classes) if class_names[i] != name]
    if moved:
        i, name = moved[0]
        raise DataError(
            f"{where}: class folder {name!r} gets label {i} (its sorted position), but the model's class "
            f"{i} is {class_names[i]!r} and {name!r} is its class {class_names.index(name)} (id2label); "
            f"{len(moved)} of {len(classes)} folders are not at the model's index: rename them so that "
            "their sorted order is the model's class order"
        )


def load_workload(settings: RunSettings) -> Workload:
    """Build the float model and load the calibration images and the evaluation subset."""
    t0 = time.perf_counter()
    resolve_device(settings.device)
    model = build_model(settings.model, settings.checkpoint, settings.num_classes, settings.pretrained)
    # now, not when the result is written: a training job that overwrites the checkpoint during a
    # long run would otherwise have its new weights named as the ones quantized
    weights = weights_identity(settings)
    get_adapter(model)  # refuse unsupported families before touching the data
    pre, pre_source = _preprocess(settings, model)
    transform = build_transform(pre)
    skip = settings.skip_bad_images
    calib_ds = open_split(settings.data, settings.calib_split, transform, skip)
    eval_split = resolve_eval_split(settings.data, settings.eval_split)
    eval_ds = open_split(settings.data, eval_split, transform, skip)
    eval_idx = strided_indices(len(eval_ds), settings.eval_subset)
    trained = bool(settings.checkpoint or settings.pretrained or settings.model.startswith(HF_PREFIX))
    check_labels(
        getattr(model, "num_classes", None), eval_ds, calib_ds, trained, getattr(model, "class_names", None)
    )
    check_same_inputs(model, calib_ds, eval_ds)
    distributed.shard(eval_idx)  # more processes than images: say so before any work
    idx = calibration_indices(len(calib_ds), settings.calib_size, settings.seed)
    with single_line_errors():
        calib = load_images(calib_ds, idx, num_workers=settings.workers)
    # before the float baseline: a preprocessing size the model cannot take (a transformers
    # processor's) stopped inside the evaluation with a traceback
    check_model_runs(model, calib.images)
    timings = {"load": time.perf_counter() - t0}
    work = Workload(settings, model, pre, calib.images, eval_ds, eval_idx, calib_ds, timings)
    work.preprocess_source = pre_source
    work.calibration_images = [calib_ds.names[i] for i in idx]
    work.weights = weights
    work.skipped["calibration"] = calib.skipped
    return work


def across_processes(
    result: EvalResult, skipped: list[SkippedImage]
) -> tuple[EvalResult, list[SkippedImage]]:
    """The whole evaluation set's result from every process's shard (unchanged in one process)."""
    parts = distributed.all_gather_objects((result, skipped))
    if len(parts) == 1:
        return result, skipped
    return merge_results([r for r, _ in parts]), [item for _, items in parts for item in items]


def _evaluate(work: Workload, model: nn.Module, desc: str, progress: bool) -> EvalResult:
    s = work.settings
    loader = work.eval_loader()
    with single_line_errors():
        result = evaluate(
            maybe_compiled(model, s.compile), loader, device=s.device, progress=progress, desc=desc
        )
    result, work.skipped["evaluation"] = across_processes(result, loader.skipped)
    return result


def maybe_compiled(model: nn.Module, compile: bool) -> nn.Module:
    return CompiledModel(model) if compile else model


def fp_baseline(work: Workload, progress: bool = True) -> EvalResult:
    """Evaluate the float model once per workload."""
    if work.fp_result is None:
        model = copy.deepcopy(work.model).to(work.settings.device)
        work.fp_result = _evaluate(work, model, "fp32", progress)
    return work.fp_result


def check_same_inputs(model: nn.Module, *datasets: Any) -> None:
    """Under torchrun, refuse to go on unless every process built the same model and listed the
    same images. Each process reads them from its own paths, which on another machine may hold
    another file under the same name; process 0's calibrated parameters would overwrite the
    difference, but each process evaluates its share of the images with its own float model and
    files, so the float accuracy (and any other listing's labels) would be silently wrong.

    Raises:
        DistributedError: naming the first process whose model or image listing differs.
    """
    if distributed.current().world_size == 1:
        return
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    hint = "every process must read the same files (on each machine, the same copies)"
    distributed.check_same("model weights (SHA-256)", weights.hexdigest()[:16], hint)
    for ds in datasets:
        listing = hashlib.sha256(repr((ds.classes, ds.samples)).encode()).hexdigest()[:16]
        distributed.check_same(
            f"listing of the {ds.split!r} split (SHA-256 of its classes and files)", listing, hint
        )


def _provenance(work: Workload) -> dict[str, Any]:
    return {**work.weights_read(), **environment(work.settings.device)}


def weights_identity(settings: RunSettings) -> dict[str, Any]:
    """The result's ``checkpoint_sha256`` and ``pretrained_weights``: which float weights a run
    reads. With ``--pretrained`` the model name alone does not say (timm's default tag, the
    cache's revision), so the tag is named and the file hashed as a checkpoint is."""
    hub = pretrained_weights(settings.model) if settings.pretrained and not settings.checkpoint else None
    return {
        "checkpoint_sha256": _weights_sha256(settings, hub[1] if hub else None),
        "pretrained_weights": hub[0] if hub else None,
    }


def _weights_sha256(settings: RunSettings, hub_file: str | None = None) -> str | None:
    """SHA-256 of the float weights: the checkpoint file, the cached file of timm's pretrained
    weights (``hub_file``), or an ``hf:`` folder's weight files (one digest over each file's, in
    name order, for sharded folders)."""
    if settings.checkpoint:
        return file_sha256(settings.checkpoint)
    if hub_file:
        return file_sha256(hub_file)
    if not settings.model.startswith(HF_PREFIX):
        return None
    folder = hf_folder(settings.model)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(p) for p in files).encode()).hexdigest() if files else None


# run settings that only concern the evaluation: a checkpoint does not depend on them
_EVALUATION_SETTINGS = (
    "checkpoint",
    "eval_split",
    "eval_subset",
    "batch_size",
    "workers",
    "fp_eval",
    "compile",
)


def checkpoint_identity(
    work: Workload, config: QuantConfig, recon_size: int, allow_partial: bool
) -> RunIdentity:
    """What a reconstruction checkpoint of this run is written with, and resumed only with: the
    recipe, the settings that choose the model and the images (not the evaluation's), the thread
    count and number of processes (both change float results), and the weights' SHA-256 (the
    checkpoint's, or with ``--pretrained`` or an ``hf:`` folder the files read from there)."""
    run = {k: v for k, v in work.settings.to_dict().items() if k not in _EVALUATION_SETTINGS}
    arguments = {
        "recipe": config.to_dict(),
        "run": run,
        "preprocess": work.preprocess.to_dict(),
        "recon_calib_size": recon_size,
        "allow_partial": allow_partial,
        "threads": torch.get_num_threads(),
        "processes": distributed.current().world_size,
    }
    # every source of weights, not only --checkpoint: other hub weights under the same --pretrained
    # name resumed a checkpoint made from the first ones
    # every source of weights, not only --checkpoint: other hub weights under the same --pretrained
    # name resumed a checkpoint made from the first ones
    return RunIdentity(json.loads(json.dumps(arguments)), work.weights_read()["checkpoint_sha256"])


def run_recipe(
    work: Workload,
    config: QuantConfig,
    method: str = "custom",
    progress: bool = True,
    recon_size: int | None = None,
    allow_partial: bool = False,
    eval_dtype: str = "float32",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> tuple[dict[str, Any], nn.Module]:
    """Quantize a copy of the workload's model with ``config`` and evaluate it (``eval_dtype``
    ``"float64"``: the quantized model in float64, :func:`dopq.modules.float64_copy`).

    With ``checkpoint_dir`` (and reconstruction) the run checkpoints there after calibration and
    after every unit, and resumes from a checkpoint it finds there (``resume``: one must be there);
    see :mod:`dopq.checkpoint`.

    Returns:
        ``(result, quantized_model)``; ``result`` has the fields of the CLI's JSON output.
    """
    s = work.settings
    checkpoint = None
    if checkpoint_dir is not None:
        if config.reconstruct is None:
            raise ConfigError("--checkpoint-dir is for runs with --reconstruct")
        recon_size = recon_size or config.reconstruct.calib_size
        identity = checkpoint_identity(work, config, recon_size, allow_partial)
        checkpoint = ReconstructionCheckpoint(checkpoint_dir, identity, resume=resume)
        checkpoint.load()  # a checkpoint of another run is refused now, before any work
    recon = None
    if config.reconstruct is not None:  # before the float evaluation: too many images is refused now
        recon = work.recon_images(recon_size or config.reconstruct.calib_size)
    _warn_if_random_weights(s)  # after the refusals above: a refused run stays one line
    # a checkpointed run evaluates the float model after reconstruction, so that a stop during it
    # loses at most the unit in progress, not an evaluation that a resumed run would repeat
    fp = fp_baseline(work, progress) if s.fp_eval and checkpoint is None else None
    model = copy.deepcopy(work.model).to(s.device)
    model, report = quantize_with_report(
        model,
        work.calib_images.to(s.device),
        config,
        recon_data=recon,
        progress=progress,
        allow_partial=allow_partial,
        checkpoint=checkpoint,
    )
    distributed.broadcast_module(model)  # bit-identical on every process (a no-op in one)
    if s.fp_eval and fp is None:
        fp = fp_baseline(work, progress)
    quant = _evaluate(
        work, in_dtype(model, eval_dtype), f"{method} W{config.w_bits}A{config.a_bits}", progress
    )
    result = {
        "model": s.model,
        "method": method,
        "w_bits": config.w_bits,
        "a_bits": config.a_bits,
        **accuracy_fields(quant, fp),
        "calib_seconds": report.calib_seconds,
        "eval_dtype": eval_dtype,
        "compiled": s.compile,
        "timings": _stage_timings(work.timings, fp, report.timings, quant),
        "reconstruction": report.reconstruction,
        "gptq": report.gptq,
        "reparam_max_logit_change": report.reparam.max_logit_change if report.reparam else None,
        "centring_skipped": report.to_dict()["centring_skipped"],
        "coverage": report.coverage.to_dict() if report.coverage else None,
        "coverage_summary": report.coverage.summary() if report.coverage else None,
        "config": {
            "recipe": config.to_dict(),
            "run": s.to_dict(),
            "preprocess": work.preprocess.to_dict(),
            "preprocess_source": work.preprocess_source,
        },
        "data": work.data_report(),
        "distributed": distributed.current().to_dict(),
        **_provenance(work),
    }
    return result, model


def _stage_timings(
    loading: dict[str, float], fp: EvalResult | None, stages: dict[str, float], quant: EvalResult
) -> dict[str, float]:
    """Seconds of every stage of a run, the two evaluations included: without them the stages
    named left out what takes most of a run on a large evaluation set."""
    fp_stage = {} if fp is None else {"fp_evaluation": fp.seconds}
    return {**loading, **fp_stage, **stages, "evaluation": quant.seconds}


def _warn_if_random_weights(settings: RunSettings) -> None:
    """A forgotten --checkpoint or --pretrained quantizes timm's random initialisation, which only
    a near-chance accuracy would otherwise show."""
    if not (settings.checkpoint or settings.pretrained or settings.model.startswith(HF_PREFIX)):
        log.warning(
            "%s has no --checkpoint or --pretrained weights: it keeps timm's random initialisation, "
            "so its accuracy says nothing about a trained model", settings.model,
        )  # fmt: skip


def accuracy_fields(quant: EvalResult, fp: EvalResult | None = None) -> dict[str, Any]:
    """The accuracy fields every result has (``quantize``, ``evaluate --quantized``, ``evaluate
    --onnx``): the evaluated model's and, where there is one, the float baseline's; None without."""
    return {
        "fp_top1": fp.top1 if fp else None,
        "quant_top1": quant.top1,
        "fp_top5": fp.top5 if fp else None,
        "quant_top5": quant.top5,
        "fp_top1_correct": fp.top1_correct if fp else None,
        "quant_top1_correct": quant.top1_correct,
        "eval_images": quant.images,
        "eval_images_per_second": quant.images_per_second,
        "fp_eval_images_per_second": fp.images_per_second if fp else None,
    }
