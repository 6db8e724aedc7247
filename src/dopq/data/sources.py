"""Data roots and their splits: folders and archives listed in torchvision's ImageFolder order.

A data root holds one folder per split, ``root/<split>/<class>/<image>``; it is a directory or a tar
archive (:mod:`dopq.data.archives`), which may wrap the splits in one top-level folder. Samples are
ordered exactly as ``torchvision.datasets.ImageFolder`` orders them, so class indices and sample indices
agree with torchvision. Files without an image extension are ignored, as torchvision does. Unlike
torchvision, hidden folders and files (names starting with ``.``: ``.ipynb_checkpoints``, macOS's
``._<name>`` copies) are skipped, where torchvision counts a hidden folder as a class and shifts every
label after it, and a symbolic link that leads back into the split (a loop, or another class's
folder) is not followed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dopq.data.archives import ArchiveIndex, archive_index, archive_kind, logger
from dopq.errors import DataError

__all__ = ["IMG_EXTENSIONS", "SplitListing", "check_root", "list_split", "list_splits", "resolve_eval_split"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File extensions torchvision's ImageFolder accepts (matched case-insensitively)."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _hidden(name: str) -> bool:
    """A hidden folder or file: never a split, a class or an image."""
    return name.startswith(".")


def check_root(root: str | os.PathLike[str]) -> Path:
    """The data root as a path, after checking it is a directory or a supported archive.

    Raises:
        DataError: the path is missing, or neither a directory nor a ``.tar``, ``.tar.gz``, ``.tgz``.
    """
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if not path.is_dir() and not (path.is_file() and archive_kind(path)):
        raise DataError(f"data path {path} is neither a directory nor a .tar, .tar.gz or .tgz archive")
    return path


def _archive_prefix(listing: ArchiveIndex) -> str:
    """Return ``"top/"`` when all splits sit in one top-level folder, else ``""``.

    A single top-level folder is a split itself (not a wrapper) when it holds images at
    ``top/<class>/<image>``. Files beside the folder (a README, macOS's ``._<folder>``) are never
    splits and leave it a wrapper.
    """
    tops = {top for top in (n.split("/", 1)[0] for n in listing.dirs) if not _hidden(top)}
    if len(tops) != 1:
        return ""
    top = next(iter(tops))
    if any(n.count("/") == 2 and _is_image(n) for n in listing.files):
        return ""
    return top + "/"


def _subdirs(names: Iterable[str], prefix: str) -> set[str]:
    """Names of the direct child folders of ``prefix`` among folder paths ``names``."""
    return {n[len(prefix) :].split("/", 1)[0] for n in names if n.startswith(prefix) and len(n) > len(prefix)}


def _archive_splits(listing: ArchiveIndex) -> list[str]:
    return sorted(s for s in _subdirs(listing.dirs, _archive_prefix(listing)) if not _hidden(s))


def _dir_splits(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not _hidden(e.name))


def list_splits(root: str | os.PathLike[str]) -> list[str]:
    """List the split folders of a data root (hidden folders are skipped).

    Args:
        root: a directory, ``.tar``, ``.tar.gz`` or ``.tgz``.

    Returns:
        Sorted split names, e.g. ``["test", "train"]``.

    Raises:
        DataError: the path is missing, unsupported or an unreadable archive.
    """
    path = check_root(root)
    if path.is_dir():
        return _dir_splits(path)
    return _archive_splits(archive_index(path))


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
    classes = sorted(c for c in class_names if not _hidden(c))
    index = {c: i for i, c in enumerate(classes)}
    keyed = []
    for rel in files:
        cls = rel.split("/", 1)[0]
        if cls in index and "/" in rel and _is_image(rel) and not _hidden_path(rel):
            folder, _, fname = rel.rpartition("/")
            keyed.append((index[cls], folder, fname))
    keyed.sort()
    return classes, [(f"{folder}/{fname}", label) for label, folder, fname in keyed]


def _hidden_path(rel: str) -> bool:
    """Whether a folder or the file on the path ``<class>/.../<file>`` is hidden."""
    return any(_hidden(part) for part in rel.split("/"))


def _dir_split_files(split_dir: Path) -> tuple[list[str], list[str]]:
    classes = [e.name for e in os.scandir(split_dir) if e.is_dir()]
    files = []
    for cls in classes:
        for folder, subdirs, fnames in os.walk(split_dir / cls, followlinks=True):
            subdirs[:] = [d for d in subdirs if _followed(Path(folder, d), split_dir, split_dir / cls)]
            rel = os.path.relpath(folder, split_dir).replace(os.sep, "/")
            files.extend(f"{rel}/{f}" for f in fnames)
    return classes, files


def _followed(folder: Path, split_dir: Path, class_dir: Path) -> bool:
    """Whether a class's walk enters ``folder``: not where a link leads back into the split (to
    the split itself or above it, to another class's folder, or to a folder of the class already
    above it), which would count images twice or under the wrong label."""
    if not folder.is_symlink():
        return True
    real, split, cls = (Path(os.path.realpath(p)) for p in (folder, split_dir, class_dir))
    inside_split = real == split or split.is_relative_to(real) or real.is_relative_to(split)
    ancestor = Path(os.path.realpath(folder.parent)).is_relative_to(real)
    if inside_split and (not real.is_relative_to(cls) or ancestor):
        logger.warning("not following %s: the link leads back into %s", folder, split_dir)
        return False
    return True


@dataclass
class SplitListing:
    """One split's classes and samples in torchvision's order, and where an archive holds them.

    Attributes:
        classes: sorted class folder names; a class's label is its position.
        samples: ``(path, label)`` pairs: a file path for directories, a member name for archives.
        members: for archives, each sample's ``(offset, size)`` in ``tar_path``; empty for directories.
        tar_path: the plain tar the members are read from, or None for directories.
        names: each sample's path inside the split (``<class>/.../<file>``): the same for a folder
            and an archive of it, wherever either lies.
    """

    classes: list[str]
    samples: list[tuple[str, int]]
    members: list[tuple[int, int]] = field(default_factory=list)
    tar_path: Path | None = None
    names: list[str] = field(default_factory=list)


def list_split(root: Path, split: str) -> SplitListing:
    """List one split of a checked data root (:func:`check_root`).

    Raises:
        DataError: the split is missing, or the archive cannot be read.
    """
    if root.is_dir():
        return _dir_split(root, split)
    return _archive_split(root, split)


def _missing_split(root: Path, split: str, splits: list[str]) -> DataError:
    found = ", ".join(splits) or "none"
    return DataError(f"split {split!r} not found in {root} (found: {found})")


def _dir_split(root: Path, split: str) -> SplitListing:
    splits = _dir_splits(root)
    if split not in splits:
        raise _missing_split(root, split, splits)
    split_dir = root / split
    classes, files = _dir_split_files(split_dir)
    classes, rel_samples = _order_samples(classes, files)
    samples = [(os.path.join(split_dir, rel), label) for rel, label in rel_samples]
    return SplitListing(classes, samples, names=[rel for rel, _ in rel_samples])


def _archive_split(root: Path, split: str) -> SplitListing:
    index = archive_index(root)
    splits = _archive_splits(index)
    if split not in splits:
        raise _missing_split(root, split, splits)
    prefix = _archive_prefix(index) + split + "/"
    members = {n[len(prefix) :]: v for n, v in index.files.items() if n.startswith(prefix)}
    classes, rel_samples = _order_samples(_subdirs(index.dirs, prefix), members)
    samples = [(prefix + rel, label) for rel, label in rel_samples]
    names = [rel for rel, _ in rel_samples]
    return SplitListing(classes, samples, [members[rel] for rel in names], index.tar_path, names)
