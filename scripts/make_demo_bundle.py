"""Build demo/ from ../shared: what the README's main command uses on a machine without ../shared.

    python scripts/make_demo_bundle.py [--shared ../shared]

demo/ gets the shared DeiT-Tiny checkpoint and its card as they are, and ``cifar10-demo.tar``: the
first 256 images of the seeded calibration permutation of CIFAR-10 train (``torch.randperm(50000)``,
seed 0, so its first 32 are the protocol's calibration images) and the protocol's strided 1000 test
images, in the ``<split>/<class>/<image>`` layout and with their original member names, so the demo
split orders, labels and file bytes are those of the shared archive.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tarfile
from pathlib import Path

from dopq.data import calibration_indices, open_split, strided_indices

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "deit_tiny_patch16_224.cifar10"
TRAIN_IMAGES, TEST_IMAGES = 256, 1000


def _members(archive: Path, split: str, indices: list[int]) -> list[str]:
    samples = open_split(archive, split).samples
    return [samples[i][0] for i in sorted(indices)]


def build(shared: Path, out: Path) -> None:
    archive = shared / "data" / "cifar10-jpeg.tar.gz"
    out.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(shared / "models" / f"{CHECKPOINT}{suffix}", out / f"{CHECKPOINT}{suffix}")
    train = _members(archive, "train", calibration_indices(50000, TRAIN_IMAGES, 0))
    test = _members(archive, "test", strided_indices(10000, TEST_IMAGES))
    wanted = set(train) | set(test)
    with (
        tarfile.open(archive) as src,
        tarfile.open(out / "cifar10-demo.tar", "w", format=tarfile.GNU_FORMAT) as dst,
    ):
        for member in src:
            if member.name in wanted:
                data = src.extractfile(member).read()
                info = tarfile.TarInfo(member.name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible bytes
                dst.addfile(info, io.BytesIO(data))
    print(f"wrote {out} ({len(train)} train, {len(test)} test images)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    args = parser.parse_args()
    build(args.shared, ROOT / "demo")
