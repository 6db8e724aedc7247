"""Tar archives as data roots: each indexed once per process, members read by offset.

A plain tar is read by member offset; a gzip-compressed one (``.tar.gz`` / ``.tgz``: the content
decides, not the name) is decompressed once per machine into a temporary plain tar in ``$TMPDIR``
and then read the same way: the processes of one machine that open the same archive (same path,
size and modification time, same user), such as torchrun's, share one copy. One process
decompresses it while the others wait; each holds a shared ``flock`` on the copy while it runs, and
the last one to exit removes it. A copy that no process holds any more (its processes were killed)
is removed by the next run, or reused by the next run of the same archive. Without ``fcntl``
(Windows) each process decompresses its own copy, removed at exit. The index
(:class:`ArchiveIndex`) is cached by path, modification time and size, however many splits and
listings a run asks for.
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import hashlib
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
from typing import Any

from dopq.errors import DataError

try:
    import fcntl
except ImportError:  # Windows: one private copy per process
    fcntl = None  # type: ignore[assignment]

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
_TEMP_TARS: list[tuple[int, Path]] = []  # (creating process, private decompressed copy), removed at exit
_SHARED: dict[Path, tuple[int, int]] = {}  # shared copy -> (process, descriptor holding its shared lock)


def _remove_temp_tars() -> None:
    for pid, path in _TEMP_TARS:
        if pid == os.getpid():  # never from a forked DataLoader worker
            path.unlink(missing_ok=True)
    for copy, (pid, fd) in list(_SHARED.items()):
        if pid == os.getpid():
            del _SHARED[copy]
            _release_shared(copy, fd)


atexit.register(_remove_temp_tars)


_TEMP_PREFIX = "dopq-"  # private: dopq-<archive stem>-<pid>-<random>.tar; shared: dopq-<stem>-<key>.tar
_KEY_CHARS = 16  # hex digits of a shared copy's key
_SHARED_SUFFIXES = (".tar", ".partial", ".lock")  # the copy, the copy being written, the creation lock


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) there terminates the process: count it alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _shared_base(name: str) -> str | None:
    """``dopq-<stem>-<key>`` for a shared copy's file name (copy, partial copy or lock), else None."""
    for suffix in _SHARED_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            parts = base.split("-")
            key = parts[-1]
            if len(parts) == 3 and len(key) == _KEY_CHARS and all(c in "0123456789abcdef" for c in key):
                return base
    return None


def _lock(lock: Path, blocking: bool = True) -> int | None:
    """A descriptor holding the exclusive lock on ``lock`` (created if missing); None where
    ``blocking`` is False and another process holds it. The file may be removed by the process that
    held the lock before: then it is opened again, so two processes never hold two files' locks."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _try_remove_unused(copy: Path, fd: int | None = None) -> bool:
    """Remove ``copy`` if no process holds a lock on it; the caller holds its creation lock.
    ``fd``: this process's descriptor of the copy, its shared lock already released."""
    opened = fd is None
    try:
        if fd is None:
            fd = os.open(copy, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # in use, gone or another user's
        return False
    finally:
        if opened and fd is not None:
            os.close(fd)
    try:
        copy.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def _release_shared(copy: Path, fd: int) -> None:
    """At exit: release this process's hold on a shared copy and remove the copy if no other process
    holds it. Under the creation lock, so no process starts using the copy while it is removed."""
    lock_path = copy.with_suffix(".lock")
    try:
        lock = _lock(lock_path)
    except OSError:
        os.close(fd)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
        if _try_remove_unused(copy, fd):
            with contextlib.suppress(OSError):
                lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)
        os.close(lock)


def remove_stale_temp_tars(folder: Path) -> list[Path]:
    """Remove the decompressed copies in ``folder`` that no process uses any more (their processes
    were killed, or ran out of memory, before their exit handler): each is as large as the
    archive's contents. A private copy is stale when its process (in its name) has died; a shared
    copy when no process holds a lock on it and none is writing it. Returns what was removed."""
    removed = []
    for tmp in folder.glob(f"{_TEMP_PREFIX}*-*-*.tar"):
        pid = tmp.name[: -len(".tar")].split("-")[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                tmp.unlink()
            except OSError:  # another user's file, or gone meanwhile
                continue
            removed.append(tmp)
    if fcntl is None:
        return removed
    bases = set()
    for p in folder.glob(f"{_TEMP_PREFIX}*-*"):
        with contextlib.suppress(OSError):  # gone meanwhile
            if (base := _shared_base(p.name)) and p.lstat().st_uid == os.getuid():  # never another user's
                bases.add(base)
    for base in sorted(bases):
        copy, partial, lock_path = (folder / f"{base}{suffix}" for suffix in _SHARED_SUFFIXES)
        try:
            lock = _lock(lock_path, blocking=False)
        except OSError:  # another user's lock file
            continue
        if lock is None:  # a process is writing, using or removing the copy
            continue
        try:
            if partial.exists():  # its writer was killed: it holds the lock while it writes
                partial.unlink(missing_ok=True)
                removed.append(partial)
            if copy.exists() and _try_remove_unused(copy):
                removed.append(copy)
            if not copy.exists():
                lock_path.unlink(missing_ok=True)
        except OSError:
            continue
        finally:
            os.close(lock)
    return removed


def _remove_stale(folder: Path) -> None:
    for stale in remove_stale_temp_tars(folder):
        logger.info("removed %s, left by a process that was killed", stale)


# what decompressing an archive leaves free in the temporary folder: 1 GiB, or a twentieth of a
# smaller file system (a container's small /tmp still takes an archive that fits)
MIN_FREE_BYTES = 1 << 30
MIN_FREE_SHARE = 0.05
_ROOM_CHECK_BYTES = 64 << 20  # how often (bytes written) the free space is looked at


class _RoomKeeper:
    """A file's writes that stop, with one DataError line, before the folder has less than
    :data:`MIN_FREE_BYTES` free (or :data:`MIN_FREE_SHARE` of a smaller file system). A ``.tar.gz`` that expands far beyond its folder (a gzip bomb, or
    ImageNet's train archive in a small ``$TMPDIR``) otherwise stopped only at a full disk, which the
    machine's other processes share."""

    def __init__(self, out: Any, archive: Path, folder: Path) -> None:
        self._out, self._archive, self._folder = out, archive, folder
        self._written, self._unchecked = 0, _ROOM_CHECK_BYTES  # checked before the first write

    def write(self, data: bytes) -> int:
        if self._unchecked >= _ROOM_CHECK_BYTES:
            self._unchecked = 0
            usage = shutil.disk_usage(self._folder)
            floor = min(MIN_FREE_BYTES, int(MIN_FREE_SHARE * usage.total))
            if usage.free - len(data) < floor:
                raise DataError(
                    f"cannot decompress archive {self._archive} into {self._folder}: it would leave less "
                    f"than {floor / 2**30:.2f} GiB free there ({self._written / 2**30:.2f} GiB written); "
                    "set TMPDIR to a folder with room, or give the extracted folder or a plain .tar"
                )
        self._written += len(data)
        self._unchecked += len(data)
        return self._out.write(data)


def _write_tar(path: Path, dst_fd: int, dst: Path) -> None:
    """Write the decompressed stream of the ``.tar.gz`` ``path`` to ``dst`` (open as ``dst_fd``); on
    an error ``dst`` is removed and the error is one DataError line."""
    try:
        with gzip.open(path, "rb") as src, os.fdopen(dst_fd, "wb") as out:
            shutil.copyfileobj(src, _RoomKeeper(out, path, dst.parent), 1 << 20)
    except (OSError, EOFError, zlib.error) as e:
        dst.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:  # disk full, permissions: not the archive
            raise DataError(f"cannot decompress archive {path} into {dst.parent}: {e.strerror or e}") from e
        raise DataError(f"cannot read archive {path}: {e}") from e
    except BaseException:  # Ctrl-C: a shared copy's partial file is no process's to remove at exit
        dst.unlink(missing_ok=True)
        raise


def _stem(path: Path) -> str:
    return path.name.split(".")[0].replace("-", "_")  # the fields after it stay where they are


def _decompress(path: Path) -> Path:
    """Write the decompressed stream of a ``.tar.gz`` to a private temporary plain tar (removed at
    exit)."""
    _remove_stale(Path(tempfile.gettempdir()))
    fd, name = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{_stem(path)}-{os.getpid()}-", suffix=".tar")
    tmp = Path(name)
    _TEMP_TARS.append((os.getpid(), tmp))
    _write_tar(path, fd, tmp)
    return tmp


def _shared_decompress(path: Path, stat: os.stat_result) -> Path | None:
    """The machine's decompressed copy of a ``.tar.gz``, written by the first process that asks for
    it while the others wait, and held (shared lock) by this process until it exits. None where the
    temporary folder cannot lock files or holds another user's file of that name."""
    folder = Path(tempfile.gettempdir())
    ident = f"{os.getuid()}\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    base = f"{_TEMP_PREFIX}{_stem(path)}-{hashlib.sha256(ident.encode()).hexdigest()[:_KEY_CHARS]}"
    copy, partial, lock_path = (folder / f"{base}{suffix}" for suffix in _SHARED_SUFFIXES)
    if copy in _SHARED:
        return copy
    try:
        lock = _lock(lock_path, blocking=False)
        if lock is None:
            logger.info("waiting for another process decompressing %s into %s", path, copy)
            lock = _lock(lock_path)
    except OSError as e:  # no locks on this file system, another user's lock file
        logger.info("cannot share the decompressed copy of %s (%s): this process makes its own", path, e)
        return None
    held = None
    try:
        _remove_stale(folder)  # (not this copy: its lock is held)
        if not copy.exists():
            start = time.perf_counter()
            partial.unlink(missing_ok=True)  # left by a writer that was killed
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            _write_tar(path, fd, partial)
            os.replace(partial, copy)
            logger.info("decompressed %s into %s (%.2f s)", path, copy, time.perf_counter() - start)
        else:
            logger.info("reading %s from %s, decompressed by another process", path, copy)
        held = os.open(copy, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        if os.fstat(held).st_uid != os.getuid():  # not ours: it could hold anything
            os.close(held)
            held = None
            return None
        fcntl.flock(held, fcntl.LOCK_SH)
        _SHARED[copy] = (os.getpid(), held)
        return copy
    except OSError as e:  # no locks on this file system, another user's file of that name
        if held is not None:
            os.close(held)
        logger.info("cannot share the decompressed copy of %s (%s): this process makes its own", path, e)
        return None
    finally:
        if not copy.exists():  # nothing left to coordinate: a failed decompression leaves no file
            with contextlib.suppress(OSError):
                lock_path.unlink(missing_ok=True)
        os.close(lock)


def _scan_tar(path: Path, tar_path: Path) -> ArchiveIndex:
    """Index a plain tar: member offsets and sizes, without reading member data. A link member
    (``tar`` stores a second hard link to a file as one) is indexed as the file it leads to. A tar
    that does not end with tar's end-of-archive block (cut short at a member's header, or a corrupt
    header) is an error: tarfile stops there without one, and the members after it were lost."""
    files: dict[str, tuple[int, int]] = {}
    dirs: set[str] = set()
    links: dict[str, str] = {}
    members = 0
    try:
        with tarfile.open(tar_path, "r:", encoding="utf-8") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it reads: 2/3 of the peak memory
                members += 1
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
            tar.fileobj.seek(end := tar.offset)
            block = tar.fileobj.read(tarfile.BLOCKSIZE)
    except _ARCHIVE_ERRORS as e:
        raise DataError(f"cannot read archive {path}: {e}") from e
    if len(block) < tarfile.BLOCKSIZE:
        raise DataError(
            f"cannot read archive {path}: it stops after {members} members without tar's end-of-archive "
            "block: cut short (an interrupted copy or download?)"
        )
    if block.count(0) != tarfile.BLOCKSIZE:
        raise DataError(
            f"cannot read archive {path}: an invalid tar header after {members} members (byte {end})"
        )
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


def _gzipped(path: Path) -> bool:
    """Whether the file is gzip-compressed, whatever its name says: browsers save a downloaded
    ``.tar.gz`` decompressed under its name, and ``gzip -c x.tar > x.tar`` keeps the name."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError as e:
        raise DataError(f"cannot read archive {path}: {e.strerror or e}") from e


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
        tar_path = path
        if _gzipped(path):
            shared = _shared_decompress(path, stat) if fcntl is not None else None
            tar_path = shared or _decompress(path)
        listing = _INDEX_CACHE[key] = _scan_tar(path, tar_path)
        logger.info("indexed %s: %d files (%.2f s)", path, len(listing.files), time.perf_counter() - start)
    return listing
