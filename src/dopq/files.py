"""Output files: check a destination before long work, and write it atomically.

Used by result reports, saved models and ONNX exports alike, so an interrupted run (Ctrl-C, kill)
never leaves a half-written file and an unwritable path fails before the work, not after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dopq.errors import ConfigError, DopqError

__all__ = ["atomic_path", "check_output_dir", "check_output_path", "remove_pending", "scratch_dir"]

_PENDING: set[Path] = set()  # temporaries of the atomic writes in progress


def check_output_path(path: str | Path, flag: str, error: type[DopqError] = ConfigError) -> None:
    """Raise ``error`` now when ``path`` cannot be written: a folder, or a parent folder that cannot
    be created or is read-only. ``flag`` names the option in the message."""
    if str(path).endswith(("/", os.sep)):  # Path() would drop the slash and write a file of that name
        raise error(f"{flag} {path} names a folder; give a file name")
    path = Path(path)
    if path.is_dir():
        raise error(f"{flag} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"{flag} {path}: cannot create its folder ({exc.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise error(f"{flag} {path}: its folder is not writable")


def check_output_dir(path: str | Path, flag: str, error: type[DopqError] = ConfigError) -> None:
    """Raise ``error`` now when files cannot be written in the folder ``path`` (created if missing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{flag} {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"{flag} {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise error(f"{flag} {path} is not writable")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds,
    removed in any case."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _PENDING.add(tmp)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        _PENDING.discard(tmp)
        tmp.unlink(missing_ok=True)


@contextmanager
def scratch_dir(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` (on its file system, so files move out by renaming),
    removed with what is left in it in any case."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    _PENDING.add(work)
    try:
        yield work
    finally:
        _PENDING.discard(work)
        shutil.rmtree(work, ignore_errors=True)


def remove_pending() -> None:
    """Delete the temporaries of writes in progress: for a process that must exit at once
    (``os._exit`` skips the ``finally`` clauses that would)."""
    for tmp in list(_PENDING):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
