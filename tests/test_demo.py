"""The README's main command on a machine without ../shared: it falls back to the bundled demo/."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dopq.data import open_split

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "demo"


def test_bundle_holds_the_protocol_images() -> None:
    test = open_split(BUNDLE / "cifar10-demo.tar", "test")
    train = open_split(BUNDLE / "cifar10-demo.tar", "train")
    assert (len(test), len(train)) == (1000, 256)
    assert test.classes == train.classes and len(test.classes) == 10
    assert [test.targets.count(c) for c in range(10)] == [100] * 10  # the strided subset is class-balanced
    assert (BUNDLE / "deit_tiny_patch16_224.cifar10.json").is_file()


@pytest.mark.slow
def test_demo_runs_without_shared(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    env = {**os.environ, "DOPQ_SHARED": str(tmp_path / "no-shared-here")}
    proc = subprocess.run(
        ["bash", "scripts/demo.sh", "--eval-subset", "200", "--quiet", "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "using the bundled demo/" in proc.stderr
    result = json.loads(out.read_text())
    assert result["eval_images"] == 200
    assert result["method"] == "recommended"  # the demo runs the default recipe
    # the shared DeiT-Tiny scores ~75 % on CIFAR-10 and ~74 % at W4/A4 (docs/RESULTS.md)
    assert result["fp_top1"] >= 0.68 and result["quant_top1"] >= 0.65, result
