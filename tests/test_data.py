"""Tests of dopq.data: torchvision-identical ordering from folders and archives, RGB decoding, subsets."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torchvision.transforms import functional as TF

from dopq.data import (
    ImageFolderDataset,
    Preprocess,
    as_rgb,
    build_transform,
    calibration_indices,
    card_path_for,
    list_splits,
    load_batch,
    make_loader,
    open_split,
    preprocess_from_card,
    preprocess_from_model,
    resolve_eval_split,
    strided_indices,
)
from dopq.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR = SHARED / "data" / "cifar10-jpeg.tar.gz"
IMAGENET = SHARED / "data" / "imagenet-sample-1k.tar"
DEIT_CARD = SHARED / "models" / "deit_tiny_patch16_224.cifar10.json"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRE = Preprocess((3, 224, 224), MEAN, STD, "bilinear", 1.0)
CMYK_RGB = (200, 30, 60)

# relative path under the split -> image mode; names probe torchvision's ordering: case, digits,
# upper-case extensions, nested folders (walked in string order of folder paths), skipped non-images.
TREE = {
    "train/b_cls/img10.jpg": "RGB",
    "train/b_cls/img2.JPG": "RGB",
    "train/b_cls/Zebra.png": "RGBA",
    "train/b_cls/notes.txt": None,
    "train/b_cls/sub/deep.png": "P",
    "train/b_cls/sub/inner/y.bmp": "RGB",
    "train/b_cls/sub.d/x.jpeg": "RGB",
    "train/a_cls/gray.png": "L",
    "train/a_cls/cmyk.jpg": "CMYK",
    "train/C_upper/one.webp": "RGB",
    "train/C_upper/two.tiff": "RGB",
    "test/a_cls/t0.png": "RGB",
    "test/b_cls/t1.png": "L",
}


def _write_image(path: Path, mode: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "CMYK":
        Image.new("RGB", (32, 32), CMYK_RGB).convert("CMYK").save(path, quality=95)
        return
    rng = np.random.default_rng(seed)
    w, h = (32, 32) if seed % 2 else (40, 24)  # some non-square images
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    img = rgb.quantize(16) if mode == "P" else rgb.convert(mode)
    img.save(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "data"
    for seed, (rel, mode) in enumerate(TREE.items()):
        if mode is None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("not an image")
        else:
            _write_image(root / rel, mode, seed)
    return root


@pytest.fixture(scope="module")
def archives(tree: Path) -> dict[str, Path]:
    """The tree packed as .tar (no top folder), .tar.gz (under a top folder, as ``tar czf x -C dir .``
    writes it) and .tgz (``./`` names in shuffled order, no folder members)."""
    out = tree.parent
    paths = {"tar": out / "flat.tar", "gz": out / "wrapped.tar.gz", "tgz": out / "dot.tgz"}
    with tarfile.open(paths["tar"], "w") as tar:
        for split in ("test", "train"):
            tar.add(tree / split, arcname=split)
    with tarfile.open(paths["gz"], "w:gz") as tar:
        tar.add(tree, arcname=".", recursive=False)
        tar.add(tree, arcname="./mydata")
    with tarfile.open(paths["tgz"], "w:gz") as tar:
        for rel in sorted(TREE, reverse=True):  # unsorted member order, no directory members
            tar.add(tree / rel, arcname=f"./{rel}")
    return paths


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def _relative(ds: ImageFolderDataset, root: Path | None = None) -> list[tuple[str, int]]:
    """Samples as (path under the split, label)."""
    if root is not None:
        return [(str(Path(p).relative_to(root / ds.split).as_posix()), t) for p, t in ds.samples]
    return [(p.split(f"{ds.split}/", 1)[1], t) for p, t in ds.samples]


# -- ordering and decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_directory_order_matches_torchvision(tree: Path, split: str) -> None:
    ours = open_split(tree, split)
    ref = torchvision.datasets.ImageFolder(str(tree / split))
    assert ours.classes == ref.classes
    assert ours.samples == ref.samples
    assert ours.targets == ref.targets
    if split == "train":
        assert ours.classes == ["C_upper", "a_cls", "b_cls"]
        assert _relative(ours, tree)[-3:] == [
            ("b_cls/sub/deep.png", 2),
            ("b_cls/sub.d/x.jpeg", 2),  # folder paths sort as strings: "sub" < "sub.d" < "sub/inner"
            ("b_cls/sub/inner/y.bmp", 2),
        ]


def test_images_decode_to_rgb_tensors(tree: Path) -> None:
    ds = open_split(tree, "train", build_transform(PRE))
    modes = {}
    for i, (path, label) in enumerate(ds.samples):
        x, y = ds[i]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == label
        modes[Path(path).name] = x
        with Image.open(path) as img:
            assert torch.equal(x, build_transform(PRE)(img.convert("RGB")))
    gray = _unnormalize(modes["gray.png"])
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)
    cmyk = _unnormalize(modes["cmyk.jpg"]).mean(dim=(1, 2))
    assert torch.allclose(cmyk, torch.tensor(CMYK_RGB) / 255, atol=0.03)


def test_transform_is_plain_bilinear_resize_for_square_images() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    expected = TF.normalize(TF.to_tensor(img.resize((224, 224), Image.BILINEAR)), MEAN, STD)
    assert torch.allclose(build_transform(PRE)(img), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["tar", "gz", "tgz"])
def test_archives_match_directory(tree: Path, archives: dict[str, Path], kind: str) -> None:
    assert list_splits(archives[kind]) == ["test", "train"]
    for split in ("train", "test"):
        folder = open_split(tree, split, build_transform(PRE))
        packed = open_split(archives[kind], split, build_transform(PRE))
        assert packed.classes == folder.classes
        assert _relative(packed) == _relative(folder, tree)
        for i in range(len(folder)):
            assert torch.equal(packed[i][0], folder[i][0])
            assert packed[i][1] == folder[i][1]


def test_plain_tar_reads_in_workers_and_pickles(tree: Path, archives: dict[str, Path]) -> None:
    ds = open_split(archives["tar"], "train", build_transform(PRE))
    first = ds[0][0]  # opens a handle in this process before workers fork
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0][0], first)
    x0, y0 = load_batch(ds, range(len(ds)))
    x2, y2 = load_batch(ds, range(len(ds)), num_workers=2)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert x0.shape == (len(ds), 3, 224, 224) and y0.tolist() == ds.targets


def test_killed_process_decompressed_copy_removed_by_next_run(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    """A .tar.gz is decompressed into $TMPDIR; a process killed before its exit handler leaves the
    copy (as large as the data), and the next process of the archive reuses it and removes it at
    exit, while a living process's copy stays."""
    import os
    import subprocess
    import sys

    index = f"from pathlib import Path; from dopq.data.archives import archive_index; archive_index(Path({str(archives['gz'])!r}))"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", index + "; import os; os._exit(0)"], env=env, check=True)
    left = list(tmp_path.glob("dopq-*.tar"))
    assert len(left) == 1 and left[0].stat().st_size > 0
    alive = tmp_path / f"dopq-other-{os.getpid()}-abc.tar"
    alive.write_bytes(b"x")
    subprocess.run([sys.executable, "-c", index], env=env, check=True)
    assert sorted(tmp_path.glob("dopq-*.tar")) == [alive]


def test_load_batch_and_loader_follow_indices(tree: Path) -> None:
    ds = open_split(tree, "train", build_transform(PRE))
    idx = [5, 0, 3]
    x, y = load_batch(ds, idx)
    assert y.dtype == torch.int64 and y.tolist() == [ds.targets[i] for i in idx]
    assert all(torch.equal(x[k], ds[i][0]) for k, i in enumerate(idx))
    batches = list(make_loader(ds, idx, batch_size=2))
    assert [len(b[1]) for b in batches] == [2, 1]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)


# -- preprocessing -------------------------------------------------------------------------------------


def test_preprocess_from_card(tmp_path: Path) -> None:
    card = tmp_path / "m.cifar10.json"
    fields = {"input_size": [3, 224, 224], "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear"}
    card.write_text(json.dumps({**fields, "crop_pct": 1.0}))
    assert preprocess_from_card(card) == PRE
    assert PRE.to_dict() == {**fields, "crop_pct": 1.0}
    card.write_text(json.dumps(fields))
    assert preprocess_from_card(card).crop_pct == 0.875
    assert card_path_for(tmp_path / "m.cifar10.safetensors") == card
    assert card_path_for(tmp_path / "other.cifar10.safetensors") is None


GOOD_CARD = {"input_size": [3, 8, 8], "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "box"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read model card"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"input_size": [3, 8, 8], "mean": [0, 0, 0]}), "lacks std, interpolation$"),
        (json.dumps({**GOOD_CARD, "input_size": [3, 8]}), "input_size must be 3 numbers"),
        (json.dumps({**GOOD_CARD, "std": [1, 0, 1]}), "std must be positive"),
        # Python's json reads these tokens; they reached the result JSON, which strict parsers refuse
        (json.dumps({**GOOD_CARD, "std": [float("inf"), 1, 1]}), "mean and std must be finite"),
        (json.dumps({**GOOD_CARD, "mean": [0, float("nan"), 0]}), "mean and std must be finite"),
        (json.dumps({**GOOD_CARD, "interpolation": "fancy"}), "unknown interpolation 'fancy'"),
        (json.dumps({**GOOD_CARD, "crop_pct": 0}), r"crop_pct must be in \(0, 1\]"),
    ],
)
def test_bad_card_raises(tmp_path: Path, text: str | None, message: str) -> None:
    card = tmp_path / "card.json"
    if text is not None:
        card.write_text(text)
    with pytest.raises(DataError, match=message):
        preprocess_from_card(card)
    card.write_text(json.dumps(GOOD_CARD))
    assert preprocess_from_card(card).input_size == (3, 8, 8)


@pytest.mark.skipif(not DEIT_CARD.exists(), reason=f"shared model card not found at {DEIT_CARD}")
def test_real_card() -> None:
    assert preprocess_from_card(DEIT_CARD) == PRE


def test_preprocess_from_model() -> None:
    model = timm.create_model("test_vit")
    pre = preprocess_from_model(model)
    cfg = model.pretrained_cfg
    expected = Preprocess(cfg["input_size"], cfg["mean"], cfg["std"], cfg["interpolation"], cfg["crop_pct"])
    assert pre == expected and pre.crop_pct == 0.95


# -- subsets -------------------------------------------------------------------------------------------


def test_calibration_indices_match_randperm() -> None:
    ref = torch.randperm(10_000, generator=torch.Generator().manual_seed(7))[:32].tolist()
    assert calibration_indices(10_000, 32, seed=7) == ref
    assert calibration_indices(10_000, 32, seed=7) == ref
    assert calibration_indices(10_000, 32, seed=8) != ref
    assert sorted(calibration_indices(5, 5, seed=0)) == [0, 1, 2, 3, 4]


def test_strided_indices(caplog) -> None:
    with caplog.at_level("WARNING", logger="dopq.data"):
        assert strided_indices(5, 5) == [0, 1, 2, 3, 4]
        assert not caplog.text
        assert strided_indices(5, 9) == [0, 1, 2, 3, 4]
    assert "a subset of 9 images was asked of a split of 5: all 5 are used" in caplog.text
    assert strided_indices(10_000, 1000)[:3] == [0, 10, 20]
    assert len(strided_indices(10_000, 1000)) == 1000
    assert strided_indices(10, 3) == [0, 3, 6]
    assert strided_indices(10, 4) == [0, 2, 5, 7]
    assert strided_indices(5, None) == strided_indices(5, 5) == strided_indices(5, 9) == [0, 1, 2, 3, 4]


# -- errors --------------------------------------------------------------------------------------------


def test_missing_and_unsupported_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_split(tmp_path / "nope", "test")
    with pytest.raises(DataError, match="does not exist"):
        list_splits(tmp_path / "nope.tar")
    (tmp_path / "data.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match="neither a directory nor"):
        list_splits(tmp_path / "data.zip")
    (tmp_path / "broken.tar.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match="cannot read archive"):
        open_split(tmp_path / "broken.tar.gz", "test")


def test_a_tar_cut_short_at_a_header_or_with_a_corrupt_header_is_an_error(tmp_path: Path) -> None:
    """tarfile stops without an error at a header the file ends in or that is corrupt: a .tar cut
    short there (an interrupted copy stops at a block boundary) gave a split without its last images."""
    for i in range(4):
        _small_png(tmp_path / "data" / "val" / "a" / f"{i}.png", i)
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        tar.add(tmp_path / "data" / "val", arcname="val")
    with tarfile.open(whole) as tar:
        header = tar.getmembers()[-2].offset  # the third image: 4 members (val, a, 0, 1) before it
    assert len(open_split(whole, "val")) == 4
    raw = whole.read_bytes()
    corrupt = raw[:header] + b"x" * 512 + raw[header + 512 :]
    for name, data, message in [("cut.tar", raw[:header], "it stops after 4 members without tar's end-of-archive"),
                                ("cut_in_header.tar", raw[: header + 100], "it stops after 4 members"),
                                ("corrupt.tar", corrupt, f"an invalid tar header after 4 members \\(byte {header}\\)")]:  # fmt: skip
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=f"^cannot read archive {tmp_path / name}: {message}"):
            open_split(tmp_path / name, "val")


def test_missing_split_lists_found(tree: Path, archives: dict[str, Path]) -> None:
    for root in (tree, archives["gz"]):
        with pytest.raises(DataError, match=r"split 'val' not found in .* \(found: test, train\)$"):
            open_split(root, "val")
        with pytest.raises(DataError, match=r"split 'val' not found .*found: test, train"):
            resolve_eval_split(root, "val")
        assert resolve_eval_split(root) == "test"
        assert resolve_eval_split(root, "train") == "train"
    with pytest.raises(DataError, match=r"no 'val' or 'test' split .*found: none"):
        resolve_eval_split(tree / "train" / "C_upper")


def test_empty_split(tmp_path: Path) -> None:
    (tmp_path / "val" / "cls").mkdir(parents=True)
    (tmp_path / "val" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"split 'val' of .* has no images"):
        open_split(tmp_path, "val")


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    _write_image(tmp_path / "val" / "cls" / "good.png", "RGB", 0)
    (tmp_path / "val" / "cls" / "bad.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    ds = open_split(tmp_path, "val", build_transform(PRE))
    assert Path(ds.samples[0][0]).name == "bad.jpg"
    with pytest.raises(DataError, match=r"cannot decode image .*bad\.jpg"):
        ds[0]
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        tar.add(tmp_path / "val", arcname="val")
    packed = open_split(tmp_path / "d.tar", "val", build_transform(PRE))
    with pytest.raises(DataError, match=r"^cannot decode image val/cls/bad\.jpg in .*d\.tar: [^\n]*$") as err:
        load_batch(packed, [0, 1], num_workers=1)  # one line even when raised in a worker
    assert str(err.value).endswith(": not an image file")  # not the repr of the member's buffer


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path: Path) -> None:
    """Pillow's own RGB conversion clips 16-bit values (most such images came out white)."""
    ramp = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    for suffix in (".png", ".tif"):
        Image.fromarray(ramp).save(tmp_path / f"ramp{suffix}")
        with Image.open(tmp_path / f"ramp{suffix}") as img:
            assert img.mode.startswith("I")
            rgb = np.asarray(as_rgb(img))
        assert np.array_equal(rgb[..., 0], np.rint(ramp * (255 / 65535)).astype(np.uint8))
        assert np.array_equal(rgb[..., 0], rgb[..., 2])
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "val.tif")
    (tmp_path / "val" / "cls").mkdir(parents=True)
    (tmp_path / "val.tif").rename(tmp_path / "val" / "cls" / "float.tif")
    with pytest.raises(DataError, match=r"float\.tif: a float image \(mode F\)"):
        open_split(tmp_path, "val")[0]


def test_bad_subset_sizes(tree: Path) -> None:
    with pytest.raises(DataError, match="calibration size 11 exceeds the 10 images"):
        calibration_indices(10, 11, seed=0)
    with pytest.raises(DataError, match="at least 1"):
        calibration_indices(10, 0, seed=0)
    with pytest.raises(DataError, match="at least 1"):
        strided_indices(10, 0)
    ds = open_split(tree, "test")
    with pytest.raises(DataError, match="sample index 2 out of range"):
        make_loader(ds, [0, 2])
    with pytest.raises(DataError, match="empty"):
        load_batch(ds, [])


# -- real archives in ../shared ----------------------------------------------------------------------


@pytest.mark.skipif(not CIFAR.exists(), reason=f"shared CIFAR-10 archive not found at {CIFAR}")
def test_cifar10_archive() -> None:
    assert list_splits(CIFAR) == ["test", "train"]
    ds = open_split(CIFAR, "test", build_transform(PRE))
    assert len(ds) == 10_000
    assert ds.classes == CIFAR_CLASSES
    assert np.bincount(ds.targets).tolist() == [1000] * 10
    assert ds.samples[0] == ("test/airplane/0000.jpg", 0)
    idx = calibration_indices(len(ds), 8, seed=0)
    x, y = load_batch(ds, idx)
    assert x.shape == (8, 3, 224, 224) and y.tolist() == [ds.targets[i] for i in idx]


@pytest.mark.skipif(not IMAGENET.exists(), reason=f"shared ImageNet sample not found at {IMAGENET}")
def test_imagenet_sample_archive() -> None:
    assert resolve_eval_split(IMAGENET) == "val"
    ds = open_split(IMAGENET, "val", build_transform(PRE))
    assert len(ds) == 1000 and len(ds.classes) == 1000
    assert ds.classes == sorted(ds.classes) and all(c.startswith("n") for c in ds.classes)
    assert ds.targets == list(range(1000))
    with tarfile.open(IMAGENET) as tar:
        gray = []
        for i, (name, _) in enumerate(ds.samples):
            with Image.open(tar.extractfile(name)) as img:
                if img.mode == "L":
                    gray.append(i)
    assert len(gray) == 23
    x, _ = load_batch(ds, gray)
    assert x.shape == (23, 3, 224, 224)
    rgb = _unnormalize(x)
    assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5) and torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)


# -- hidden entries and links ------------------------------------------------------------------------


def _small_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path)


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path: Path) -> None:
    """A notebook's checkpoint folder and macOS's ``._`` copies: torchvision would make the folder
    class 0 (shifting every label) and fail on the copies, in a folder and in a tar alike."""
    root = tmp_path / "data"
    _small_png(root / "test" / "a" / "0.png", 10)
    _small_png(root / "test" / "b" / "0.png", 20)
    _small_png(root / "test" / ".ipynb_checkpoints" / "0.png", 30)
    _small_png(root / "test" / "a" / ".cache" / "1.png", 40)
    (root / "test" / "b" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    tar = tmp_path / "mac.tar"
    with tarfile.open(tar, "w") as t:
        t.add(root, arcname="data")
        info = tarfile.TarInfo("._data")  # beside the wrapper folder, as macOS's tar writes it
        t.addfile(info)
    for source in (root, tar):
        ds = open_split(source, "test")
        assert ds.classes == ["a", "b"]
        assert [(Path(p).name, t) for p, t in ds.samples] == [("0.png", 0), ("0.png", 1)]
        assert [int(np.asarray(ds[i][0])[0, 0, 0]) for i in range(2)] == [10, 20]


def test_a_file_beside_the_wrapper_folder_leaves_it_a_wrapper(tmp_path: Path) -> None:
    """``data/{test,train}/...`` with a LICENSE beside ``data``: the file made ``data`` a split
    ("no 'val' or 'test' split ... (found: data)"), though a file is never a split."""
    root = tmp_path / "data"
    _small_png(root / "test" / "a" / "0.png", 10)
    _small_png(root / "train" / "a" / "0.png", 20)
    tar = tmp_path / "licensed.tar"
    with tarfile.open(tar, "w") as t:
        t.add(root, arcname="data")
        info = tarfile.TarInfo("LICENSE")
        info.size = 3
        t.addfile(info, io.BytesIO(b"MIT"))
    assert list_splits(tar) == ["test", "train"] and resolve_eval_split(tar) == "test"
    assert open_split(tar, "train").samples == [("data/train/a/0.png", 0)]


def test_tar_link_members_are_the_files_they_lead_to(tmp_path: Path, caplog) -> None:
    """``tar`` stores a second hard link to a file as a link member; a symbolic link member leads to
    another member by a relative path. An absolute one leads out of the archive: left out, with a warning."""
    src = tmp_path / "src"
    _small_png(src / "0.png", 50)
    tar = tmp_path / "links.tar"
    with tarfile.open(tar, "w") as t:
        t.add(src / "0.png", arcname="test/a/0.png")
        for name, kind, target in [
            ("test/a/hard.png", tarfile.LNKTYPE, "test/a/0.png"),
            ("test/b/soft.png", tarfile.SYMTYPE, "../a/0.png"),
            ("test/b/outside.png", tarfile.SYMTYPE, str(src / "0.png")),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            t.addfile(info)
    with caplog.at_level("WARNING", logger="dopq.data"):
        ds = open_split(tar, "test")
    assert [(p, t) for p, t in ds.samples] == [
        ("test/a/0.png", 0),
        ("test/a/hard.png", 0),
        ("test/b/soft.png", 1),
    ]
    assert all(np.array_equal(np.asarray(ds[i][0]), np.asarray(ds[0][0])) for i in range(3))
    assert "left out 1 link member(s)" in caplog.text and "test/b/outside.png" in caplog.text


def test_links_back_into_the_split_are_not_followed(tmp_path: Path, caplog) -> None:
    """A link to the split (a loop over every class) or to another class's folder would label that
    class's images as this one; a link to a folder outside the split is data stored elsewhere."""
    root = tmp_path / "data"
    _small_png(root / "test" / "cat" / "0.png", 10)
    _small_png(root / "test" / "dog" / "0.png", 20)
    _small_png(tmp_path / "elsewhere" / "9.png", 30)
    (root / "test" / "cat" / "all").symlink_to("..")
    (root / "test" / "cat" / "dogs").symlink_to("../dog")
    (root / "test" / "cat" / "again").symlink_to(".")
    (root / "test" / "cat" / "more").symlink_to(tmp_path / "elsewhere")
    with caplog.at_level("WARNING", logger="dopq.data"):
        ds = open_split(root, "test")
    assert _relative(ds, root) == [("cat/0.png", 0), ("cat/more/9.png", 0), ("dog/0.png", 1)]
    assert caplog.text.count("the link leads back into") == 3


def test_a_json_beside_the_checkpoint_that_holds_no_card_key_is_not_a_card(tmp_path: Path, caplog) -> None:
    """Training arguments saved as ``model.json`` beside ``model.pth`` stopped every run."""
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"")
    (tmp_path / "model.json").write_text(json.dumps({"lr": 0.1, "epochs": 300}))
    with caplog.at_level("WARNING", logger="dopq.data"):
        assert card_path_for(checkpoint) is None
    assert (
        "model.json is not a model card (it has none of input_size, mean, std, interpolation)" in caplog.text
    )
    (tmp_path / "model.json").write_text(
        json.dumps({"mean": [0, 0, 0]})
    )  # a card, broken: its reader says so
    assert card_path_for(checkpoint) == tmp_path / "model.json"


def test_a_card_whose_input_size_the_model_cannot_take_is_refused_before_any_image(tmp_path: Path) -> None:
    """A card's input_size other than a fixed-size model's was only refused after the first images
    were resized to it: a huge one (a card from elsewhere) took all the memory first."""
    from dopq.data import preprocess_for

    model = timm.create_model("test_vit", pretrained=False, img_size=32, dynamic_img_size=False)
    card = {
        "input_size": [3, 100_000, 100_000],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bilinear",
    }
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(
        DataError, match=r"gives input_size \(3, 100000, 100000\), but the model was built for 32x32"
    ):
        preprocess_for(model, tmp_path / "m.pth")
    (tmp_path / "m.json").write_text(json.dumps({**card, "input_size": [3, 32, 32]}))
    assert preprocess_for(model, tmp_path / "m.pth")[0].input_size == (3, 32, 32)
    dynamic = timm.create_model("test_vit", pretrained=False, img_size=32)  # takes other sizes
    (tmp_path / "m.json").write_text(json.dumps({**card, "input_size": [3, 48, 48]}))
    assert preprocess_for(dynamic, tmp_path / "m.pth")[0].input_size == (3, 48, 48)
