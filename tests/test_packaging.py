"""What `pip install` gets: the wheel built from this checkout holds every module of the package
and nothing else (no tests, no demo bundle), with the `dopq` command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dopq"


def _package_files() -> set[str]:
    return {
        f"dopq/{p.relative_to(SRC).as_posix()}"
        for p in SRC.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_the_wheel_holds_the_package_and_nothing_else(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", minversion="77")  # the build backend pyproject.toml names
    project = tmp_path / "project"  # a copy: building writes build/ and *.egg-info beside the sources
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    out.mkdir()
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    proc = subprocess.run(
        [sys.executable, "-c", build, str(out)], cwd=project, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = out / proc.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert {n for n in names if not n.startswith(f"{info}/")} == _package_files()
    assert "dopq = dopq.cli:main" in entry_points


def test_the_readme_s_module_paths_work_after_import_dopq() -> None:
    """`import dopq` then `dopq.export.export_onnx(...)` (the README's API section) works, and the
    top-level import still loads neither onnx nor matplotlib until they are used."""
    code = (
        "import sys, dopq\n"
        "assert 'onnx' not in sys.modules and 'matplotlib' not in sys.modules\n"
        "assert callable(dopq.export.export_onnx) and callable(dopq.export.OnnxModel)\n"
        "assert callable(dopq.data.make_loader) and callable(dopq.serialize.save_quantized)\n"
        "assert callable(dopq.models.build_model)\n"
        "try:\n    dopq.nosuch\nexcept AttributeError as exc:\n    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "module 'dopq' has no attribute 'nosuch'"
