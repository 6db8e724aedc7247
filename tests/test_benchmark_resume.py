"""benchmarks/resume.py records its provenance as the other benchmarks do, where it is told."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import benchmark_module


def test_resume_records_a_runnable_command_the_folder_and_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It recorded ``benchmarks/resume.py ...`` (not runnable as such), no working folder and no CPU,
    and could only write into the checkout's benchmarks/results."""
    resume = benchmark_module("resume")
    units = [{"unit": f"blocks.{i}", "seconds": 1.0} for i in range(2)]
    result = {"quant_top1": 0.5, "quant_top5": 0.9, "quant_top1_correct": "10", "fp_top1": 0.75,
              "reconstruction": {"units": units}, "timings": {}, "versions": {"dopq": "x"}, "git": None,
              "device_name": "cpu", "cpu": {"model": "probe CPU", "integer_isa": ["avx2"]}}  # fmt: skip

    def fake_run(argv, cwd, stop_after=None, delay=0.0, signum=None):  # what _run returns, files included
        cwd.mkdir(parents=True, exist_ok=True)
        (cwd / "r.json").write_text(json.dumps(result))
        (cwd / "q.pt").write_bytes(b"model")
        lines = [
            (1.0, "reconstructed 1/2 units (blocks.0 in 1.0 s)"),
            (2.0, "resume with: dopq ... --resume"),
        ]
        return {"rc": 0, "wall_seconds": 2.0, "started": 0.5, "lines": lines,
                "stop": {"checkpoint_at": 1.0, "signal_at": 1.5} if stop_after is not None else {}}  # fmt: skip

    monkeypatch.setattr(resume, "_run", fake_run)
    out = tmp_path / "out"
    argv = [
        "benchmarks/resume.py",
        "--stop-after",
        "0",
        "--work-dir",
        str(tmp_path / "w"),
        "--results-dir",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    resume.main()
    data = json.loads((out / "resume_deit.json").read_text())
    assert (
        data["command"]
        == f"python benchmarks/resume.py --stop-after 0 --work-dir {tmp_path / 'w'} --results-dir {out}"
    )
    assert data["working_directory"] == str(Path.cwd())
    assert data["cpu"] == result["cpu"] and data["save_byte_identical"] and data["same_top1"]
