"""Reconstruction checkpoints: a run stopped after any unit and resumed gives the uninterrupted run's
model byte for byte; checkpoints that are truncated, corrupt, or from another run are refused."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import timm
import torch

import dopq
from dopq.checkpoint import (
    FILE_NAME,
    MAGIC,
    ReconstructionCheckpoint,
    RunIdentity,
    read_checkpoint,
)
from dopq.config import ReconstructConfig
from dopq.errors import CheckpointError
from dopq.report import without_timings
from dopq.serialize import save_quantized

# --------------------------------------------------------------------------------------------------
# In process: the library API
# --------------------------------------------------------------------------------------------------

IDENTITY = RunIdentity({"recipe": "test", "threads": 1}, weights_sha256="ab" * 32)


class _Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


class _DiesAfter(ReconstructionCheckpoint):
    """A checkpoint whose run 'dies' right after writing checkpoint number ``after`` (0: the
    calibrated model, k: after unit k)."""

    def __init__(self, directory: Path, after: int) -> None:
        super().__init__(directory, IDENTITY, progress_lines=False)
        self.after, self.writes = after, 0

    def write(self, *args, **kwargs) -> None:
        super().write(*args, **kwargs)
        self.writes += 1
        if self.writes > self.after:
            raise _Killed


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    fp = timm.create_model("test_vit", num_classes=10).eval()
    images = torch.randn(8, 3, 160, 160)
    # W3/A3: QDrop is on, so its random stream must be resumed too
    config = dopq.get_preset("dopq", w_bits=3, a_bits=3, reconstruct=ReconstructConfig(iters=3, batch_size=4))
    return fp, images, config


def _quantize(tiny, checkpoint=None):
    fp, images, config = tiny
    return dopq.quantize_with_report(
        copy.deepcopy(fp), images[:4], config, recon_data=images, progress=False, checkpoint=checkpoint
    )


def _saved_bytes(model, config) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return save_quantized(model, Path(folder) / "q.pt", config, {"command": "same"}).read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    model, report = _quantize(tiny)
    return _saved_bytes(model, tiny[2]), report


@pytest.mark.parametrize("after", [0, 1, 4, 8])  # calibrated only, after the first unit, a middle one, all
def test_a_run_stopped_after_any_unit_resumes_to_the_same_bytes(tiny, uninterrupted, tmp_path, after):
    with pytest.raises(_Killed):
        _quantize(tiny, _DiesAfter(tmp_path, after))
    assert read_checkpoint(tmp_path / FILE_NAME).summary["units_done"] == after
    model, report = _quantize(
        tiny, ReconstructionCheckpoint(tmp_path, IDENTITY, resume=True, progress_lines=False)
    )
    reference_bytes, reference = uninterrupted
    assert _saved_bytes(model, tiny[2]) == reference_bytes
    assert without_timings(report.to_dict()) == without_timings(reference.to_dict())
    assert read_checkpoint(tmp_path / FILE_NAME).summary["units_done"] == 8


class _SlowDiesAfter(_DiesAfter):
    """:class:`_DiesAfter` with 0.3 s more per unit, so that the units done before the stop weigh
    more than the resumed run's own reconstruction."""

    def write(self, *args, **kwargs) -> None:
        time.sleep(0.3)
        super().write(*args, **kwargs)


def test_a_resumed_run_times_its_whole_reconstruction(tiny, tmp_path):
    """The stages a resumed run restores keep the stopped run's times, and so does the
    reconstruction: its stage time counts the units finished before the stop, as its "seconds" do
    (it said only the resumed run's share, less than the reconstruction's own "seconds")."""
    with pytest.raises(_Killed):
        _quantize(tiny, _SlowDiesAfter(tmp_path, 4))
    before = read_checkpoint(tmp_path / FILE_NAME).progress.seconds
    assert before > 0.9  # three slow writes within the units' loop
    _, report = _quantize(
        tiny, ReconstructionCheckpoint(tmp_path, IDENTITY, resume=True, progress_lines=False)
    )
    assert report.reconstruction["seconds"] > before
    assert report.timings["reconstruction"] >= report.reconstruction["seconds"]


@pytest.fixture(scope="module")
def checkpoint_bytes(tiny, tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("ckpt")
    with pytest.raises(_Killed):
        _quantize(tiny, _DiesAfter(folder, 2))
    return (folder / FILE_NAME).read_bytes()


def test_a_truncated_checkpoint_is_refused_at_any_byte(checkpoint_bytes, tmp_path):
    data = checkpoint_bytes
    header = len(MAGIC) + 65
    offsets = {0, 1, len(MAGIC) - 1, len(MAGIC), len(MAGIC) + 30, header, header + 5, len(data) - 1}
    offsets |= set(torch.randint(len(data), (24,), generator=torch.Generator().manual_seed(0)).tolist())
    path = tmp_path / FILE_NAME
    for cut in sorted(offsets):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            read_checkpoint(path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # one bit inside the tensors: only the digest can see it
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(path)
    path.write_bytes(data)
    assert read_checkpoint(path).summary["units_done"] == 2


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        (
            RunIdentity({"recipe": "test", "threads": 2}, "ab" * 32),
            r"other arguments \(threads: 1 there, 2 here\)",
        ),
        (RunIdentity(IDENTITY.arguments, "cd" * 32), "written for weights with SHA-256 abab"),
        (RunIdentity(IDENTITY.arguments, IDENTITY.weights_sha256, dopq_version="9.9"), "written by dopq"),
        (RunIdentity(IDENTITY.arguments, IDENTITY.weights_sha256, torch_version="0.1"), "written by torch"),
    ],
)
def test_a_checkpoint_of_another_run_is_refused(checkpoint_bytes, tmp_path, identity, message):
    (tmp_path / FILE_NAME).write_bytes(checkpoint_bytes)
    with pytest.raises(CheckpointError, match=message):
        ReconstructionCheckpoint(tmp_path, identity).load()
    assert ReconstructionCheckpoint(tmp_path, IDENTITY).load().summary["units_done"] == 2


def test_a_half_written_temporary_is_never_read_and_resume_needs_a_checkpoint(checkpoint_bytes, tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        ReconstructionCheckpoint(tmp_path, IDENTITY, resume=True).load()
    assert ReconstructionCheckpoint(tmp_path, IDENTITY).load() is None  # without --resume: start afresh
    stale = tmp_path / f".{FILE_NAME}.12345.tmp"  # what a write killed mid-way leaves
    stale.write_bytes(checkpoint_bytes[:1000])
    assert ReconstructionCheckpoint(tmp_path, IDENTITY).load() is None
    assert not stale.exists()


# --------------------------------------------------------------------------------------------------
# The command line: real processes stopped by signals
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_root(image_folder) -> Path:
    return image_folder("ckpt", classes=("a", "b", "c"), per_class=5)


def _argv(root: Path, iters: int = 3) -> list[str]:
    return ["quantize", "--model", "test_vit", "--data", str(root), "--calib-size", "4", "--w-bits", "3",
            "--a-bits", "3", "--threads", "1", "--workers", "0", "--quiet", "--reconstruct",
            "--recon-calib-size", "8", "--recon-iters", str(iters), "--recon-batch-size", "4",
            "--checkpoint-dir", "ck", "--save", "q.pt", "--output", "r.json"]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _stop_after(launcher: list[str], cwd: Path, unit: int, signum: int, target=None) -> tuple[int, str]:
    """Run, send ``signum`` once the checkpoint of ``unit`` is written (to ``target(proc)``'s pid, by
    default the process itself); the exit status and the standard error."""
    cwd.mkdir(exist_ok=True)
    proc = subprocess.Popen(launcher, cwd=cwd, env=_env(), text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    err = []
    for line in proc.stderr:
        err.append(line)
        if f"reconstructed {unit}/" in line:
            os.kill(target(proc) if target else proc.pid, signum)
            break
    err.append(proc.stderr.read())
    return proc.wait(timeout=300), "".join(err)


def _dopq() -> list[str]:
    return [sys.executable, "-m", "dopq"]


@pytest.fixture(scope="module")
def cli_reference(tiny_root, tmp_path_factory) -> tuple[bytes, dict]:
    cwd = tmp_path_factory.mktemp("whole")
    done = subprocess.run([*_dopq(), *_argv(tiny_root)], cwd=cwd, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return (cwd / "q.pt").read_bytes(), json.loads((cwd / "r.json").read_text())


def _resume(cwd: Path, launcher: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*launcher, "--resume"], cwd=cwd, env=_env(), capture_output=True, text=True)


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dopq: error: "), done.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_sigterm_stops_with_the_resume_command_and_only_the_same_run_resumes_it(
    tiny_root, cli_reference, tmp_path
):
    launcher = [*_dopq(), *_argv(tiny_root)]
    rc, err = _stop_after(launcher, tmp_path, 3, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("dopq: stopped by SIGTERM: the checkpoint in ck holds units 1-")
    assert last.endswith("--checkpoint-dir ck --save q.pt --output r.json --resume"), last
    assert not (tmp_path / "q.pt").exists()
    # other arguments: refused before any work, in one line
    line = _one_error_line(_resume(tmp_path, [*_dopq(), *_argv(tiny_root, iters=4)]))
    assert line == (
        "dopq: error: checkpoint ck/reconstruction.ckpt was written by other arguments "
        "(recipe.reconstruct.iters: 3 there, 4 here); resume with the command that wrote it, or use "
        "another --checkpoint-dir"
    )
    # a truncated copy: refused, never read in part
    cut = tmp_path / "cut"
    (cut / "ck").mkdir(parents=True)
    data = (tmp_path / "ck" / FILE_NAME).read_bytes()
    (cut / "ck" / FILE_NAME).write_bytes(data[: len(data) // 2])
    assert "is corrupt or truncated" in _one_error_line(_resume(cut, launcher))
    # the same command resumes it, to the uninterrupted run's file and result
    done = _resume(tmp_path, launcher)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "q.pt").read_bytes() == cli_reference[0]
    resumed = json.loads((tmp_path / "r.json").read_text())
    assert resumed.pop("working_directory") == str(tmp_path)  # where each ran
    reference = {k: v for k, v in cli_reference[1].items() if k != "working_directory"}
    assert without_timings(resumed) == without_timings(reference)  # the command too: no --resume


def test_a_stop_while_the_results_are_written_names_the_resume_command(
    tiny_root, tmp_path, monkeypatch, capsys
):
    """SIGTERM after the last unit, while --save writes: no half-written file, the resume line, and
    the resumed run writes the file."""
    import dopq.serialize
    from dopq.cli import main

    write = dopq.serialize.save_quantized

    def stopped_while_writing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return write(*args, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dopq.serialize, "save_quantized", stopped_while_writing)
    assert main(_argv(tiny_root)) == 128 + signal.SIGTERM
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("dopq: stopped by SIGTERM: the checkpoint in ck holds units 1-"), last
    assert last.endswith("--resume"), last
    assert not (tmp_path / "q.pt").exists() and not (tmp_path / "r.json").exists()
    monkeypatch.setattr(dopq.serialize, "save_quantized", write)
    assert main([*_argv(tiny_root), "--resume"]) == 0
    assert (tmp_path / "q.pt").is_file() and (tmp_path / "r.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("unit", [1, 5, 8])
def test_sigkill_after_unit_k_and_resume_gives_the_same_file(tiny_root, cli_reference, tmp_path, unit):
    launcher = [*_dopq(), *_argv(tiny_root)]
    rc, err = _stop_after(launcher, tmp_path, unit, signal.SIGKILL)
    assert rc == -signal.SIGKILL, err[-2000:]
    assert read_checkpoint(tmp_path / "ck" / FILE_NAME).summary["units_done"] >= unit
    done = _resume(tmp_path, launcher)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "q.pt").read_bytes() == cli_reference[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), "-m", "dopq", *argv]  # fmt: skip


def _worker(launcher: subprocess.Popen[str], rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (a child of the launcher)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun {launcher.pid}")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
def test_torchrun_one_process_killed_then_both_resumed_give_the_same_file(tiny_root, tmp_path):
    """Two gloo processes: process 1 is killed after unit 4, torchrun stops process 0 (which names
    the way to resume), and the same torchrun command with --resume writes the uninterrupted run's
    file, which with two gradient shards is the one-process run's."""
    argv = [*_argv(tiny_root), "--recon-grad-shards", "2"]
    whole = tmp_path / "whole"
    whole.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "dopq", *argv],
        cwd=whole,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = tmp_path / "stopped"
    rc, err = _stop_after(_torchrun(argv), stopped, 4, signal.SIGKILL, target=lambda p: _worker(p, 1))
    assert rc != 0
    assert "resume with the same torchrun command and --resume" in err, err[-3000:]
    assert not (stopped / "q.pt").exists()
    assert read_checkpoint(stopped / "ck" / FILE_NAME).summary["units_done"] >= 4
    done = subprocess.run(
        _torchrun([*argv, "--resume"]), cwd=stopped, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (stopped / "q.pt").read_bytes() == (whole / "q.pt").read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checkpoint-dir", "ck"], "--checkpoint-dir is for runs with --reconstruct"),
        (["--reconstruct", "--resume"], "--resume needs --checkpoint-dir DIR"),
        (["--reconstruct", "--checkpoint-dir", "afile"], "--checkpoint-dir afile is a file; give a folder"),
    ],
)
def test_checkpoint_options_are_checked_before_any_work(tmp_path, monkeypatch, capsys, extra, message):
    from dopq.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    assert main(["quantize", "--model", "test_vit", "--data", "missing", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dopq: error: {message}"), err
