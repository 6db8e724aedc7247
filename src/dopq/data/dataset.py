"""Image data: preprocessing from model cards, ImageFolder splits from folders or tar archives, subsets.

A data root holds one folder per split in torchvision's ImageFolder layout,
``root/<split>/<class>/<image>``. The root may be a directory, a plain ``.tar`` or a
``.tar.gz``/``.tgz``; an archive may wrap the splits in one top-level folder. Samples are ordered
exactly as ``torchvision.datasets.ImageFolder`` orders them, so class indices and sample indices agree
with torchvision.

Data streams: images are decoded one at a time when a loader asks for them. A plain ``.tar`` is read
by member offset; a ``.tar.gz`` is decompressed once per process into a temporary plain tar (in
``$TMPDIR``, removed at exit) and then read the same way. Each archive is indexed once per process
(cached by path, modification time and size), however many splits and listings a run asks for.

Bad images: an image file that cannot be decoded (zero bytes, not an image, truncated, corrupt) is an
error naming the file, unless the dataset is opened with ``skip_bad_images=True``: then the loaders
drop it and record it (:class:`SkippedImage`). Files without an image extension are ignored, as
torchvision does. A class folder without images keeps its class index (a warning is logged).

Example:
    >>> strided_indices(10_000, 4)
    [0, 2500, 5000, 7500]
"""

from __future__ import annotations

import atexit
import gzip
import io
import json
import logging
import os
import shutil
import struct
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageFile
from timm.data import create_transform, resolve_data_config
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from tqdm.auto import tqdm

from dopq.errors import DataError, DopqError

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "ImageLoader",
    "LoadedImages",
    "Preprocess",
    "SkippedImage",
    "build_transform",
    "calibration_indices",
    "card_path_for",
    "default_workers",
    "list_splits",
    "load_batch",
    "load_images",
    "make_loader",
    "open_split",
    "preprocess_from_card",
    "preprocess_from_model",
    "resolve_eval_split",
    "single_line_errors",
    "skipped_report",
    "strided_indices",
]

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File extensions torchvision's ImageFolder accepts (matched case-insensitively)."""

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_CARD_KEYS = ("input_size", "mean", "std", "interpolation")
_TAR_SUFFIXES = (".tar",)
_GZ_SUFFIXES = (".tar.gz", ".tgz")
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing of a model: resize, center crop, normalize.

    Args:
        input_size: model input ``(channels, height, width)``, e.g. ``(3, 224, 224)``.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after subtracting ``mean``.
        interpolation: PIL resampling filter name (``bilinear``, ``bicubic``, ...).
        crop_pct: fraction of the resized image kept by the center crop; 1.0 means no crop.

    Example:
        >>> pre = Preprocess((3, 224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", crop_pct=1.0)
        >>> pre.to_dict()["input_size"]
        [3, 224, 224]
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        fields = {"input_size": (self.input_size, int), "mean": (self.mean, float), "std": (self.std, float)}
        for name, (value, kind) in fields.items():
            try:
                coerced = tuple(kind(v) for v in value)
            except (TypeError, ValueError):
                coerced = ()
            if len(coerced) != 3:
                raise DataError(f"preprocess {name} must be 3 numbers, got {value!r}")
            object.__setattr__(self, name, coerced)
        if min(self.input_size) < 1 or min(self.std) <= 0:
            raise DataError(
                f"preprocess input_size and std must be positive, got {self.input_size}, {self.std}"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise DataError(
                f"unknown interpolation {self.interpolation!r}; use one of {', '.join(_INTERPOLATIONS)}"
            )
        try:
            crop_pct = float(self.crop_pct)
        except (TypeError, ValueError):
            crop_pct = float("nan")
        if not 0 < crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        object.__setattr__(self, "crop_pct", crop_pct)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def preprocess_from_card(path: str | os.PathLike[str]) -> Preprocess:
    """Read the preprocessing of a model from its JSON card.

    Args:
        path: JSON card with ``input_size``, ``mean``, ``std``, ``interpolation`` and optionally
            ``crop_pct`` (0.875 when absent).

    Returns:
        The card's preprocessing.

    Raises:
        DataError: the card is missing, not JSON, or lacks a key.
    """
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except OSError as e:
        raise DataError(f"cannot read model card {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"model card {path} is not valid JSON: {e}") from e
    if not isinstance(card, dict):
        raise DataError(f"model card {path} must hold a JSON object")
    missing = [k for k in _CARD_KEYS if k not in card]
    if missing:
        raise DataError(f"model card {path} lacks {', '.join(missing)}")
    return Preprocess(
        input_size=card["input_size"],
        mean=card["mean"],
        std=card["std"],
        interpolation=card["interpolation"],
        crop_pct=card.get("crop_pct", 0.875),
    )


def card_path_for(checkpoint_path: str | os.PathLike[str]) -> Path | None:
    """Return the JSON card beside a checkpoint, or None when there is none.

    The card has the checkpoint's name with its last suffix replaced by ``.json``:
    ``deit_tiny_patch16_224.cifar10.safetensors`` -> ``deit_tiny_patch16_224.cifar10.json``.

    Args:
        checkpoint_path: path of the checkpoint file.

    Returns:
        The card path if that file exists, else None.
    """
    card = Path(checkpoint_path).with_suffix(".json")
    return card if card.is_file() else None


def preprocess_from_model(model: nn.Module) -> Preprocess:
    """Read the evaluation preprocessing from a timm model's pretrained config.

    timm's ``crop_mode`` is not kept: :func:`build_transform` always center-crops, as timm does for
    ViT, DeiT and Swin configs.

    Args:
        model: a timm model (its ``pretrained_cfg`` is used; timm defaults fill the gaps).

    Returns:
        The model's preprocessing.
    """
    cfg = resolve_data_config(model=model)
    return Preprocess(
        input_size=cfg["input_size"],
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
    )


def build_transform(pre: Preprocess) -> Callable[[Image.Image], Tensor]:
    """Build timm's evaluation transform: resize, center crop, to tensor, normalize.

    timm resizes the shorter side to ``floor(size / crop_pct)`` and then center-crops ``size``. For a
    square image and ``crop_pct=1.0`` this is exactly a plain resize to ``size x size`` with no crop
    (the CIFAR-10 cards: 32x32 -> 224x224 bilinear). Non-square images keep their aspect ratio and
    lose the borders of their longer side.

    Args:
        pre: the preprocessing.

    Returns:
        A callable mapping an RGB PIL image to a float tensor of shape ``input_size``.
    """
    return create_transform(
        input_size=pre.input_size,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        crop_pct=pre.crop_pct,
        is_training=False,
    )


# --------------------------------------------------------------------------------------------------
# Sources: directory or archive listings
# --------------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(_GZ_SUFFIXES):
        return "gz"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    return None


def _check_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if not path.is_dir() and not (path.is_file() and _archive_kind(path)):
        raise DataError(f"data path {path} is neither a directory nor a .tar, .tar.gz or .tgz archive")
    return path


def _norm_member(name: str) -> str:
    """``./train/cat/1.jpg`` -> ``train/cat/1.jpg``; the archive root (``.``, ``./``) -> ``""``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


@dataclass
class _Listing:
    """An archive's index: its regular files (name -> (offset, size) in ``tar_path``), its folders and
    the plain tar the members are read from (the archive itself, or its decompressed copy)."""

    files: dict[str, tuple[int, int]]
    dirs: set[str]
    tar_path: Path


_INDEX_CACHE: dict[tuple[str, int, int], _Listing] = {}
_TEMP_TARS: list[tuple[int, Path]] = []  # (creating process, decompressed copy), removed at exit


def _remove_temp_tars() -> None:
    for pid, path in _TEMP_TARS:
        if pid == os.getpid():  # never from a forked DataLoader worker
            path.unlink(missing_ok=True)


atexit.register(_remove_temp_tars)


def _decompress(path: Path) -> Path:
    """Write the decompressed stream of a ``.tar.gz`` to a temporary plain tar (removed at exit)."""
    fd, name = tempfile.mkstemp(prefix=f"dopq-{path.name.split('.')[0]}-", suffix=".tar")
    tmp = Path(name)
    _TEMP_TARS.append((os.getpid(), tmp))
    try:
        with gzip.open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, EOFError, zlib.error) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:  # disk full, permissions: not the archive
            raise DataError(f"cannot decompress archive {path} into {tmp.parent}: {e.strerror or e}") from e
        raise DataError(f"cannot read archive {path}: {e}") from e
    return tmp


def _scan_tar(path: Path, tar_path: Path) -> _Listing:
    """Index a plain tar: member offsets and sizes, without reading member data."""
    files: dict[str, tuple[int, int]] = {}
    dirs: set[str] = set()
    try:
        with tarfile.open(tar_path, "r:", encoding="utf-8") as tar:
            for member in tar:
                name = _norm_member(member.name)
                if not name:
                    continue
                if member.isdir():
                    dirs.add(name)
                elif member.isfile():
                    files[name] = (member.offset_data, member.size)
    except _ARCHIVE_ERRORS as e:
        raise DataError(f"cannot read archive {path}: {e}") from e
    for name in files:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return _Listing(files, dirs, tar_path)


def _archive_index(path: Path) -> _Listing:
    """The archive's index, built once per process for each (path, modification time, size)."""
    try:
        stat = path.stat()
    except OSError as e:
        raise DataError(f"cannot read archive {path}: {e.strerror or e}") from e
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    listing = _INDEX_CACHE.get(key)
    if listing is None:
        start = time.perf_counter()
        tar_path = _decompress(path) if _archive_kind(path) == "gz" else path
        listing = _INDEX_CACHE[key] = _scan_tar(path, tar_path)
        logger.info("indexed %s: %d files (%.2f s)", path, len(listing.files), time.perf_counter() - start)
    return listing


def _archive_prefix(listing: _Listing) -> str:
    """Return ``"top/"`` when all splits sit in one top-level folder, else ``""``.

    A single top-level folder is a split itself (not a wrapper) when it holds images at
    ``top/<class>/<image>``.
    """
    tops = {n.split("/", 1)[0] for n in listing.dirs} | {n.split("/", 1)[0] for n in listing.files}
    if len(tops) != 1 or next(iter(tops)) not in listing.dirs:
        return ""
    top = next(iter(tops))
    if any(n.count("/") == 2 and _is_image(n) for n in listing.files):
        return ""
    return top + "/"


def _subdirs(names: Iterable[str], prefix: str) -> set[str]:
    """Names of the direct child folders of ``prefix`` among folder paths ``names``."""
    return {n[len(prefix) :].split("/", 1)[0] for n in names if n.startswith(prefix) and len(n) > len(prefix)}


def _archive_splits(listing: _Listing) -> list[str]:
    return sorted(s for s in _subdirs(listing.dirs, _archive_prefix(listing)) if not s.startswith("."))


def _dir_splits(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def list_splits(root: str | os.PathLike[str]) -> list[str]:
    """List the split folders of a data root (hidden folders are skipped).

    Args:
        root: a directory, ``.tar``, ``.tar.gz`` or ``.tgz``.

    Returns:
        Sorted split names, e.g. ``["test", "train"]``.

    Raises:
        DataError: the path is missing, unsupported or an unreadable archive.
    """
    path = _check_root(root)
    if path.is_dir():
        return _dir_splits(path)
    return _archive_splits(_archive_index(path))


def resolve_eval_split(root: str | os.PathLike[str], requested: str | None = None) -> str:
    """Pick the evaluation split: ``requested`` if given, else ``val`` if present, else ``test``.

    Args:
        root: the data root.
        requested: a split name chosen by the user, or None.

    Returns:
        The split name.

    Raises:
        DataError: the requested split (or both ``val`` and ``test``) is missing.
    """
    splits = list_splits(root)
    found = ", ".join(splits) or "none"
    if requested is not None:
        if requested not in splits:
            raise DataError(f"split {requested!r} not found in {root} (found: {found})")
        return requested
    for name in ("val", "test"):
        if name in splits:
            return name
    raise DataError(f"no 'val' or 'test' split in {root} (found: {found}); name the split to use")


def _order_samples(
    class_names: Iterable[str], files: Iterable[str]
) -> tuple[list[str], list[tuple[str, int]]]:
    """Order ``<class>/.../<file>`` paths as torchvision's ImageFolder does.

    torchvision walks each class (sorted) with ``sorted(os.walk(...))``, i.e. by folder path, then
    sorted file names within a folder, keeping accepted image extensions.
    """
    classes = sorted(class_names)
    index = {c: i for i, c in enumerate(classes)}
    keyed = []
    for rel in files:
        cls = rel.split("/", 1)[0]
        if cls in index and "/" in rel and _is_image(rel):
            folder, _, fname = rel.rpartition("/")
            keyed.append((index[cls], folder, fname))
    keyed.sort()
    return classes, [(f"{folder}/{fname}", label) for label, folder, fname in keyed]


def _dir_split_files(split_dir: Path) -> tuple[list[str], list[str]]:
    classes = [e.name for e in os.scandir(split_dir) if e.is_dir()]
    files = []
    for cls in classes:
        for folder, _, fnames in os.walk(split_dir / cls, followlinks=True):
            rel = os.path.relpath(folder, split_dir).replace(os.sep, "/")
            files.extend(f"{rel}/{f}" for f in fnames)
    return classes, files


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


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
            loaders of this module drop and record it) instead of raising.

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
        self.root = _check_root(root)
        self.split = split
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self._tar_path: Path | None = None
        self._data: list[tuple[int, int]] = []
        self._handle: tuple[int, Any] | None = None
        if self.root.is_dir():
            self._init_from_dir()
        else:
            self._init_from_archive()
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

    def _missing_split(self, splits: Sequence[str]) -> DataError:
        found = ", ".join(splits) or "none"
        return DataError(f"split {self.split!r} not found in {self.root} (found: {found})")

    def _init_from_dir(self) -> None:
        splits = _dir_splits(self.root)
        if self.split not in splits:
            raise self._missing_split(splits)
        split_dir = self.root / self.split
        classes, files = _dir_split_files(split_dir)
        self.classes, rel_samples = _order_samples(classes, files)
        self.samples = [(os.path.join(split_dir, rel), label) for rel, label in rel_samples]

    def _init_from_archive(self) -> None:
        listing = _archive_index(self.root)
        splits = _archive_splits(listing)
        if self.split not in splits:
            raise self._missing_split(splits)
        prefix = _archive_prefix(listing) + self.split + "/"
        members = {n[len(prefix) :]: v for n, v in listing.files.items() if n.startswith(prefix)}
        self.classes, rel_samples = _order_samples(_subdirs(listing.dirs, prefix), members)
        self.samples = [(prefix + rel, label) for rel, label in rel_samples]
        self._data = [members[rel] for rel, _ in rel_samples]
        self._tar_path = listing.tar_path

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
                return img.convert("RGB")
        except _DECODE_ERRORS as e:
            raise DataError(f"cannot decode image {self.describe(index)}: {e}") from e

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
        transform: maps an RGB PIL image to a tensor (see :func:`build_transform`).
        skip_bad_images: leave out (and record) images that cannot be decoded instead of raising.

    Returns:
        The dataset.

    Raises:
        DataError: missing or unsupported path, unreadable archive, missing split, split without images.
    """
    return ImageFolderDataset(root, split, transform, skip_bad_images)


# --------------------------------------------------------------------------------------------------
# Subsets and loading
# --------------------------------------------------------------------------------------------------


def calibration_indices(n_total: int, n: int, seed: int) -> list[int]:
    """Draw ``n`` distinct sample indices reproducibly.

    Args:
        n_total: number of samples in the split.
        n: calibration set size.
        seed: seed of the ``torch.Generator`` passed to ``torch.randperm``.

    Returns:
        The first ``n`` entries of ``torch.randperm(n_total)`` under ``seed``.

    Raises:
        DataError: ``n`` is below 1 or above ``n_total``.

    Example:
        >>> reference = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:3].tolist()
        >>> calibration_indices(10, 3, seed=0) == reference
        True
    """
    if n < 1:
        raise DataError(f"calibration size must be at least 1, got {n}")
    if n > n_total:
        raise DataError(f"calibration size {n} exceeds the {n_total} images of the split; use at most that")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=generator)[:n].tolist()


def strided_indices(n_total: int, n: int | None) -> list[int]:
    """Pick ``n`` evenly strided indices (all of them when ``n`` is None or at least ``n_total``).

    Args:
        n_total: number of samples in the split.
        n: subset size or None.

    Returns:
        ``[i * n_total // n for i in range(n)]``.

    Raises:
        DataError: ``n`` is below 1.

    Example:
        >>> strided_indices(10, 3)
        [0, 3, 6]
    """
    if n is not None and n < 1:
        raise DataError(f"subset size must be at least 1, got {n}")
    if n is None or n >= n_total:
        return list(range(n_total))
    return [i * n_total // n for i in range(n)]


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
