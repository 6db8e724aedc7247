"""Tests of the data policy: bad images (error by default, ``skip_bad_images`` / ``--skip-bad-images``
counts and reports them), empty classes, non-image files, non-ASCII names, archives indexed once and
read without holding image bytes, and the default loader workers."""

from __future__ import annotations

import errno
import gzip
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageFile

import dopq.data.archives as data_module  # the archive index and its temporary copies
from dopq.cli import main
from dopq.data import (
    Preprocess,
    SkippedImage,
    build_transform,
    calibration_indices,
    default_workers,
    list_splits,
    load_batch,
    load_images,
    make_loader,
    open_split,
    resolve_eval_split,
)
from dopq.errors import DataError
from dopq.experiment import RunSettings

PRE = Preprocess((3, 16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0)


def _image_bytes(fmt: str, seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


BAD_FILES = {  # name -> bytes: every way an image file can be unreadable
    "zero.jpg": b"",
    "text.png": b"this is a text file with an image extension",
    "truncated.jpg": _image_bytes("JPEG", 1, size=64)[:3000],  # scan data cut: PIL could pad it
    "truncated.png": _image_bytes("PNG", 2)[:600],
}


def _good(folder: Path, names: list[str], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(_image_bytes("PNG" if name.endswith(".png") else "JPEG", seed + i))


def _pack(root: Path, out: Path, fmt: int = tarfile.PAX_FORMAT) -> Path:
    mode = "w:gz" if out.name.endswith(".gz") else "w"
    with tarfile.open(out, mode, format=fmt) as tar:
        for split in sorted(p.name for p in root.iterdir()):
            tar.add(root / split, arcname=split)
    return out


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``val/a`` holds two good images and every bad kind; ``val/b`` one good image."""
    root = tmp_path_factory.mktemp("bad") / "data"
    _good(root / "val" / "a", ["good0.jpg", "good1.png"])
    for name, payload in BAD_FILES.items():
        (root / "val" / "a" / name).write_bytes(payload)
    _good(root / "val" / "b", ["good2.jpg"], seed=5)
    return root


@pytest.fixture(scope="module", params=["dir", "tar", "tar.gz"])
def bad_data(request: pytest.FixtureRequest, bad_root: Path) -> Path:
    if request.param == "dir":
        return bad_root
    return _pack(bad_root, bad_root.parent / f"bad.{request.param}")


# -- bad images: an error naming the file by default ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_image_is_an_error_naming_the_file(bad_data: Path, name: str) -> None:
    ds = open_split(bad_data, "val", build_transform(PRE))
    index = [Path(p).name for p, _ in ds.samples].index(name)
    with pytest.raises(DataError, match=rf"^cannot decode image \S*val/a/{name}( in \S+)?: "):
        ds[index]
    with pytest.raises(DataError, match=rf"val/a/{name}"):
        load_batch(ds, [0, index], num_workers=1)  # a good image, then the bad one, in a worker


def test_truncated_jpeg_fails_even_when_pil_is_told_to_pad(
    bad_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some libraries switch PIL's process-wide LOAD_TRUNCATED_IMAGES on, which turns a truncated
    JPEG into gray pixels; the dataset must still refuse it, and leave the switch as it found it."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    ds = open_split(bad_root, "val")
    index = [Path(p).name for p, _ in ds.samples].index("truncated.jpg")
    with Image.open(ds.samples[index][0]) as img:
        img.convert("RGB")  # what PIL alone does: no error
    with pytest.raises(DataError, match=r"truncated\.jpg: image file is truncated"):
        ds.load_image(index)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


# -- bad images: skip_bad_images drops, counts and names them -----------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_bad_images_drops_and_records_them(bad_data: Path, workers: int) -> None:
    ds = open_split(bad_data, "val", build_transform(PRE), skip_bad_images=True)
    names = [Path(p).name for p, _ in ds.samples]
    good = [i for i, n in enumerate(names) if n.startswith("good")]
    bad = [i for i, n in enumerate(names) if not n.startswith("good")]
    assert len(good) == 3 and len(bad) == len(BAD_FILES)

    loader = make_loader(ds, batch_size=2, num_workers=workers)
    batches = list(loader)
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(images, torch.stack([ds[i][0] for i in good]))
    assert labels.tolist() == [ds.targets[i] for i in good]
    assert [s.index for s in loader.skipped] == bad
    assert [Path(s.path.split(" in ")[0]).name for s in loader.skipped] == [names[i] for i in bad]
    assert all(isinstance(s, SkippedImage) and s.error for s in loader.skipped)
    assert len(list(loader)) == len(batches) and len(loader.skipped) == len(bad)  # reset per pass

    loaded = load_images(ds, list(range(len(ds))), num_workers=workers)
    assert torch.equal(loaded.images, images) and [s.index for s in loaded.skipped] == bad
    with pytest.raises(DataError, match=rf"^none of the {len(bad)} images could be decoded; the first: "):
        load_images(ds, bad)


def _tree_with(root: Path, files: dict[str, bytes | None]) -> Path:
    """Write ``split/class/file`` entries; None makes a folder."""
    for rel, payload in files.items():
        path = root / rel
        if payload is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
    return root


def test_non_image_files_are_ignored_like_torchvision(tmp_path: Path) -> None:
    root = _tree_with(
        tmp_path / "d",
        {
            "val/a/x.jpg": _image_bytes("JPEG", 0),
            "val/a/README": b"no extension",
            "val/a/labels.csv": b"1,2,3",
            "val/a/folder.jpg": None,  # a folder with an image extension
            "val/a/folder.jpg/inner.png": _image_bytes("PNG", 1),
            "val/b/y.PNG": _image_bytes("PNG", 2),
        },
    )
    ours = open_split(root, "val")
    ref = torchvision.datasets.ImageFolder(str(root / "val"))
    assert ours.samples == ref.samples and ours.classes == ref.classes
    assert [Path(p).name for p, _ in ours.samples] == ["x.jpg", "inner.png", "y.PNG"]


def test_empty_class_keeps_its_label_and_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty class folder is what keeps a subset's labels aligned with the model's classes: it is
    kept (as torchvision's ``allow_empty=True``), listed and warned about, in folders and archives."""
    root = _tree_with(
        tmp_path / "d",
        {"val/a/x.jpg": _image_bytes("JPEG", 0), "val/b": None, "val/c/z.png": _image_bytes("PNG", 1)},
    )
    ref = torchvision.datasets.ImageFolder(str(root / "val"), allow_empty=True)
    for data in (root, _pack(root, tmp_path / "d.tar")):
        with caplog.at_level(logging.WARNING, logger="dopq.data"):
            ds = open_split(data, "val")
        assert ds.classes == ref.classes == ["a", "b", "c"]
        assert ds.targets == ref.targets == [0, 2]
        assert ds.empty_classes == ["b"]
        assert "no images for classes ['b']" in caplog.text
        caplog.clear()


# -- non-ASCII names ----------------------------------------------------------------------------------

NON_ASCII = {
    "val/café/été.jpg": _image_bytes("JPEG", 0),
    "val/café/Ärger.png": _image_bytes("PNG", 1),
    "val/日本/写真.jpeg": _image_bytes("JPEG", 2),
    "val/日本/broken_ü.jpg": b"",
    "val/zebra/plain.png": _image_bytes("PNG", 3),
}


@pytest.mark.parametrize("kind", ["dir", "pax.tar", "gnu.tar", "pax.tar.gz"])
def test_non_ascii_names_in_folders_and_archives(tmp_path: Path, kind: str) -> None:
    root = _tree_with(tmp_path / "d", NON_ASCII)
    fmt = tarfile.GNU_FORMAT if kind.startswith("gnu") else tarfile.PAX_FORMAT
    data = root if kind == "dir" else _pack(root, tmp_path / f"d.{kind}", fmt)
    ref = torchvision.datasets.ImageFolder(str(root / "val"))
    ds = open_split(data, "val", build_transform(PRE))
    assert ds.classes == ref.classes == ["café", "zebra", "日本"]
    rel = lambda p: Path(p).relative_to(root / "val").as_posix() if kind == "dir" else p.split("val/", 1)[1]  # noqa: E731
    assert [(rel(p), t) for p, t in ds.samples] == [
        (Path(p).relative_to(root / "val").as_posix(), t) for p, t in ref.samples
    ]
    for i, (path, _) in enumerate(ref.samples):
        if not path.endswith("broken_ü.jpg"):
            assert torch.equal(ds[i][0], build_transform(PRE)(ref.loader(path)))
    bad = next(i for i, (p, _) in enumerate(ref.samples) if p.endswith("broken_ü.jpg"))
    with pytest.raises(DataError, match=r"cannot decode image .*val/日本/broken_ü\.jpg"):
        ds[bad]


# -- archives: indexed once, streamed -------------------------------------------------------------


def test_archive_is_indexed_once_per_run(
    bad_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    scan = data_module._scan_tar
    monkeypatch.setattr(data_module, "_scan_tar", lambda path, tar: calls.append(path) or scan(path, tar))
    for suffix in ("tar", "tar.gz"):
        archive = _pack(bad_root, tmp_path / f"once.{suffix}")
        calls.clear()
        assert list_splits(archive) == ["val"]
        assert resolve_eval_split(archive) == "val"
        first = open_split(archive, "val")
        second = open_split(archive, "val", build_transform(PRE))
        assert calls == [archive] and first.samples == second.samples
        os.utime(archive, ns=(1, 1))  # a changed file (other modification time) is indexed again
        open_split(archive, "val")
        assert calls == [archive, archive]


def test_the_content_not_the_name_says_whether_an_archive_is_gzip_compressed(
    bad_root: Path, tmp_path: Path
) -> None:
    """A .tar.gz that a browser saved decompressed under its name (Safari, ``curl --compressed``)
    stopped with "Not a gzipped file", a gzip-compressed .tar with "invalid header"."""
    plain = _pack(bad_root, tmp_path / "plain.tar")
    saved = tmp_path / "saved.tar.gz"
    saved.write_bytes(plain.read_bytes())
    gzipped = tmp_path / "gzipped.tar"
    gzipped.write_bytes(gzip.compress(plain.read_bytes()))
    expected = open_split(plain, "val")
    for path in (saved, gzipped):
        ds = open_split(path, "val")
        assert ds.samples == expected.samples
        assert np.array_equal(np.asarray(ds[0][0]), np.asarray(expected[0][0]))


def test_indexing_a_tar_does_not_keep_every_member_header(tmp_path: Path) -> None:
    """tarfile keeps the header of each member it reads: indexing ImageNet's train set (1.28M
    members) peaked at three times the index's own memory (about 0.8 GB a process, where the
    index holds 0.27 GB)."""
    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3000):
            info = tarfile.TarInfo(f"train/c{i % 10}/{i}.JPEG")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    tracemalloc.start()
    try:
        index = data_module._scan_tar(path, path)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index.files) == 3000 and index.files["train/c1/2991.JPEG"][1] == 1
    assert peak < 1.5 * held


@pytest.mark.parametrize("suffix", ["tar", "tar.gz"])
def test_archive_datasets_hold_no_image_bytes(tmp_path: Path, suffix: str) -> None:
    """Members are read by offset (a .tar.gz through its decompressed temporary copy): the dataset
    a worker receives is a small index, not the images."""
    root = tmp_path / "big"
    _good(root / "val" / "a", [f"{i}.png" for i in range(12)])
    image_bytes = sum(p.stat().st_size for p in (root / "val" / "a").iterdir())
    ds = open_split(_pack(root, tmp_path / f"big.{suffix}"), "val")
    assert len(pickle.dumps(ds)) < image_bytes / 10
    assert np.asarray(ds[11][0]).shape == (24, 24, 3)


def test_decompressed_copy_is_removed_at_exit_by_its_process_only(
    bad_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exit hook removes the copies this process made, never one a forked worker inherited."""
    monkeypatch.setattr(data_module, "_TEMP_TARS", [])
    copy = data_module._decompress(_pack(bad_root, tmp_path / "exit.tar.gz"))
    with tarfile.open(copy) as tar:
        assert "val/a/good0.jpg" in tar.getnames()
    inherited = tmp_path / "inherited.tar"
    inherited.write_bytes(b"")
    data_module._TEMP_TARS.append((os.getpid() + 1, inherited))
    data_module._remove_temp_tars()
    assert not copy.exists() and inherited.exists()


# -- a .tar.gz's decompressed copy: one per machine -------------------------------------------------

_HOLD = """
import hashlib, json, logging, sys, types
from pathlib import Path
for name in ("dopq", "dopq.data"):  # the packages without their __init__, which imports torch: fast
    package = types.ModuleType(name)
    package.__path__ = [str(Path(sys.argv[2], *name.split(".")))]
    sys.modules[name] = package
from dopq.data.archives import archive_index
logging.basicConfig(level=logging.INFO, format="%(message)s")
index = archive_index(Path(sys.argv[1]))
digest = hashlib.sha256()
with open(index.tar_path, "rb") as tar:
    for name, (offset, size) in sorted(index.files.items()):
        tar.seek(offset)
        digest.update(name.encode() + tar.read(size))
print(json.dumps({"tar": str(index.tar_path), "digest": digest.hexdigest()}), flush=True)
sys.stdin.read()  # holds the copy until the test closes stdin
"""


def _holder(archive: Path, tmp: Path) -> subprocess.Popen[str]:
    """A process that indexes ``archive`` with ``$TMPDIR`` = ``tmp``, prints its plain tar and a digest
    of its members read by offset, and holds them until its stdin is closed."""
    src = Path(data_module.__file__).parents[2]
    return subprocess.Popen([sys.executable, "-c", _HOLD, str(archive), str(src)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})  # fmt: skip


def _opened(proc: subprocess.Popen[str]) -> dict:
    line = proc.stdout.readline()
    assert line, proc.communicate()[1][-2000:]
    return json.loads(line)


def _closed(proc: subprocess.Popen[str]) -> str:
    """Let a holder exit normally; its log lines."""
    err = proc.communicate("", timeout=60)[1]
    assert proc.returncode == 0, err[-2000:]
    return err


def _small_gz(tmp_path: Path, name: str = "small.tar.gz", seed: int = 0) -> Path:
    root = tmp_path / f"src-{name}-{seed}"
    _good(root / "val" / "a", ["0.png", "1.jpg"], seed=seed)
    _good(root / "val" / "b", ["2.png"], seed=seed + 2)
    return _pack(root, tmp_path / name)


def test_processes_on_one_machine_share_one_decompressed_copy(tmp_path: Path) -> None:
    """Two processes (torchrun's, on one machine) opening the same .tar.gz at once: one decompresses,
    the other waits and reads the same copy; the copy is removed when the last one exits."""
    archive, tmp = _small_gz(tmp_path), tmp_path / "tmp"
    tmp.mkdir()
    procs = [_holder(archive, tmp), _holder(archive, tmp)]
    first, second = (_opened(p) for p in procs)
    assert first == second  # one copy, the same images
    assert [p.name for p in tmp.glob("*.tar")] == [Path(first["tar"]).name]
    errs = [_closed(procs[0]), _closed(procs[1])]
    assert sum(err.count(f"decompressed {archive} into") for err in errs) == 1, errs
    assert list(tmp.iterdir()) == []  # no copy, lock or partial file left


def test_a_killed_holder_leaves_a_copy_reused_or_removed_by_the_next_run(tmp_path: Path) -> None:
    """A process killed (-9) while it holds the copy cannot remove it: the next process of the same
    archive reuses it (without decompressing again); a process of another archive, or of the
    archive changed since, removes it. Each removes its own copy at exit."""
    archive, tmp = _small_gz(tmp_path), tmp_path / "tmp"
    tmp.mkdir()
    killed = _holder(archive, tmp)
    copy = Path(_opened(killed)["tar"])
    killed.kill()
    killed.wait()
    assert copy.exists()
    reuser = _holder(archive, tmp)
    assert _opened(reuser)["tar"] == str(copy)
    assert f"decompressed {archive} into" not in _closed(reuser)
    assert list(tmp.iterdir()) == []

    killed = _holder(archive, tmp)
    old = _opened(killed)
    killed.kill()
    killed.wait()
    _small_gz(tmp_path, seed=7)  # the same path, other images, another modification time
    changed = _holder(archive, tmp)
    new = _opened(changed)
    assert new["tar"] != old["tar"] and new["digest"] != old["digest"]
    assert not Path(old["tar"]).exists()  # the dead process's copy: removed
    assert f"decompressed {archive} into" in _closed(changed)
    assert list(tmp.iterdir()) == []


def test_a_copy_in_use_is_not_removed_by_another_run(tmp_path: Path) -> None:
    """A living process's copy stays while another process decompresses another archive, and each
    process's copy goes when it exits."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    one, two = (
        _holder(_small_gz(tmp_path, "one.tar.gz"), tmp),
        _holder(_small_gz(tmp_path, "two.tar.gz"), tmp),
    )
    copies = [Path(_opened(one)["tar"]), Path(_opened(two)["tar"])]
    assert copies[0] != copies[1] and all(c.exists() for c in copies)
    _closed(one)
    assert not copies[0].exists() and copies[1].exists()
    _closed(two)
    assert list(tmp.iterdir()) == []


def test_without_file_locks_each_process_decompresses_its_own_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without fcntl (Windows) the copy is private to the process (its pid in the name), removed at exit."""
    archive, tmp = _small_gz(tmp_path), tmp_path / "tmp"
    tmp.mkdir()
    for name, value in (("fcntl", None), ("_INDEX_CACHE", {}), ("_SHARED", {}), ("_TEMP_TARS", [])):
        monkeypatch.setattr(data_module, name, value, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    copy = open_split(archive, "val")._tar_path
    assert copy.parent == tmp and copy.name.startswith(f"dopq-small-{os.getpid()}-")
    data_module._remove_temp_tars()
    assert list(tmp.iterdir()) == []


def test_the_stale_copy_sweep_never_signals_a_process_on_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Windows ``os.kill(pid, 0)`` is TerminateProcess: the sweep of private copies (the fallback
    there) killed the process whose pid a copy's name holds, or any process that reused the pid."""
    signalled: list[int] = []
    copy = tmp_path / f"dopq-data-{os.getpid() + 1}-abc.tar"
    copy.write_bytes(b"x")
    with monkeypatch.context() as windows:  # only around the sweep: pytest's reports read os.name
        windows.setattr(os, "kill", lambda pid, sig: signalled.append(pid))
        windows.setattr(os, "name", "nt")
        removed = data_module.remove_stale_temp_tars(tmp_path)
    assert signalled == [] and removed == [] and copy.exists()


def _failing(error: BaseException):
    def copy(*args: object) -> None:
        raise error

    return copy


@pytest.mark.parametrize("fault", ["truncated", "disk full", "no room", "interrupted"])
def test_a_failed_decompression_is_one_line_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A truncated archive, a full disk: one line; Ctrl-C while decompressing: no partial copy left.
    An archive that would leave the folder with less than MIN_FREE_BYTES free stops before (it
    filled the disk the machine's other processes share: a gzip bomb, a train set in a small $TMPDIR)."""
    archive, tmp = _small_gz(tmp_path), tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(data_module, "_INDEX_CACHE", {})
    monkeypatch.setattr(data_module, "_SHARED", {}, raising=False)
    expected = f"cannot read archive {archive}: "
    if fault == "truncated":
        archive.write_bytes(archive.read_bytes()[:-200])
    elif fault == "disk full":
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(data_module.shutil, "copyfileobj", _failing(full))
        expected = f"cannot decompress archive {archive} into {tmp}: No space left on device"
    elif fault == "no room":
        monkeypatch.setattr(data_module, "MIN_FREE_BYTES", shutil.disk_usage(tmp).free)
        monkeypatch.setattr(data_module, "MIN_FREE_SHARE", 1.0)
        expected = f"cannot decompress archive {archive} into {tmp}: it would leave less than "
    else:
        monkeypatch.setattr(data_module.shutil, "copyfileobj", _failing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt if fault == "interrupted" else DataError) as raised:
        open_split(archive, "val")
    if fault != "interrupted":
        assert str(raised.value).startswith(expected) and "\n" not in str(raised.value)
    assert list(tmp.iterdir()) == []


# -- loader workers ------------------------------------------------------------------------------


@pytest.mark.parametrize(("cpus", "cpu", "cuda"), [(1, 1, 1), (2, 1, 1), (16, 2, 8), (64, 8, 8)])
def test_default_workers(monkeypatch: pytest.MonkeyPatch, cpus: int, cpu: int, cuda: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert default_workers("cpu") == cpu
    assert default_workers("cuda") == cuda
    assert RunSettings(model="m", data="d").workers == cpu
    assert RunSettings(model="m", data="d", workers=0).workers == 0


# -- command line -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train: 4 good images and a zero-byte one; test: 3 good images and a truncated JPEG."""
    root = tmp_path_factory.mktemp("cli_bad") / "data"
    _good(root / "train" / "a", ["0.png", "1.png"])
    _good(root / "train" / "b", ["2.png", "3.png"], seed=2)
    (root / "train" / "b" / "4.png").write_bytes(b"")
    _good(root / "test" / "a", ["5.png", "6.png"], seed=4)
    (root / "test" / "a" / "7.jpg").write_bytes(BAD_FILES["truncated.jpg"])
    _good(root / "test" / "b", ["8.png"], seed=7)
    return root


def _quantize(root: Path, *extra: str) -> list[str]:
    return ["quantize", "--model", "test_vit", "--data", str(root), "--calib-size", "5", "--quiet",
            "--w-bits", "8", "--a-bits", "8", "--workers", "0", *extra]  # fmt: skip


def test_cli_bad_image_is_one_error_line(cli_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_quantize(cli_root)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dopq: error: cannot decode image ")
    assert err[0].split("cannot decode image ")[1].split(":")[0].endswith("train/b/4.png")


def test_cli_skip_bad_images_reports_and_evaluates_the_rest(
    cli_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out, saved = tmp_path / "q.json", tmp_path / "q.pt"
    argv = _quantize(cli_root, "--skip-bad-images", "--output", str(out), "--save", str(saved))
    with caplog.at_level(logging.WARNING, logger="dopq"):
        assert main(argv) == 0
    err = caplog.text  # the CLI's warning lines (on stderr outside pytest)
    assert "skipped 1 unreadable image(s) of the calibration set: " in err and "train/b/4.png" in err
    assert "skipped 1 unreadable image(s) of the evaluation set: " in err and "test/a/7.jpg" in err
    result = json.loads(out.read_text())
    data = result["data"]
    assert data["skip_bad_images"] is True and data["eval_split"] == "test" and data["workers"] == 0
    assert data["eval_images_requested"] == 4
    (calib,) = data["skipped"]["calibration"]["images"]
    assert Path(calib["path"]).name == "4.png" and data["skipped"]["calibration"]["count"] == 1
    (skipped,) = data["skipped"]["evaluation"]["images"]
    assert skipped["index"] == 2 and "truncated" in skipped["error"]
    # the denominators count the evaluated images only
    assert result["eval_images"] == 3 == len(result["quant_top1_correct"]) == len(result["fp_top1_correct"])
    assert result["quant_top1"] == result["quant_top1_correct"].count("1") / 3
    assert result["config"]["run"]["skip_bad_images"] is True

    again = tmp_path / "e.json"
    base = ["evaluate", "--quantized", str(saved), "--data", str(cli_root), "--quiet", "--workers", "1"]
    assert main([*base, "--output", str(again)]) == 2
    assert "test/a/7.jpg" in capsys.readouterr().err
    assert main([*base, "--skip-bad-images", "--output", str(again)]) == 0
    evaluated = json.loads(again.read_text())
    assert evaluated["eval_images"] == 3 and evaluated["data"]["skipped"]["evaluation"]["count"] == 1
    assert evaluated["data"]["workers"] == 1
    assert evaluated["quant_top1"] == result["quant_top1"]


def test_calibration_images_skipped_are_the_bad_ones(cli_root: Path) -> None:
    ds = open_split(cli_root, "train", build_transform(PRE), skip_bad_images=True)
    idx = calibration_indices(len(ds), 5, seed=0)
    loaded = load_images(ds, idx)
    assert len(loaded.images) == 4 and [s.index for s in loaded.skipped] == [4]
