"""Top-1/top-5 evaluation of a classifier over a DataLoader, with a tqdm bar and throughput.

Example:
    >>> logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05]])
    >>> accuracy_counts(logits, torch.tensor([1, 1]), ks=(1, 2))
    (1, 2)
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dopq import distributed
from dopq.data import single_line_errors
from dopq.errors import ConfigError, DataError, ModelError
from dopq.modules import constant_quantization, quantizers_of

__all__ = [
    "Agreement",
    "CompiledModel",
    "EvalResult",
    "accuracy_counts",
    "compare",
    "evaluate",
    "merge_results",
]

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Accuracy and throughput of one evaluation.

    Args:
        top1: fraction of images whose highest logit is the label, in [0, 1].
        top5: fraction whose label is among the ``min(5, num_classes)`` highest logits, in [0, 1].
        images: number of images evaluated.
        seconds: wall-clock time of the loop, data loading included.
        top1_correct: per image, in loader order, ``"1"`` if its top-1 prediction is right else
            ``"0"``: what paired comparisons of two models on the same images need.
    """

    top1: float
    top5: float
    images: int
    seconds: float
    top1_correct: str = ""

    @property
    def images_per_second(self) -> float:
        """Throughput of the evaluation loop (0.0 when no time was measured)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the fields and ``images_per_second`` as a JSON-ready dict."""
        return {**asdict(self), "images_per_second": self.images_per_second}


def accuracy_counts(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> tuple[int, ...]:
    """Count the rows whose target is among the top-k logits, for each k.

    k is capped at the number of classes, so top-5 of a 3-class problem counts every row.

    Args:
        logits: scores of shape ``(N, num_classes)``.
        targets: labels of shape ``(N,)``.
        ks: the k values.

    Returns:
        One count per k.

    Raises:
        ValueError: the shapes do not match.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        shapes = f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"expected logits (N, C) and targets (N,), got {shapes}")
    num_classes = logits.shape[1]
    top = logits.topk(min(max(ks), num_classes), dim=1).indices
    hits = top == targets.to(top.device).view(-1, 1)
    return tuple(int(hits[:, : min(k, num_classes)].any(dim=1).sum()) for k in ks)


def _top1(logits: Tensor) -> Tensor:
    # topk, as in accuracy_counts, so ties resolve the same way everywhere (argmax takes the first of
    # tied classes, topk not always: on rows of 10 equal logits it picks class 8)
    return logits.topk(1, dim=1).indices[:, 0]


def _hit_string(top1: Tensor, targets: Tensor) -> str:
    """Per image, ``"1"`` where the top-1 class (:func:`_top1`) is the label, else ``"0"`` (a
    result's ``top1_correct``, which paired tests read)."""
    return "".join("1" if hit else "0" for hit in (top1 == targets).tolist())


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Measure top-1 and top-5 accuracy of ``model`` on every batch of ``loader``.

    The model is put in eval mode and run under ``torch.inference_mode()``; it must already be on
    ``device`` (batches are moved there).

    Args:
        model: a classifier returning logits ``(N, num_classes)``.
        loader: yields ``(images, labels)`` batches, e.g. from :func:`dopq.data.make_loader`.
        device: where the batches go.
        progress: show a tqdm bar with running top-1 and images per second.
        desc: the bar's label.

    Returns:
        Accuracies as fractions, image count and seconds.

    Under torchrun ``loader`` holds this process's share of the images, which may yield none (all
    left out by ``skip_bad_images``): the result then counts no image, and
    :func:`merge_results` refuses only a whole set without images.

    Raises:
        DataError: the loader yields no images (in one process), an image cannot be read, or a
            label is not one of the model's classes.
    """
    device = torch.device(device)
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    model.eval()
    correct1 = correct5 = seen = 0
    per_image: list[str] = []  # one hit string per batch
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)
    with torch.inference_mode(), constant_quantization(model), single_line_errors(), bar:
        for images, targets in loader:
            logits = model(images.to(device, non_blocking=True))
            targets = targets.to(device, non_blocking=True)
            _check_labels_fit(targets, logits.shape[-1])
            _check_no_nan(logits, desc, seen, loader)
            c1, c5 = accuracy_counts(logits, targets)
            per_image.append(_hit_string(_top1(logits), targets))
            correct1, correct5, seen = correct1 + c1, correct5 + c5, seen + len(targets)
            bar.update(len(targets))
            bar.set_postfix(top1=f"{100 * correct1 / seen:.2f}%", refresh=False)
    seconds = time.perf_counter() - start
    if seen == 0:
        if distributed.current().world_size > 1:  # one share; the others' images may remain
            return EvalResult(0.0, 0.0, 0, seconds, "")
        raise DataError("evaluation got no images; check the split and subset size")
    result = EvalResult(correct1 / seen, correct5 / seen, seen, seconds, "".join(per_image))
    logger.info(
        "%s: top-1 %.2f%%, top-5 %.2f%% on %d images (%.1f img/s)",
        desc,
        100 * result.top1,
        100 * result.top5,
        seen,
        result.images_per_second,
    )
    return result


def _check_no_nan(logits: Tensor, desc: str, seen: int, loader: Any = None) -> None:
    """NaN logits rank no class (``topk`` puts NaN first, so an all-NaN row "predicts" a fixed
    class and scores about 1 / num_classes): an accuracy or agreement over them would be meaningless."""
    bad = torch.isnan(logits).flatten(1).any(1)
    if bool(bad.any()):
        first = seen + int(bad.nonzero()[0])
        name = _image_name(loader, first)
        raise ModelError(
            f"{desc}: the model gives NaN logits for {int(bad.sum())} of the {len(bad)} images of a batch "
            f"(first: {name or f'image {first} of the evaluation'}), so no accuracy can be measured; the "
            "model computes NaN on these inputs (check the checkpoint, the images and the quantization)"
        )


def _image_name(loader: Any, position: int) -> str | None:
    """The file of the ``position``-th image ``loader`` yielded in this pass, where its dataset
    names its files (a dopq loader: a ``Subset`` of an image folder or archive), else None. Under
    torchrun a position counts within this process's share only, so a name is what finds the image."""
    subset = getattr(loader, "dataset", None)
    indices, images = getattr(subset, "indices", None), getattr(subset, "dataset", None)
    if indices is None or not hasattr(images, "describe"):
        return None
    skipped = {item.index for item in getattr(loader, "skipped", [])}  # left out, not yielded
    kept = [i for i in indices if i not in skipped]
    return images.describe(kept[position]) if position < len(kept) else None


def _check_labels_fit(targets: Tensor, num_classes: int) -> None:
    """A label beyond the model's outputs means the data's classes are not the model's: counting
    such images as misses would report a meaningless accuracy."""
    if len(targets) and int(targets.max()) >= num_classes:
        raise DataError(
            f"the data holds label {int(targets.max())} but the model has {num_classes} outputs: its "
            "class folders are not the model's classes"
        )


class CompiledModel(nn.Module):
    """``model`` evaluated through ``torch.compile`` (``--compile``).

    Simulated quantization runs each quantizer as a chain of element-wise passes; compiled, they
    fuse with each other and with their neighbours into few kernels (docs/gpu.md measures it). The
    first batch of each shape pays the compilation. Fused kernels may round the last float bit
    differently from the eager ops, which can move a code on a rare element: compiled and eager
    results are two settings, and the result records which one ran.

    Args:
        model: the model to run (not copied).
        backend: ``torch.compile`` backend (a name or a callable); ``"inductor"`` generates the fused
            kernels.

    Raises:
        ConfigError: on the first call, when the model cannot be compiled here (on a CPU the
            inductor backend needs a C++ compiler).
    """

    def __init__(self, model: nn.Module, backend: str | Callable[..., Any] = "inductor") -> None:
        super().__init__()
        self.model = model
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)
        for _, q in quantizers_of(model):  # what the quantizers read from the device, read before tracing
            q.read_host_copies()
        # kept outside the module tree: the compiled wrapper would register ``model`` a second time
        self.__dict__["compiled"] = torch.compile(model, backend=backend)
        _import_cpp_extension_quietly()
        self._checked = False

    def forward(self, images: Tensor) -> Tensor:
        if self._checked:
            return self.compiled(images)
        try:
            out = self.compiled(images)
        except Exception as exc:  # torch raises a backend-specific type per version
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"--compile: torch.compile could not compile the model ({reason[:300]}); on a CPU it "
                "needs a C++ compiler (g++ or clang++) on PATH. Leave out --compile to evaluate eagerly"
            ) from exc
        self._checked = True
        return out


def _import_cpp_extension_quietly() -> None:
    """Import torch's C++ extension helper, which inductor's CPU kernels load, without its warning:
    on a machine with a CUDA toolkit and no GPU (a CUDA build of torch on a CPU node) it logs 'No
    CUDA runtime is found, using CUDA_HOME=...' once at import, in the middle of a CPU evaluation
    that needs no CUDA."""
    if "torch.utils.cpp_extension" in sys.modules:
        return
    probe = logging.getLogger("torch.utils.cpp_extension")
    level = probe.level
    probe.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        probe.setLevel(level)


def merge_results(parts: Sequence[EvalResult]) -> EvalResult:
    """One result from the results of consecutive shards of an evaluation set (e.g. one per process).

    Counts are summed, so the accuracies equal those of one pass over all images exactly; the
    per-image record is concatenated in shard order; the time is the slowest shard's (the shards
    ran side by side).
    """
    images = sum(p.images for p in parts)
    if images == 0:
        raise DataError("evaluation got no images; check the split and subset size")
    correct1 = sum(round(p.top1 * p.images) for p in parts)  # exact: the fractions are count / images
    correct5 = sum(round(p.top5 * p.images) for p in parts)
    seconds = max(p.seconds for p in parts)
    return EvalResult(
        correct1 / images, correct5 / images, images, seconds, "".join(p.top1_correct for p in parts)
    )


@dataclass
class Agreement:
    """How two classifiers compare on the same images (e.g. onnxruntime vs the simulation).

    Args:
        images: images compared.
        identical_top1: fraction of images with the same top-1 prediction.
        max_logit_diff: largest absolute logit difference over all images and classes.
        top1_a, top1_b: accuracy of each model.
        top1_correct_a, top1_correct_b: per image, ``"1"`` where that model's top-1 is right.
    """

    images: int
    identical_top1: float
    max_logit_diff: float
    top1_a: float
    top1_b: float
    top1_correct_a: str = ""
    top1_correct_b: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    progress: bool = True,
    desc: str = "compare",
) -> Agreement:
    """Run two classifiers on every batch of ``loader`` and count identical top-1 predictions."""
    model_a.eval()
    model_b.eval()
    same = seen = 0
    worst = 0.0
    hits_a: list[str] = []  # one hit string per batch, as in evaluate()
    hits_b: list[str] = []
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    with (
        torch.inference_mode(),
        constant_quantization(model_a),
        constant_quantization(model_b),
        single_line_errors(),
        tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar,
    ):
        for images, targets in loader:
            a, b = model_a(images).float().cpu(), model_b(images).float().cpu()
            # max() over NaN differences would keep the old maximum
            _check_no_nan(a, f"{desc} (first model)", seen, loader)
            _check_no_nan(b, f"{desc} (second model)", seen, loader)
            pred_a, pred_b = _top1(a), _top1(b)
            same += int((pred_a == pred_b).sum())
            hits_a.append(_hit_string(pred_a, targets))
            hits_b.append(_hit_string(pred_b, targets))
            worst = max(worst, float((a - b).abs().max()))
            seen += len(targets)
            bar.update(len(targets))
    if seen == 0:
        raise DataError("comparison got no images; check the split and subset size")
    right_a, right_b = "".join(hits_a), "".join(hits_b)
    return Agreement(
        seen, same / seen, worst, right_a.count("1") / seen, right_b.count("1") / seen, right_a, right_b
    )
