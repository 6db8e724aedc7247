"""The files a GPU run (benchmarks/gpu_run.sh) needs, packed to fit the device tool's 64 MiB.

    python benchmarks/gpu_payload.py build [--shared ../shared]   # here: writes gpu_payload/ (git-ignored)
    python benchmarks/gpu_payload.py unpack                       # there: restores gpu_payload/models/

``cifar10-protocol.tar.gz`` lists every member of the shared CIFAR-10 archive under its own name, so split
orders, labels, the seeded calibration permutation and the strided test subset are those of the
protocol; only the members a run reads carry their bytes (the first 1024 images of the seeded
permutation, which hold the 32 calibration images, and the strided 1000 test images). The others are
empty and never opened. The Swin-Tiny checkpoint travels as its safetensors header plus the high and
low bytes of its float16 body, each xz-compressed (47 MB instead of 55); unpacking restores the
file bit for bit (checked against the SHA-256 recorded at build time). DeiT-Tiny comes from demo/.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import shutil
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = ROOT / "gpu_payload"
DATA = "cifar10-protocol.tar.gz"
RECON_IMAGES, TEST_IMAGES = 1024, 1000
SWIN = "swin_tiny_patch4_window7_224.cifar10"
DEIT = "deit_tiny_patch16_224.cifar10"


def _kept_members(archive: Path) -> set[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from dopq.data import calibration_indices, open_split, strided_indices

    kept = set()
    for split, indices in (
        ("train", calibration_indices(50000, RECON_IMAGES, 0)),
        ("test", strided_indices(10000, TEST_IMAGES)),
    ):
        samples = open_split(archive, split).samples
        kept.update(samples[i][0] for i in indices)
    return kept


def build_data(shared: Path, out: Path) -> None:
    archive = shared / "data" / "cifar10-jpeg.tar.gz"
    kept = _kept_members(archive)
    with tarfile.open(archive) as src, tarfile.open(out / DATA, "w:gz", format=tarfile.GNU_FORMAT) as dst:
        for member in src:
            if not member.isfile():
                continue
            data = src.extractfile(member).read() if member.name in kept else b""
            info = tarfile.TarInfo(member.name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            dst.addfile(info, io.BytesIO(data))


def pack_checkpoint(path: Path, out: Path) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = np.frombuffer(raw[8 + n :], dtype=np.uint8)
    (out / f"{SWIN}.head").write_bytes(raw[: 8 + n])
    for name, part in (("lo", body[0::2]), ("hi", body[1::2])):
        (out / f"{SWIN}.{name}.xz").write_bytes(lzma.compress(part.tobytes(), preset=9))
    (out / f"{SWIN}.sha256").write_text(hashlib.sha256(raw).hexdigest() + "\n")
    shutil.copyfile(path.with_suffix(".json"), out / f"{SWIN}.json")


def unpack(payload: Path) -> None:
    models = payload / "models"
    models.mkdir(exist_ok=True)
    head = (payload / f"{SWIN}.head").read_bytes()
    lo, hi = (
        np.frombuffer(lzma.decompress((payload / f"{SWIN}.{k}.xz").read_bytes()), np.uint8)
        for k in ("lo", "hi")
    )
    body = np.empty(lo.size + hi.size, dtype=np.uint8)
    body[0::2], body[1::2] = lo, hi
    raw = head + body.tobytes()
    if hashlib.sha256(raw).hexdigest() != (payload / f"{SWIN}.sha256").read_text().strip():
        raise SystemExit("unpacked Swin checkpoint does not match its recorded SHA-256")
    (models / f"{SWIN}.safetensors").write_bytes(raw)
    shutil.copyfile(payload / f"{SWIN}.json", models / f"{SWIN}.json")
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(ROOT / "demo" / f"{DEIT}{suffix}", models / f"{DEIT}{suffix}")
    (payload / "data").mkdir(exist_ok=True)
    shutil.copyfile(payload / DATA, payload / "data" / DATA)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["build", "unpack"])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    args = p.parse_args()
    if args.action == "build":
        PAYLOAD.mkdir(exist_ok=True)
        build_data(args.shared, PAYLOAD)
        pack_checkpoint(args.shared / "models" / f"{SWIN}.safetensors", PAYLOAD)
        print(f"wrote {PAYLOAD}: {sum(f.stat().st_size for f in PAYLOAD.iterdir()) / 2**20:.1f} MiB")
    else:
        unpack(PAYLOAD)


if __name__ == "__main__":
    main()
