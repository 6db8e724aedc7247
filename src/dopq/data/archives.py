"""Tar archives as data roots: each indexed once per process, members read by offset.

A plain ``.tar`` is read by member offset; a ``.tar.gz`` / ``.tgz`` is decompressed once per process
into a temporary plain tar (in ``$TMPDIR``, removed at exit by the process that made it; copies left by a
process that was killed are removed by the next run) and then read the same way. The index (:class:`ArchiveIndex`) is cached by path, modification time and size, however
many splits and listings a run asks for.
"""

from __future__ import annotations

import atexit
import gzip
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from dopq.errors import DataError

__all__ = ["ArchiveIndex", "archive_index", "archive_kind"]

logger = logging.getLogger("dopq.data")  # one logger for the data layer, the name its log lines show

_TAR_SUFFIXES = (".tar",)
_GZ_SUFFIXES = (".tar.gz", ".tgz")
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def archive_kind(path: Path) -> str | None:
    """``"gz"`` for a ``.tar.gz`` / ``.tgz``, ``"tar"`` for a ``.tar``, None for anything else."""
    name = path.name.lower()
    if name.endswith(_GZ_SUFFIXES):
        return "gz"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    return None


def _norm_member(name: str) -> str:
    """``./train/cat/1.jpg`` -> ``train/cat/1.jpg``; the archive root (``.``, ``./``) -> ``""``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


@dataclass
class ArchiveIndex:
    """An archive's index: its regular files (name -> (offset, size) in ``tar_path``), its folders and
    the plain tar the members are read from (the archive itself, or its decompressed copy)."""

    files: dict[str, tuple[int, int]]
    dirs: set[str]
    tar_path: Path


_INDEX_CACHE: dict[tuple[str, int, int], ArchiveIndex] = {}
_TEMP_TARS: list[tuple[int, Path]] = []  # (creating process, decompressed copy), removed at exit


def _remove_temp_tars() -> None:
    for pid, path in _TEMP_TARS:
        if pid == os.getpid():  # never from a forked DataLoader worker
            path.unlink(missing_ok=True)


atexit.register(_remove_temp_tars)


_TEMP_PREFIX = "dopq-"  # dopq-<archive stem>-<pid>-<random>.tar


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_stale_temp_tars(folder: Path) -> list[Path]:
    """Remove the decompressed copies in ``folder`` whose process has died without its exit handler
    (killed, out of memory): each is as large as the archive's contents. Returns what was removed."""
    removed = []
    for tmp in folder.glob(f"{_TEMP_PREFIX}*-*-*.tar"):
        pid = tmp.name[: -len(".tar")].split("-")[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                tmp.unlink()
            except OSError:  # another user's file, or gone meanwhile
                continue
            removed.append(tmp)
    return removed


def _decompress(path: Path) -> Path:
    """Write the decompressed stream of a ``.tar.gz`` to a temporary plain tar (removed at exit)."""
    for stale in remove_stale_temp_tars(Path(tempfile.gettempdir())):
        logger.info("removed %s, left by a process that was killed", stale)
    stem = path.name.split(".")[0].replace("-", "_")  # the pid stays the second field from the end
    fd, name = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{stem}-{os.getpid()}-", suffix=".tar")
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


def _scan_tar(path: Path, tar_path: Path) -> ArchiveIndex:
    """Index a plain tar: member offsets and sizes, without reading member data. A link member
    (``tar`` stores a second hard link to a file as one) is indexed as the file it leads to."""
    files: dict[str, tuple[int, int]] = {}
    dirs: set[str] = set()
    links: dict[str, str] = {}
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
                elif member.islnk():  # the target's name, from the archive's root
                    links[name] = _norm_member(member.linkname)
                elif member.issym():  # relative to the link's folder
                    links[name] = _norm_member(
                        posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
                    )
    except _ARCHIVE_ERRORS as e:
        raise DataError(f"cannot read archive {path}: {e}") from e
    unresolved = []
    for name in links:
        target = _link_target(name, links, files)
        if target is not None:
            files[name] = files[target]
        else:
            unresolved.append(name)
    if unresolved:
        logger.warning(
            "%s: left out %d link member(s) that lead to no file in the archive (an absolute path, a "
            "folder or a loop), e.g. %s",
            path, len(unresolved), unresolved[0],
        )  # fmt: skip
    for name in files:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return ArchiveIndex(files, dirs, tar_path)


def _link_target(name: str, links: dict[str, str], files: dict[str, tuple[int, int]]) -> str | None:
    """The regular member a chain of link members ends at; None for a folder, a member outside the
    archive or a loop."""
    seen = {name}
    while name in links:
        name = links[name]
        if name in seen:
            return None
        seen.add(name)
    return name if name in files else None


def archive_index(path: Path) -> ArchiveIndex:
    """The archive's index, built once per process for each (path, modification time, size)."""
    try:
        stat = path.stat()
    except OSError as e:
        raise DataError(f"cannot read archive {path}: {e.strerror or e}") from e
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    listing = _INDEX_CACHE.get(key)
    if listing is None:
        start = time.perf_counter()
        tar_path = _decompress(path) if archive_kind(path) == "gz" else path
        listing = _INDEX_CACHE[key] = _scan_tar(path, tar_path)
        logger.info("indexed %s: %d files (%.2f s)", path, len(listing.files), time.perf_counter() - start)
    return listing
