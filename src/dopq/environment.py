"""Provenance of a result: the command, the dopq commit, library versions, the device and the CPU.

Every result file records :func:`environment`, so a number can be traced to the code, the software and
the machine that produced it. :func:`cpu_info` names the CPU (with its family and model numbers on
Linux) and the integer instruction sets that decide how fast an integer (quantized) model can run on it.

Example:
    >>> info = cpu_info()
    >>> {"model", "integer_isa"} <= set(info) <= {"model", "integer_isa", "signature"}
    True
    >>> set(info["integer_isa"]) <= set(INTEGER_ISA)
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch

import dopq

__all__ = [
    "INTEGER_ISA",
    "command_line",
    "cpu_info",
    "device_name",
    "dopq_arguments",
    "environment",
    "file_sha256",
    "git_revision",
    "library_versions",
    "provenance",
]

INTEGER_ISA = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")
"""x86 integer instruction sets that int8 kernels use, as Linux's ``/proc/cpuinfo`` names them."""

_PROC_CPUINFO = Path("/proc/cpuinfo")


_DOPQ_ARGV: list[str] | None = None  # set while dopq.cli.main runs with arguments of its own


@contextlib.contextmanager
def dopq_arguments(argv: list[str] | None) -> Iterator[None]:
    """While the block runs, :func:`command_line` is ``dopq`` with ``argv`` (``dopq.cli.main``
    called from Python), not the host program's ``sys.argv``; None keeps ``sys.argv``."""
    global _DOPQ_ARGV
    previous, _DOPQ_ARGV = _DOPQ_ARGV, None if argv is None else list(argv)
    try:
        yield
    finally:
        _DOPQ_ARGV = previous


def command_line() -> str:
    """The command that is running, as a user would retype it. ``--resume`` is left out: a resumed
    run records (and saves) what the run it continues would have."""
    if _DOPQ_ARGV is not None:
        prog, argv = "dopq", _DOPQ_ARGV
    else:
        name, argv = Path(sys.argv[0]).name, sys.argv[1:]
        if name in ("dopq", "cli.py", "__main__.py"):
            prog = "dopq"
        elif name.endswith(".py"):  # a script such as benchmarks/run.py: not executable on its own
            prog = f"python {shlex.quote(sys.argv[0])}"
        else:
            prog = shlex.quote(sys.argv[0])
    return " ".join([prog, *(shlex.quote(a) for a in argv if a != "--resume")])


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (e.g. the checkpoint a result was computed from), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


RESULTS_PATHSPEC = "benchmarks/results"  # where benchmarks write their JSON, inside the checkout


def git_revision() -> dict[str, Any] | None:
    """The dopq checkout's commit and whether its tree has uncommitted changes (None outside git)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if here != top / "src" / "dopq":  # an installed copy inside some other repository
            return None
        # results files (written by the run being recorded, or by an earlier one) are not code
        changes = git(
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            str(top),
            f":(exclude){top / RESULTS_PATHSPEC}",
        )
        # nor are the untracked files a run leaves (--output, --save, --export in the checkout: the
        # same command run twice there read dirty the second time); a new Python file is code
        new_code = git("ls-files", "--others", "--exclude-standard", "--", ":(top,glob)**/*.py")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changes or new_code)}
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str | None]:
    """Versions of dopq, torch, timm, what decodes and resizes the images (torchvision's transforms
    on Pillow), the runtimes (None when not installed) and Python."""
    return {
        "dopq": dopq.__version__,
        "torch": str(torch.__version__),  # a str subclass, which a weights-only torch.load refuses
        "timm": timm.__version__,
        # another JPEG decoder or resize moves pixels, so calibration and accuracy with them
        "torchvision": _installed_version("torchvision"),
        "pillow": _installed_version("pillow"),
        "onnxruntime": _installed_version("onnxruntime"),
        "openvino": _installed_version("openvino"),
        "python": platform.python_version(),
    }


def _installed_version(package: str) -> str | None:
    """An optional package's version, None when it is not installed (without importing it)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


_SIGNATURE_FIELDS = {"cpu family": "family", "model": "model", "stepping": "stepping"}


def _first_processor(text: str) -> dict[str, str]:
    """The ``key: value`` lines of the first processor in a Linux ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break  # the blank line that ends the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _parse_proc_cpuinfo(text: str) -> tuple[str | None, set[str], dict[str, int]]:
    """The first processor's ``model name``, ``flags`` and signature (family, model and stepping
    numbers, where they are integers) in a Linux ``/proc/cpuinfo``."""
    fields = _first_processor(text)
    signature = {
        name: int(fields[key]) for key, name in _SIGNATURE_FIELDS.items() if fields.get(key, "").isdigit()
    }
    return fields.get("model name") or None, set(fields.get("flags", "").split()), signature


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _macos_model_and_flags() -> tuple[str | None, set[str]]:
    """macOS on Intel names its features in upper case without separators (``AVX512VNNI``)."""
    features = f"{_sysctl('machdep.cpu.features')} {_sysctl('machdep.cpu.leaf7_features')}"
    present = {re.sub(r"[^a-z0-9]", "", f.lower()) for f in features.split()}
    flags = {isa for isa in INTEGER_ISA if isa.replace("_", "") in present}
    return _sysctl("machdep.cpu.brand_string") or None, flags


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and the integer instruction sets of :data:`INTEGER_ISA` it has.

    Read from ``/proc/cpuinfo`` on Linux and ``sysctl`` on macOS; elsewhere (or where those say
    nothing) the model comes from :mod:`platform` and no instruction set is claimed.

    On Linux the first processor's family, model and stepping numbers are added as ``signature``:
    virtual machines often report a generic name ("Intel(R) Xeon(R) Processor", "AMD EPYC") for
    CPU generations whose integer kernels run at different speeds (family 6 model 143 is a Sapphire
    Rapids Xeon, model 207 an Emerald Rapids one).

    Returns:
        ``{"model": str, "integer_isa": [...]}`` and, where known, ``"signature": {"family": int,
        "model": int, "stepping": int}``; the instruction sets in :data:`INTEGER_ISA` order, e.g.
        ``{"model": "Intel(R) Xeon(R) Platinum 8480+", "integer_isa": ["avx2", "avx512_vnni",
        "avx_vnni", "amx_int8"], "signature": {"family": 6, "model": 143, "stepping": 8}}``.
    """
    model, flags, signature = None, set(), {}
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):  # no /proc (a sandbox): the platform fallback below
            model, flags, signature = _parse_proc_cpuinfo(_PROC_CPUINFO.read_text())
    elif sys.platform == "darwin":
        model, flags = _macos_model_and_flags()
    model = model or platform.processor() or platform.machine() or "unknown"
    info: dict[str, Any] = {"model": model, "integer_isa": [isa for isa in INTEGER_ISA if isa in flags]}
    if signature:
        info["signature"] = signature
    return info


def device_name(device: str | torch.device) -> str:
    """A readable name of the device a run used: the GPU's name, or the CPU's."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_info()["model"]


def provenance() -> dict[str, Any]:
    """What produced a result, whatever ran it: the command and the folder it ran in (its relative
    paths start there), library versions, git commit and CPU."""
    return {
        "command": command_line(),
        "working_directory": str(Path.cwd()),
        "versions": library_versions(),
        "git": git_revision(),
        "cpu": cpu_info(),
    }


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`provenance` plus the device and torch's threads: what produced a torch run's result."""
    return {**provenance(), "device_name": device_name(device), "threads": torch.get_num_threads()}
