"""Scale suites: large models on the CPU, and multi-process runs against one process.

    python benchmarks/run.py large-models --threads 2   # ViT-B/16 and ViT-L/16 (random init) W4/A4: peak RSS, time
    python benchmarks/run.py distributed --threads 1 --recon-calib-size 128 --recon-iters 20 --recon-batch-size 32

Each configuration runs as its own ``dopq quantize`` command under ``/usr/bin/time -v`` (peak resident
memory of exactly that command), the way a user would run it.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from measure import run_measured

LARGE = ("vit_base_patch16_224", "vit_large_patch16_224")


def timed_command(argv: list[str], cwd: Path, threads_per_process: int) -> dict[str, Any]:
    """Run ``argv`` (see :func:`measure.run_measured`); its exit status, wall time, peak RSS and stderr tail."""
    env = {"OMP_NUM_THREADS": str(threads_per_process), "PYTHONUNBUFFERED": "1"}
    run = run_measured(argv, cwd=cwd, env={**_base_env(), **env})
    return {
        "returncode": run["returncode"],
        "peak_rss_bytes": run["peak_rss_bytes"],
        "wall_seconds": run["wall_seconds"],
        "stderr_tail": run["stderr"][-1500:] if run["returncode"] else "",
    }


def _base_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dopq(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "dopq"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(_free_port()), "-m", "dopq"]  # fmt: skip


def suite_large_models(args: argparse.Namespace, workload, save) -> None:
    """ViT-B/16 and ViT-L/16, timm's random initialization (10 classes), dopq W4/A4, 32 calibration
    images from the shared CIFAR-10 train split, 32 evaluation images (the accuracy means nothing
    here: memory and time are what is measured)."""
    data = Path(args.shared) / "data" / args.data_file
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in LARGE:
            out = Path(tmp) / f"{arch}.json"
            argv = [*_dopq(1), "quantize", "--model", arch, "--num-classes", "10", "--data", str(data),
                    "--method", "dopq", "--w-bits", "4", "--a-bits", "4", "--calib-size", "32",
                    "--eval-subset", "32", "--batch-size", "32", "--threads", str(args.threads), "--quiet",
                    "--output", str(out)]  # fmt: skip
            row = {"model": arch, **timed_command(argv, Path(tmp), args.threads)}
            if out.is_file():
                result = json.loads(out.read_text())
                row.update(calib_seconds=result["calib_seconds"], timings=result["timings"],
                           coverage_summary=result["coverage_summary"])  # fmt: skip
            rows.append(row)
            print(f"  {arch}: rc {row['returncode']}, peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB, "
                  f"wall {row['wall_seconds']:.0f} s", flush=True)  # fmt: skip
            save("large_models", {"rows": rows, "threads": args.threads})


def suite_distributed(args: argparse.Namespace, workload, save) -> None:
    """The shared DeiT-Tiny, one process against ``torchrun --nproc-per-node 2`` gloo processes, each
    with ``--threads T``: calibration only, and reduced reconstruction with ``--recon-grad-shards``
    gradient shards (both must be identical to one process, saved file included); one process
    reconstructing with one backward per batch (the default) shows what the shards cost. Each run
    writes the same file names in its own folder, so the commands recorded in the saved models are
    the same too."""
    shared = Path(args.shared)
    base = ["quantize", "--model", "deit_tiny_patch16_224", "--checkpoint",
            str(shared / "models" / "deit_tiny_patch16_224.cifar10.safetensors"),
            "--data", str(shared / "data" / args.data_file), "--method", "dopq", "--w-bits", "3", "--a-bits", "3",
            "--calib-size", "32", "--seed", "0", "--eval-subset", str(args.eval_subset or 1000), "--quiet",
            "--threads", str(args.threads), "--output", "result.json", "--save", "model.pt"]  # fmt: skip
    recon = ["--reconstruct", "--recon-calib-size", str(args.recon_calib_size), "--recon-iters",
             str(args.recon_iters or 20), "--recon-batch-size", str(args.recon_batch_size)]  # fmt: skip
    shards = ["--recon-grad-shards", str(args.recon_grad_shards)]
    runs = (("calibration", [], (1, 2)), ("reconstruction", recon, (1,)),
            (f"reconstruction, {args.recon_grad_shards} gradient shards", [*recon, *shards], (1, 2)))  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra, processes in runs:
            for nproc in processes:
                run_dir = Path(tmp) / f"{label.split(',')[0]}{len(rows)}"
                run_dir.mkdir()
                row = {"run": label, "processes": nproc, "threads_per_process": args.threads,
                       **timed_command([*_dopq(nproc), *base, *extra], run_dir, args.threads)}  # fmt: skip
                out = run_dir / "result.json"
                if out.is_file():
                    result = json.loads(out.read_text())
                    keep = ("fp_top1", "quant_top1", "quant_top1_correct", "fp_top1_correct", "eval_images",
                            "calib_seconds", "timings", "distributed", "reconstruction")  # fmt: skip
                    row.update({k: result.get(k) for k in keep})
                    row["save_sha256"] = _sha256(run_dir / "model.pt")
                rows.append(row)
                print(f"  {label} x{nproc}: rc {row['returncode']}, top-1 {row.get('quant_top1')}, "
                      f"wall {row['wall_seconds']:.0f} s", flush=True)  # fmt: skip
                save("distributed", {"rows": rows, "threads": args.threads})


def _sha256(path: Path) -> str | None:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
