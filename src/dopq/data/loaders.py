"""Loaders: unshuffled batches that drop and record undecodable images, and worker error messages."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from tqdm.auto import tqdm

from dopq.data.dataset import SkippedImage
from dopq.errors import DataError, DopqError

__all__ = [
    "ImageLoader",
    "LoadedImages",
    "default_workers",
    "load_batch",
    "load_images",
    "make_loader",
    "single_line_errors",
    "skipped_report",
]

logger = logging.getLogger("dopq.data")  # one logger for the data layer, the name its log lines show


@contextmanager
def single_line_errors() -> Iterator[None]:
    """Turn a dopq error re-raised by a DataLoader worker back into its original one-line message.

    A worker's exception reaches the main process as the same type carrying the whole traceback;
    this keeps only its last line, the original message.
    """
    try:
        yield
    except DopqError as e:
        lines = str(e).strip().splitlines()
        if len(lines) < 2 or not lines[0].startswith("Caught "):
            raise
        prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
        raise type(e)(lines[-1].removeprefix(prefix)) from None


def default_workers(device: str | torch.device = "cpu") -> int:
    """A loader worker count that hides decoding behind the model without starving it of cores.

    On CPU the model's threads need the cores and decoding a small image costs a few percent of a
    ViT forward pass, so one worker per 8 CPUs (at least 1); on CUDA the GPU waits for the data, so
    one worker per CPU but one, at most 8.

    Args:
        device: where the model runs.

    Returns:
        The number of worker processes.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    if str(device).startswith("cuda"):
        return min(8, max(1, cpus - 1))
    return max(1, cpus // 8)


def _collate(items: list[Any]) -> tuple[Any, Any, list[SkippedImage]]:
    """Batch the decoded samples and set the skipped ones apart: ``(images, labels, skipped)``;
    images and labels are None when every sample of the batch was skipped."""
    skipped = [item for item in items if isinstance(item, SkippedImage)]
    kept = [item for item in items if not isinstance(item, SkippedImage)]
    if not kept:
        return None, None, skipped
    images, labels = default_collate(kept)
    return images, labels, skipped


class ImageLoader(DataLoader):
    """An unshuffled DataLoader of ``(images, labels)`` batches that drops the samples its dataset
    could not decode (a :class:`SkippedImage`, from ``skip_bad_images=True``).

    Attributes:
        skipped: the images dropped during the latest pass, in loader order.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, collate_fn=_collate, **kwargs)
        self.skipped: list[SkippedImage] = []

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        self.skipped = []
        batches = super().__iter__()
        try:
            for images, labels, skipped in batches:
                self.skipped.extend(skipped)
                if labels is not None:
                    yield images, labels
        except BaseException:
            self._stop_workers(batches)
            raise

    def _stop_workers(self, batches: Any) -> None:
        """Stop the workers of a pass that failed (e.g. an unreadable image), now: left to the garbage
        collector, torch's iterator shuts them down seconds later, at an arbitrary point."""
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
            if getattr(self, "_iterator", None) is batches:  # a persistent iterator: rebuild next pass
                self._iterator = None


def make_loader(
    dataset: Dataset,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> ImageLoader:
    """Build an unshuffled loader over ``dataset[indices]`` that streams the images.

    Args:
        dataset: a map-style dataset returning ``(image, label)`` (or a :class:`SkippedImage`).
        indices: sample indices in order, or None for all samples.
        batch_size: images per batch.
        num_workers: loader worker processes (0 loads in this process; see :func:`default_workers`).
        pin_memory: pin batches for faster host-to-GPU copies.
        persistent_workers: keep the workers between passes (e.g. FP and quantized evaluation).

    Returns:
        The loader; its ``dataset`` is a ``Subset`` and its ``skipped`` lists what the latest pass
        left out.

    Raises:
        DataError: an index is out of range.
    """
    n = len(dataset)
    indices = list(range(n)) if indices is None else list(indices)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise DataError(f"sample index {bad[0]} out of range for {dataset} ({n} images)")
    return ImageLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )


@dataclass
class LoadedImages:
    """Images decoded into one tensor, e.g. a calibration set.

    Args:
        images: ``(N, C, H, W)`` images.
        labels: ``(N,)`` int64 labels.
        skipped: images left out because they could not be decoded (``skip_bad_images=True``).
    """

    images: Tensor
    labels: Tensor
    skipped: list[SkippedImage]


def load_images(
    dataset: Dataset,
    indices: Sequence[int],
    num_workers: int = 0,
    progress: bool = False,
) -> LoadedImages:
    """Load ``dataset[indices]`` into one image tensor and one label tensor, recording skipped images.

    Args:
        dataset: a map-style dataset returning ``(image tensor, label)`` (or a :class:`SkippedImage`).
        indices: sample indices in order.
        num_workers: loader worker processes.
        progress: show a tqdm bar.

    Returns:
        The images that could be decoded, in order, and the skipped ones.

    Raises:
        DataError: no indices, an index out of range, an unreadable image (without
            ``skip_bad_images``), or no image left after skipping.
    """
    if len(indices) == 0:
        raise DataError("cannot load an empty set of images; ask for at least one")
    loader = make_loader(dataset, indices, num_workers=num_workers)
    images, labels = [], []
    with single_line_errors(), tqdm(total=len(indices), desc="load", unit="img", disable=not progress) as bar:
        for x, y in loader:
            images.append(x)
            labels.append(torch.as_tensor(y, dtype=torch.int64))
            bar.update(len(x))
    if not images:
        first = loader.skipped[0]
        raise DataError(
            f"none of the {len(indices)} images could be decoded; the first: {first.path}: {first.error}"
        )
    return LoadedImages(torch.cat(images), torch.cat(labels), loader.skipped)


def load_batch(
    dataset: Dataset,
    indices: Sequence[int],
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Load ``dataset[indices]`` into one image tensor and one label tensor (e.g. a calibration set).

    See :func:`load_images`, which also returns the images a ``skip_bad_images`` dataset left out.

    Returns:
        ``(images, labels)`` of shapes ``(N, C, H, W)`` and ``(N,)`` (int64).

    Raises:
        DataError: no indices, an index out of range, or an unreadable image.
    """
    loaded = load_images(dataset, indices, num_workers, progress)
    return loaded.images, loaded.labels


def skipped_report(skipped: Sequence[SkippedImage], what: str) -> dict[str, Any]:
    """Log one warning line about skipped images and return them for a result file.

    Args:
        skipped: the images left out.
        what: which set they were left out of, e.g. ``"evaluation split 'test'"``.

    Returns:
        ``{"count": n, "images": [{"index", "path", "error"}, ...]}``.
    """
    if skipped:
        names = ", ".join(s.path for s in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        logger.warning("skipped %d unreadable image(s) of the %s: %s", len(skipped), what, names)
    return {"count": len(skipped), "images": [s.to_dict() for s in skipped]}
