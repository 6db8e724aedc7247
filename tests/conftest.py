"""Shared fixtures: paths of the read-only reference models and data beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEIT = SHARED / "models" / "deit_tiny_patch16_224.cifar10.safetensors"
SWIN = SHARED / "models" / "swin_tiny_patch4_window7_224.cifar10.safetensors"
CIFAR = SHARED / "data" / "cifar10-jpeg.tar.gz"


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
