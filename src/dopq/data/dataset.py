"""The dataset of one split, decoded image by image, and its bad-image policy.

An image file that cannot be decoded (zero bytes, not an image, truncated, corrupt) is an error naming
the file, unless the dataset is opened with ``skip_bad_images=True``: then it returns a
:class:`SkippedImage`, which the loaders (:mod:`dopq.data.loaders`) drop and record. A class folder
without images keeps its class index (a warning is logged).
"""

from __future__ import annotations

import io
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset

from dopq.data.sources import IMG_EXTENSIONS, check_root, list_split
from dopq.errors import DataError

__all__ = ["ImageFolderDataset", "SkippedImage", "as_rgb", "open_split"]

logger = logging.getLogger("dopq.data")  # one logger for the data layer, the name its log lines show


# What PIL raises on a malformed file (its fuzzing harness allows these): all mean "bad image".
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error,
    Image.DecompressionBombError,
)  # fmt: skip


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make a truncated file an error even where another library switched PIL's process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` on (which pads the missing part with gray)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


@dataclass(frozen=True)
class SkippedImage:
    """An image left out because it could not be decoded (``skip_bad_images=True``).

    Args:
        index: the sample's index in its dataset.
        path: the file path, or ``member in archive`` for archives.
        error: why it could not be decoded.
    """

    index: int
    path: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


_WIDE_GRAY_MAX = 65535  # 16-bit grayscale PNG / TIFF: Pillow's modes I;16* and I


def as_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded image. 16-bit grayscale is scaled to 8 bits (Pillow's own
    conversion clips it, which turns most such images white); float images are refused.

    Raises:
        ValueError: a float image, or integer values outside 16 bits.
    """
    if img.mode == "F":
        raise ValueError("a float image (mode F): convert it to 8 or 16 bits per channel")
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.asarray(img, dtype=np.int64)
        if values.min() < 0 or values.max() > _WIDE_GRAY_MAX:
            raise ValueError(f"integer pixel values from {values.min()} to {values.max()}: not 8 or 16 bits")
        if img.mode != "I" or values.max() > 255:  # 16-bit data, whatever its values
            values = np.rint(values * (255 / _WIDE_GRAY_MAX))
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")  # 2-D uint8: mode L
    return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """One ImageFolder split read from a directory, a ``.tar`` or a ``.tar.gz``/``.tgz``.

    Samples, classes and targets match ``torchvision.datasets.ImageFolder(root/split, allow_empty=True)``.
    Images are decoded with PIL when asked for and converted to RGB (grayscale, palette, CMYK and RGBA
    alike). Archive members are read by offset through a file handle opened lazily in each process
    (a ``.tar.gz`` through its decompressed temporary copy), so no image bytes are held in memory.

    Args:
        root: a directory, ``.tar``, ``.tar.gz`` or ``.tgz`` holding ``<split>/<class>/<image>``.
        split: the split folder, e.g. ``"test"``.
        transform: maps an RGB PIL image to a tensor; None returns the PIL image.
        skip_bad_images: return a :class:`SkippedImage` for an image that cannot be decoded (the
            loaders of :mod:`dopq.data.loaders` drop and record it) instead of raising.

    Attributes:
        classes: sorted class folder names; a class's label is its position.
        samples: ``(path, label)`` pairs; the path is a file path for directories and a member name
            for archives.
        targets: the labels of ``samples``.
        empty_classes: class folders of the split without any image file (they keep their label).

    Raises:
        DataError: missing or unsupported path, unreadable archive, missing split, split without images.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        transform: Callable[[Image.Image], Any] | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        start = time.perf_counter()
        self.root = check_root(root)
        self.split = split
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        listing = list_split(self.root, split)
        self.classes, self.samples = listing.classes, listing.samples
        self.names = listing.names  # each sample's <class>/.../<file>, as a result names it
        self._tar_path = listing.tar_path
        self._data = listing.members  # (offset, size) of each sample in the tar; empty for folders
        self._handle: tuple[int, Any] | None = None
        if not self.samples:
            raise DataError(
                f"split {split!r} of {self.root} has no images "
                f"(expected {split}/<class>/<image> with extension {', '.join(IMG_EXTENSIONS)})"
            )
        self.targets = [label for _, label in self.samples]
        self.empty_classes = sorted(set(self.classes) - {self.classes[t] for t in self.targets})
        if self.empty_classes:
            logger.warning(
                "split %r of %s: no images for classes %s (their labels are kept)",
                split,
                self.root,
                self.empty_classes,
            )
        logger.info("opened %s (%.2f s)", self, time.perf_counter() - start)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.root}, split={self.split!r}, "
            f"{len(self.samples)} images, {len(self.classes)} classes)"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # open files are per process, never pickled
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's handle on the archive (reopened on the next read)."""
        handle = getattr(self, "_handle", None)
        if handle is not None and handle[0] == os.getpid():
            handle[1].close()
        self._handle = None

    def _tar_file(self) -> Any:
        # A handle inherited through fork shares its file offset with the parent: reopen per process.
        if self._handle is None or self._handle[0] != os.getpid():
            self._handle = (os.getpid(), open(self._tar_path, "rb"))  # noqa: SIM115 - closed by close()
        return self._handle[1]

    def _source(self, index: int) -> str | io.BytesIO:
        if self._tar_path is None:
            return self.samples[index][0]
        offset, size = self._data[index]
        tar = self._tar_file()
        tar.seek(offset)
        return io.BytesIO(tar.read(size))

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from: its file path, or ``member in archive``."""
        name = self.samples[index][0]
        return name if self._tar_path is None else f"{name} in {self.root}"

    def load_image(self, index: int) -> Image.Image:
        """Decode sample ``index`` as an RGB PIL image; a truncated file is an error.

        Raises:
            DataError: the image cannot be read or decoded (the message names the file).
        """
        try:
            with _strict_truncation(), Image.open(self._source(index)) as img:
                return as_rgb(img)
        except _DECODE_ERRORS as e:
            reason = (
                "not an image file" if isinstance(e, UnidentifiedImageError) else e
            )  # not its BytesIO repr
            raise DataError(f"cannot decode image {self.describe(index)}: {reason}") from e

    def __getitem__(self, index: int) -> tuple[Any, int] | SkippedImage:
        try:
            img = self.load_image(index)
        except DataError as e:
            if not self.skip_bad_images:
                raise
            return SkippedImage(index, self.describe(index), str(e.__cause__ or e))
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def open_split(
    root: str | os.PathLike[str],
    split: str,
    transform: Callable[[Image.Image], Any] | None = None,
    skip_bad_images: bool = False,
) -> ImageFolderDataset:
    """Open one split of a data root; see :class:`ImageFolderDataset`.

    Args:
        root: a directory, ``.tar``, ``.tar.gz`` or ``.tgz`` holding ``<split>/<class>/<image>``.
        split: the split folder, e.g. ``"test"``.
        transform: maps an RGB PIL image to a tensor (see :func:`dopq.data.build_transform`).
        skip_bad_images: leave out (and record) images that cannot be decoded instead of raising.

    Returns:
        The dataset.

    Raises:
        DataError: missing or unsupported path, unreadable archive, missing split, split without images.
    """
    return ImageFolderDataset(root, split, transform, skip_bad_images)
