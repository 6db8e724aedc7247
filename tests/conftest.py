"""Shared fixtures: paths of the read-only reference models and data beside the checkout."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
from torch import nn

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEIT = SHARED / "models" / "deit_tiny_patch16_224.cifar10.safetensors"
SWIN = SHARED / "models" / "swin_tiny_patch4_window7_224.cifar10.safetensors"
CIFAR = SHARED / "data" / "cifar10-jpeg.tar.gz"


def benchmark_module(name: str) -> ModuleType:
    """A module of ``benchmarks/`` (not a package: its modules import their siblings by name)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared reference file {path} is not present")
    return path


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread. On a 2-core machine that anything else also uses, two OpenMP threads
    spin-wait on each other and small-tensor work runs 5-15x slower; one thread is never much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_vit() -> tuple[nn.Module, torch.Tensor]:
    """timm's ``test_vit`` (random init, 10 classes) and a batch of 8 images for it."""
    return timm.create_model("test_vit", num_classes=10).eval(), torch.randn(8, 3, 160, 160)


def tiny_swin() -> tuple[nn.Module, torch.Tensor]:
    """A two-stage Swin-Tiny-shaped model at 56 px (random init, 10 classes) and 8 images."""
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=56,
        depths=(1, 1),
        num_heads=(1, 2),
        embed_dim=32,
        num_classes=10,
    )
    return model.eval(), torch.randn(8, 3, 56, 56)


def write_image_folder(
    root: Path,
    splits: tuple[str, ...] = ("train", "test"),
    classes: tuple[str, ...] = ("a", "b"),
    per_class: int = 4,
    size: int = 40,
    ext: str = "jpg",
    seed: int = 0,
) -> Path:
    """A tiny ImageFolder tree of random RGB images, ``root/<split>/<class>/<i>.<ext>``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{ext}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory):
    """Factory of tiny ImageFolder trees (see :func:`write_image_folder`), each in its own temp folder."""

    def make(name: str = "images", **kwargs) -> Path:
        return write_image_folder(tmp_path_factory.mktemp(name), **kwargs)

    return make


def small_onnx(path: Path, channels: int = 3, size: int = 16) -> nn.Module:
    """A small float conv net exported with a dynamic batch (input ``images``, output ``logits``)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(channels, 64, 3), nn.GELU(), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.LazyLinear(10)
    )
    net(torch.randn(1, channels, size, size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.randn(1, channels, size, size),), str(path), dynamo=False,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    return net


def runner_refuses_bad_arguments(runner_class: type, path: Path, x: torch.Tensor) -> nn.Module:
    """A runner's argument checks (OnnxModel, OpenVinoModel): each bad thread count and each bad
    batch of images (``x``: a good batch of 16x16 RGB images) is one ExportError. Returns a runner."""
    from dopq.errors import ExportError

    for threads in (1.5, "2", -1, True):
        with pytest.raises(ExportError, match="threads must be an int"):
            runner_class(path, threads=threads)
    runner = runner_class(path, threads=1)
    for images, match in [(x[:0], "an empty batch"), (x.to(torch.uint8), "takes float images"),
                          (x.permute(0, 2, 3, 1), r"shape \(batch, 3, 16, 16\)"), (x[0], "shape"),
                          (torch.randn(1, 3, 20, 20), "shape"), (x.numpy(), "takes a torch.Tensor")]:  # fmt: skip
        with pytest.raises(ExportError, match=match):
            runner(images)
    return runner
