"""Interrupt a checkpointed reconstruction and resume it: same model, same accuracy, little time lost.

Runs ``dopq quantize --reconstruct --checkpoint-dir`` twice on the shared DeiT-Tiny, side by side:
once uninterrupted, and once stopped (``--signal``, by default SIGTERM) ``--stop-delay`` seconds after
the checkpoint of unit ``--stop-after`` was written, then resumed with ``--resume``. Writes one JSON
with both results' top-1 and per-image records, whether the two ``--save`` files are byte-identical,
the work dropped at the stop and the resumed run's restart cost.

Example:
    benchmarks/resume.py --bits 3 --recon-iters 20 --stop-after 7 --threads 1 --name resume_deit
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "deit_tiny_patch16_224"
UNIT_LINE = re.compile(r"reconstructed (\d+)/(\d+) units \((\S+) in ([\d.]+) s")


def _command(args: argparse.Namespace) -> list[str]:
    return [
        "quantize", "--model", MODEL, "--checkpoint", str(SHARED / "models" / f"{MODEL}.cifar10.safetensors"),
        "--data", str(SHARED / "data" / "cifar10-jpeg.tar.gz"), "--w-bits", str(args.bits), "--a-bits",
        str(args.bits), "--eval-subset", str(args.eval_subset), "--batch-size", "100", "--threads",
        str(args.threads), "--reconstruct", "--recon-calib-size", str(args.recon_calib_size), "--recon-iters",
        str(args.recon_iters), "--recon-batch-size", str(args.recon_batch_size), "--checkpoint-dir", "ckpt",
        "--save", "q.pt", "--output", "r.json", "--quiet",
    ]  # fmt: skip


def _launch(argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "dopq", *argv], cwd=cwd, env=env, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def _watch(proc: subprocess.Popen[str], lines: list[tuple[float, str]], on_line=None) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append((time.time(), line.rstrip()))
        if on_line is not None:
            on_line(line)


def _run(argv: list[str], cwd: Path, stop_after: int | None = None, delay: float = 0.0,
         signum: int = signal.SIGTERM) -> dict[str, Any]:  # fmt: skip
    cwd.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    proc = _launch(argv, cwd)
    lines: list[tuple[float, str]] = []
    stop: dict[str, float] = {}

    def on_line(line: str) -> None:
        m = UNIT_LINE.search(line)
        if stop_after is not None and m and int(m.group(1)) == stop_after and not stop:
            stop["checkpoint_at"] = time.time()
            timer = threading.Timer(delay, lambda: (stop.setdefault("signal_at", time.time()),
                                                    proc.send_signal(signum)))  # fmt: skip
            timer.start()

    _watch(proc, lines, on_line)
    rc = proc.wait()
    return {"rc": rc, "wall_seconds": time.time() - t0, "started": t0, "lines": lines, "stop": stop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--recon-calib-size", type=int, default=256)
    parser.add_argument("--recon-iters", type=int, default=60)
    parser.add_argument("--recon-batch-size", type=int, default=32)
    parser.add_argument("--eval-subset", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop-after", type=int, default=7, help="stop during the unit after this one")
    parser.add_argument("--stop-delay", type=float, default=10.0, help="seconds after that checkpoint")
    parser.add_argument("--signal", choices=["SIGTERM", "SIGINT", "SIGKILL"], default="SIGTERM")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dopq_resume"))
    parser.add_argument("--name", default="resume_deit")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    argv = _command(args)
    signum = getattr(signal, args.signal)
    runs: dict[str, Any] = {}
    # the uninterrupted and the interrupted run side by side (each with its own threads)
    threads = [
        threading.Thread(target=lambda: runs.update(whole=_run(argv, args.work_dir / "whole"))),
        threading.Thread(target=lambda: runs.update(stopped=_run(
            argv, args.work_dir / "stopped", args.stop_after, args.stop_delay, signum))),
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runs["resumed"] = _run([*argv, "--resume"], args.work_dir / "stopped")
    whole = json.loads((args.work_dir / "whole" / "r.json").read_text())
    resumed = json.loads((args.work_dir / "stopped" / "r.json").read_text())
    same_bytes = (args.work_dir / "whole" / "q.pt").read_bytes() == (
        args.work_dir / "stopped" / "q.pt"
    ).read_bytes()
    stop = runs["stopped"]["stop"]
    done_before = [ln for t, ln in runs["stopped"]["lines"] if UNIT_LINE.search(ln)]
    done_after = [ln for t, ln in runs["resumed"]["lines"] if UNIT_LINE.search(ln)]
    first_unit_after = next(t for t, ln in runs["resumed"]["lines"] if UNIT_LINE.search(ln))
    units_whole = {u["unit"]: u["seconds"] for u in whole["reconstruction"]["units"]}
    dropped_unit = whole["reconstruction"]["units"][args.stop_after]["unit"]
    out = {
        # as the other benchmarks record it (dopq.environment.provenance): a command a shell runs again
        "command": f"python {shlex.join(sys.argv)}",
        "working_directory": str(Path.cwd()),
        "dopq_command": f"dopq {shlex.join(argv)}",
        "threads": args.threads,
        "note": "the uninterrupted and the interrupted run ran side by side, one process each, on a shared "
        "2-core machine; times are wall times under that load",
        "signal": args.signal,
        "stopped_after_unit": args.stop_after,
        "stopped_rc": runs["stopped"]["rc"],
        "stopped_message": next((ln for _, ln in runs["stopped"]["lines"] if "resume with" in ln), None),
        "units_done_before_stop": len(done_before),
        "units_done_after_resume": len(done_after),
        "save_byte_identical": same_bytes,
        "whole_top1": whole["quant_top1"],
        "resumed_top1": resumed["quant_top1"],
        "same_top1": whole["quant_top1"] == resumed["quant_top1"],
        "same_per_image_record": whole["quant_top1_correct"] == resumed["quant_top1_correct"],
        "fp_top1": whole["fp_top1"],
        "whole_wall_seconds": runs["whole"]["wall_seconds"],
        "stopped_wall_seconds": runs["stopped"]["wall_seconds"],
        "resumed_wall_seconds": runs["resumed"]["wall_seconds"],
        "dropped_unit": dropped_unit,
        "dropped_unit_seconds_whole_run": units_whole[dropped_unit],
        "work_dropped_seconds": stop["signal_at"] - stop["checkpoint_at"],
        "restart_seconds_until_first_unit_done": first_unit_after - runs["resumed"]["started"],
        "resumed_timings": resumed["timings"],
        "whole_timings": whole["timings"],
        "whole": {k: whole[k] for k in ("quant_top1", "quant_top5", "quant_top1_correct", "reconstruction")},
        "resumed": {
            k: resumed[k] for k in ("quant_top1", "quant_top5", "quant_top1_correct", "reconstruction")
        },
        "versions": whole["versions"],
        "git": whole["git"],
        "cpu": whole.get("cpu"),
        "device_name": whole["device_name"],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{args.name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("whole", "resumed")}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
