"""Tests of dopq.environment: the CPU's model and integer instruction sets, and the provenance record."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dopq import environment as env
from dopq.environment import INTEGER_ISA, command_line, cpu_info, environment

on_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
stepping\t: 8
flags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 2
flags\t\t: fpu sse2 avx avx2
"""


def test_cpu_info_has_the_shape_the_deployment_benchmark_reads() -> None:
    info = cpu_info()
    assert set(info) in ({"model", "integer_isa"}, {"model", "integer_isa", "signature"})
    assert all(isinstance(v, int) for v in info.get("signature", {}).values())
    assert isinstance(info["model"], str) and info["model"]
    assert isinstance(info["integer_isa"], list)
    assert info["integer_isa"] == [isa for isa in INTEGER_ISA if isa in info["integer_isa"]]


@on_linux
def test_cpu_info_matches_this_machines_proc_cpuinfo() -> None:
    text = Path("/proc/cpuinfo").read_text()
    flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":")[1].split())
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None
    )
    info = cpu_info()
    assert info["integer_isa"] == [isa for isa in INTEGER_ISA if isa in flags]
    assert model is None or info["model"] == model
    number = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.split(":")[0].strip() == "model"), "")  # fmt: skip
    assert not number.isdigit() or info["signature"]["model"] == int(number)


@on_linux
def test_cpu_info_reads_model_and_integer_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(SAPPHIRE_RAPIDS)
    monkeypatch.setattr(env, "_PROC_CPUINFO", cpuinfo)
    assert cpu_info() == {  # the first processor's, not the second's
        "model": "Intel(R) Xeon(R) Platinum 8480+",
        "integer_isa": ["avx2", "avx512_vnni", "avx_vnni", "amx_int8"],
        "signature": {"family": 6, "model": 143, "stepping": 8},
    }
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 avx512f avx512_bf16\n"
    )
    assert cpu_info() == {"model": "AMD EPYC", "integer_isa": ["avx2"]}  # no numbers: no signature
    cpuinfo.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nstepping\t: unknown\n")
    info = cpu_info()
    assert info["signature"] == {"family": 25, "model": 17} and info["integer_isa"] == []


@on_linux
def test_cpu_info_without_proc_falls_back_to_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(env, "_PROC_CPUINFO", tmp_path / "missing")
    info = cpu_info()
    assert info["integer_isa"] == [] and info["model"]


def test_macos_features_are_mapped_to_linux_names(monkeypatch: pytest.MonkeyPatch) -> None:
    sysctl = {
        "machdep.cpu.brand_string": "Intel(R) Core(TM) i9-10910 CPU @ 3.60GHz",
        "machdep.cpu.features": "FPU SSE2 AVX1.0",
        "machdep.cpu.leaf7_features": "AVX2 AVX512F AVX512VNNI",
    }
    monkeypatch.setattr(env, "_sysctl", lambda name: sysctl.get(name, ""))
    assert env._macos_model_and_flags() == (sysctl["machdep.cpu.brand_string"], {"avx2", "avx512_vnni"})


def test_the_versions_name_what_decodes_and_resizes_the_images() -> None:
    """Pillow (JPEG decoding, resampling) and torchvision (the transforms) change the pixels, hence
    calibration and accuracy, but were not recorded."""
    import importlib.metadata

    versions = env.library_versions()
    assert versions["pillow"] == importlib.metadata.version("pillow")
    assert versions["torchvision"] == importlib.metadata.version("torchvision")


def test_environment_records_the_cpu() -> None:
    record = environment("cpu")
    assert record["cpu"] == cpu_info()
    assert record["device_name"] == record["cpu"]["model"]
    assert set(record) >= {"command", "versions", "git", "device_name", "cpu", "threads"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["benchmarks/run.py", "timing", "--threads", "1"], "python benchmarks/run.py timing --threads 1"),
        (["/my dir/run.py", "render"], "python '/my dir/run.py' render"),
        (["/usr/bin/dopq", "quantize", "--resume"], "dopq quantize"),
        (["/opt/tool", "--data", "a b"], "/opt/tool --data 'a b'"),
    ],
)
def test_the_recorded_command_is_one_a_shell_runs_again(
    argv: list[str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A benchmark run as ``python benchmarks/run.py ...`` recorded ``benchmarks/run.py ...``, which a
    shell cannot run (the script is not executable), and a path with a space unquoted."""
    monkeypatch.setattr(sys, "argv", argv)
    assert command_line() == expected


def test_a_checkout_is_dirty_for_code_changes_not_for_a_runs_output_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's --output / --save files in the checkout counted as uncommitted changes: the same
    command run twice there recorded ``dirty: false`` and then ``dirty: true``."""
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)  # fmt: skip

    package = tmp_path / "src" / "dopq"
    package.mkdir(parents=True)
    (package / "environment.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    monkeypatch.setattr(env, "__file__", str(package / "environment.py"))
    assert env.git_revision()["dirty"] is False
    for written in ("r.json", "r.md", "q.pt", "out/m.onnx"):
        (tmp_path / written).parent.mkdir(exist_ok=True)
        (tmp_path / written).write_text("a run's output")
    assert env.git_revision()["dirty"] is False
    (package / "new.py").write_text("y = 2\n")  # uncommitted code, in a new file
    assert env.git_revision()["dirty"] is True
    (package / "new.py").unlink()
    (package / "environment.py").write_text("x = 2\n")  # or in a tracked one
    assert env.git_revision()["dirty"] is True
