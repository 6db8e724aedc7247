"""Multi-process runs: ``torchrun --nproc-per-node 2 -m dopq ...`` with gloo on the CPU gives exactly
the one-process result (accuracies, the per-image record, the saved model's bytes), and bad set-ups
stop with one clear line."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dopq import distributed
from dopq.evaluate import EvalResult, merge_results
from dopq.report import without_timings


def test_shards_are_disjoint_contiguous_balanced_and_cover_everything() -> None:
    for n in (1, 7, 10, 64):
        for world in range(1, min(n, 5) + 1):
            bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_one_process_primitives_are_no_ops() -> None:
    group = distributed.current()
    assert (group.rank, group.world_size, group.is_main) == (0, 1, True)
    assert distributed.shard([3, 1, 2]) == [3, 1, 2]
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    rows = torch.arange(6).reshape(3, 2)
    assert distributed.gather_shards(rows, 3) is rows
    distributed.check_same("arguments", ["x"])  # nothing to disagree with


def test_shard_refuses_more_processes_than_images() -> None:
    group = distributed.ProcessGroup(rank=1, world_size=4, backend="gloo")
    with pytest.raises(distributed.DistributedError, match="4 processes for 3 images"):
        distributed.shard([0, 1, 2], group)


def test_cuda_processes_without_a_gpu_of_their_own_are_one_clear_error(monkeypatch) -> None:
    """More torchrun processes per machine than GPUs failed in ``torch.cuda.set_device`` with a
    CUDA traceback, and ``--device cuda:N`` put every process on GPU N."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.DistributedError, match=r"LOCAL_RANK 1 has no GPU .* has 1 GPU\(s\)"):
        distributed.init_from_environment("cuda")
    with pytest.raises(
        distributed.DistributedError, match="--device cuda:0 under torchrun: give --device cuda"
    ):
        distributed.init_from_environment("cuda:0")
    assert not torch.distributed.is_initialized()


def test_cuda_processes_wait_for_each_other_under_the_join_wait(monkeypatch) -> None:
    """nccl connects lazily, at the first collective: a process that never joined was waited for
    10 minutes (TIMEOUT), not the 2-minute join wait. torch's store barrier at the end of the join
    (TORCH_DIST_INIT_BARRIER) makes every process wait there, whatever the backend. (The call is
    checked here, no GPU on CI; the gloo tests below run through the barrier.)"""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("TORCH_DIST_INIT_BARRIER", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    calls = []

    def init(backend: str, **kwargs) -> None:
        calls.append((backend, kwargs, os.environ.get("TORCH_DIST_INIT_BARRIER")))
        raise RuntimeError("no peers here")

    monkeypatch.setattr(torch.distributed, "init_process_group", init)
    with pytest.raises(distributed.DistributedError, match="could not join"):
        distributed.init_from_environment("cuda")
    assert calls == [("nccl", {"timeout": distributed.JOIN_TIMEOUT}, "1")]
    assert "TORCH_DIST_INIT_BARRIER" not in os.environ  # the user's environment as it was


def test_merged_shard_results_equal_the_whole() -> None:
    parts = [
        EvalResult(top1=0.5, top5=1.0, images=4, seconds=2.0, top1_correct="1010"),
        EvalResult(top1=1 / 3, top5=2 / 3, images=3, seconds=3.0, top1_correct="001"),
    ]
    whole = merge_results(parts)
    assert whole.top1_correct == "1010001" and whole.images == 7
    assert whole.top1 == 3 / 7 and whole.top5 == 6 / 7
    assert whole.seconds == 3.0  # the processes ran side by side: the slowest one's time


# --------------------------------------------------------------------------------------------------
# Real process groups (gloo on the CPU)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_root(image_folder) -> Path:
    return image_folder("dist", classes=("a", "b", "c"), per_class=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    return env


def _run(argv: list[str], nproc: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable, "-m", "dopq"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                    "--master-port", str(_free_port()), "-m", "dopq"]  # fmt: skip
    return subprocess.run(
        [*launcher, *argv], capture_output=True, text=True, timeout=600, cwd=cwd, env=_env()
    )


def _one_and_two_processes(argv: list[str], tmp_path: Path) -> list[tuple[dict, bytes]]:
    """``argv`` (writing r.json and q.pt) run by one process and by two; each run's result and
    saved bytes."""
    results = []
    for nproc in (1, 2):
        run_dir = tmp_path / f"n{nproc}"
        run_dir.mkdir()
        done = _run(argv, nproc, run_dir)
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(p.name for p in run_dir.iterdir()) == ["q.pt", "r.json", "r.md"]  # rank 0 wrote once
        results.append((json.loads((run_dir / "r.json").read_text()), (run_dir / "q.pt").read_bytes()))
    return results


def test_two_gloo_processes_give_the_one_process_result(tiny_root: Path, tmp_path: Path) -> None:
    argv = ["quantize", "--model", "test_vit", "--data", str(tiny_root), "--calib-size", "6",
            "--w-bits", "3", "--a-bits", "3", "--threads", "1", "--workers", "0", "--batch-size", "4",
            "--output", "r.json", "--save", "q.pt", "--quiet"]  # fmt: skip
    (one, one_bytes), (two, two_bytes) = _one_and_two_processes(argv, tmp_path)
    # the command is dopq's own in both; the JSON and the Markdown say what started the two processes
    launcher = "torchrun --nproc-per-node 2"
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "launcher": launcher}
    assert one["distributed"] == {"world_size": 1, "backend": None, "launcher": None}
    assert f"in 2 processes ({launcher})" in (tmp_path / "n2" / "r.md").read_text()
    for key in ("fp_top1", "quant_top1", "fp_top5", "quant_top5", "fp_top1_correct", "quant_top1_correct",
                "eval_images"):  # fmt: skip
        assert one[key] == two[key], key
    assert one["eval_images"] == 15
    assert two_bytes == one_bytes
    differs = {k for k in without_timings(one) if without_timings(one)[k] != without_timings(two).get(k)}
    assert differs <= {"distributed", "command", "working_directory"}, differs


def test_more_processes_than_images_is_one_clear_error(tiny_root: Path, tmp_path: Path) -> None:
    argv = ["quantize", "--model", "test_vit", "--data", str(tiny_root), "--eval-subset", "1", "--calib-size", "2",
            "--threads", "1", "--workers", "0", "--output", "e.json", "--quiet"]  # fmt: skip
    done = _run(argv, 2, tmp_path)
    assert done.returncode != 0
    _refused_or_stopped(done.stderr, "2 processes for 1 images")
    assert not list(tmp_path.iterdir())  # no partial output


def _refused_or_stopped(stderr: str, refusal: str) -> list[str]:
    """The error lines of a run whose processes each refuse with ``refusal`` in their one line; a
    process torchrun stops before it reaches the check says so in its one line instead. At least one
    refusal is required."""
    errors = [ln for ln in stderr.splitlines() if ln.startswith("dopq: error:")]
    refused = [ln for ln in errors if refusal in ln]
    assert refused and all(ln in refused or "stopped: another process" in ln for ln in errors), stderr[-3000:]
    return errors


def _sigterm_after(said: str) -> subprocess.CompletedProcess[str]:
    """A torchrun process of rank 1 with the SIGTERM watcher: runs ``said``, then gets SIGTERM and
    waits (the watcher must end it)."""
    code = (
        "import os, signal, time; from dopq import distributed; distributed.exit_with_one_line_on_sigterm(); "
        f"{said}; os.kill(os.getpid(), signal.SIGTERM); time.sleep(100)"
    )
    env = dict(_env(), RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=200, env=env)


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="the SIGTERM watcher is POSIX-only")
def test_a_process_stopped_after_its_own_error_line_adds_no_second_line() -> None:
    """torchrun stops the survivors as soon as one process exits, and a survivor may be exiting with
    its own error line already written: one slow to exit got the watcher's line as well, three error
    lines from two processes. It ends with its own status and nothing more; a process that said
    nothing yet says, in one line, that it was stopped."""
    said = _sigterm_after("distributed.closing_line('dopq: error: mine', 2)")
    assert (said.returncode, said.stderr) == (2, "dopq: error: mine\n")
    silent = _sigterm_after("pass")
    assert silent.returncode == 1
    assert silent.stderr.startswith("dopq: error: process 1 stopped: another process of this run failed")
    assert silent.stderr.count("\n") == 1, silent.stderr


def _spawn_rank(
    rank: int,
    argv: list[str],
    port: int,
    cwd: Path,
    local_rank: int | None = None,
    python_path: Path | None = None,
) -> subprocess.Popen[str]:
    """Process ``rank`` of 2 (``local_rank=0``: each on its own machine, as torchrun's
    ``--nnodes 2 --nproc-per-node 1`` starts them); ``python_path`` goes first on its PYTHONPATH."""
    local = rank if local_rank is None else local_rank
    env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(python_path), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "dopq", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def test_processes_started_with_different_arguments_stop_with_one_line(
    tiny_root: Path, tmp_path: Path
) -> None:
    base = ["quantize", "--model", "test_vit", "--data", str(tiny_root), "--calib-size", "4",
            "--threads", "1", "--workers", "0", "--quiet", "--output", "r.json"]  # fmt: skip
    port = _free_port()
    procs = [_spawn_rank(0, [*base, "--w-bits", "4"], port, tmp_path),
             _spawn_rank(1, [*base, "--w-bits", "3"], port, tmp_path)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 2, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "dopq: error: process 1 differs from process 0 in its arguments"
        )
    assert not list(tmp_path.iterdir())


def test_a_process_that_fails_stops_the_others_with_one_line_each(tiny_root: Path, tmp_path: Path) -> None:
    """Process 1's shard holds an unreadable image: it stops with the file's name; torchrun stops
    process 0, which says why in one line; nobody hangs and no output file is left."""
    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    last = sorted((data / "test" / "c").iterdir())[-1]  # the last image: in process 1's shard
    last.write_bytes(last.read_bytes()[:100])  # truncated JPEG
    out = tmp_path / "out"
    out.mkdir()
    argv = ["quantize", "--model", "test_vit", "--data", str(data), "--calib-size", "2", "--threads", "1",
            "--workers", "0", "--quiet", "--output", "r.json", "--save", "q.pt"]  # fmt: skip
    done = _run(argv, 2, out)
    assert done.returncode != 0
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("dopq: error:")]
    assert any(last.name in ln for ln in errors), done.stderr[-3000:]
    assert any("process 0 stopped: another process of this run failed" in ln for ln in errors), done.stderr[
        -3000:
    ]
    assert not list(out.iterdir())


def test_reconstruction_on_two_processes_gives_the_one_process_model(tiny_root: Path, tmp_path: Path) -> None:
    """With two gradient shards each process computes one shard's gradient of every batch, and the
    shards' gradients are gathered and summed in shard order as one process sums them: the saved
    model is byte-identical to the one-process run's, QDrop (on at 3 bits) and AdaRound's
    regularizer included."""
    argv = ["quantize", "--model", "test_vit", "--data", str(tiny_root), "--calib-size", "4", "--threads", "1",
            "--workers", "0", "--quiet", "--w-bits", "3", "--a-bits", "3", "--reconstruct", "--recon-calib-size",
            "8", "--recon-iters", "3", "--recon-batch-size", "5", "--recon-grad-shards", "2", "--recon-rounding",
            "adaround", "--output", "r.json", "--save", "q.pt"]  # fmt: skip
    (one, one_bytes), (two, two_bytes) = _one_and_two_processes(argv, tmp_path)
    assert two["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "launcher": "torchrun --nproc-per-node 2",
    }
    assert one["reconstruction"]["drop_prob"] == 0.5
    assert two_bytes == one_bytes
    strip = [{k: v for k, v in u.items() if "seconds" not in k} for u in one["reconstruction"]["units"]]
    assert strip == [
        {k: v for k, v in u.items() if "seconds" not in k} for u in two["reconstruction"]["units"]
    ]


def test_reconstruction_on_more_processes_than_gradient_shards_is_one_clear_error(
    tiny_root: Path, tmp_path: Path
) -> None:
    argv = ["quantize", "--model", "test_vit", "--data", str(tiny_root), "--calib-size", "4", "--threads", "1",
            "--workers", "0", "--quiet", "--reconstruct", "--recon-iters", "1", "--output", "r.json"]  # fmt: skip
    done = _run(argv, 2, tmp_path)
    assert done.returncode != 0
    errors = _refused_or_stopped(
        done.stderr, "needs --recon-grad-shards (ReconstructConfig.grad_shards) of at least 2, got 1"
    )
    assert len(errors) == 2, done.stderr[-3000:]  # one line per process, before any work
    assert not (tmp_path / "r.json").exists()


def _two_machines(argv: list[str], tmp_path: Path, prepare=None) -> list[tuple[int, str]]:
    """``argv`` run as processes 0 and 1 of two "machines": each from its own folder
    ``tmp_path/node<rank>`` (relative paths, outputs), after ``prepare(folder, rank)`` if given;
    each process's exit status and stderr."""
    port, procs = _free_port(), []
    for rank in (0, 1):
        folder = tmp_path / f"node{rank}"
        folder.mkdir(exist_ok=True)
        if prepare is not None:
            prepare(folder, rank)
        procs.append(_spawn_rank(rank, argv, port, folder, local_rank=0))
    done = []
    for proc in procs:
        try:
            done.append((proc, proc.communicate(timeout=120)[1]))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"process {procs.index(proc)} hung: {[q.communicate()[1][-1000:] for q in procs]}")
    return [(proc.returncode, err) for proc, err in done]


def test_processes_that_read_other_weights_or_images_stop_with_one_line(
    tiny_root: Path, tmp_path: Path
) -> None:
    """Each machine reads ``w.pt`` and ``data`` from its own folder. A different weights file on
    machine 1 gave a float accuracy mixed from two models, and a different image folder a result
    mixed from two listings, without a word (process 0's calibrated model overwrote the rest)."""
    import timm

    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights.append(timm.create_model("test_vit", num_classes=3).state_dict())
    argv = ["quantize", "--model", "test_vit", "--checkpoint", "w.pt", "--num-classes", "3", "--data", "data",
            "--calib-size", "2", "--threads", "1", "--workers", "0", "--quiet", "--output", "r.json"]  # fmt: skip

    def other_weights(folder: Path, rank: int) -> None:
        shutil.copytree(tiny_root, folder / "data")
        torch.save(weights[rank], folder / "w.pt")

    def other_images(folder: Path, rank: int) -> None:
        shutil.copytree(tiny_root, folder / "data")
        torch.save(weights[0], folder / "w.pt")
        if rank == 1:
            (folder / "data" / "test" / "c" / "4.jpg").unlink()

    for name, prepare, what in (
        ("w", other_weights, "model weights"),
        ("d", other_images, "listing of the 'test' split"),
    ):
        (tmp_path / name).mkdir()
        for status, err in _two_machines(argv, tmp_path / name, prepare):
            errors = [ln for ln in err.splitlines() if ln.startswith("dopq: error:")]  # not the card warning
            assert status == 2 and len(errors) == 1, err[-2000:]
            assert errors[0].startswith(f"dopq: error: process 1 differs from process 0 in its {what}"), (
                errors
            )
        assert not (tmp_path / name / "node0" / "r.json").exists()


def test_output_folders_are_process_0s_alone(tiny_root: Path, tmp_path: Path) -> None:
    """Only process 0 writes, so only its machine's output folders count: a process on another
    machine where ``out/r.json`` cannot be created (``out`` is a file there) refused and left
    process 0 waiting for it in the rendezvous for 10 minutes; it now runs and creates nothing.
    Where process 0 cannot write, every process stops at once with its line."""
    argv = ["quantize", "--model", "test_vit", "--num-classes", "3", "--data", "data", "--calib-size", "2",
            "--threads", "1", "--workers", "0", "--quiet", "--output", "out/r.json"]  # fmt: skip

    def blocked_on(blocked: int):
        def prepare(folder: Path, rank: int) -> None:
            shutil.copytree(tiny_root, folder / "data")
            if rank == blocked:
                (folder / "out").write_text("a file where the output folder would go")

        return prepare

    (tmp_path / "one").mkdir()
    for status, err in _two_machines(argv, tmp_path / "one", blocked_on(1)):
        assert status == 0, err[-2000:]
    assert (tmp_path / "one" / "node0" / "out" / "r.json").is_file()
    assert sorted(p.name for p in (tmp_path / "one" / "node1").iterdir()) == ["data", "out"]
    assert (tmp_path / "one" / "node1" / "out").is_file()

    (tmp_path / "zero").mkdir()
    for status, err in _two_machines(argv, tmp_path / "zero", blocked_on(0)):
        errors = [ln for ln in err.splitlines() if ln.startswith("dopq: error:")]
        assert status == 2 and errors == [
            "dopq: error: --output out/r.json: cannot create its folder (File exists)"
        ], err[-2000:]
    assert sorted(p.name for p in (tmp_path / "zero" / "node1").iterdir()) == ["data"]


def test_a_checkpoint_on_process_0s_machine_alone_resumes(tiny_root: Path, tmp_path: Path) -> None:
    """Process 0 alone writes the reconstruction checkpoint, so where machines do not share the
    folder only its machine has one: the resumed run refused, process 1 "differing in its
    checkpoint presence". Process 0 now reads it for every process; the resumed run's model is the
    uninterrupted run's, and nothing is written on the other machine."""
    argv = ["quantize", "--model", "test_vit", "--num-classes", "3", "--data", "data", "--calib-size", "4",
            "--threads", "1", "--workers", "0", "--quiet", "--w-bits", "3", "--a-bits", "3", "--reconstruct",
            "--recon-calib-size", "4", "--recon-iters", "2", "--recon-batch-size", "2", "--recon-grad-shards", "2",
            "--checkpoint-dir", "ckpt", "--output", "r.json", "--save", "q.pt"]  # fmt: skip
    for status, err in _two_machines(
        argv, tmp_path, lambda folder, _: shutil.copytree(tiny_root, folder / "data")
    ):
        assert status == 0, err[-2000:]
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    first = (node0 / "q.pt").read_bytes(), json.loads((node0 / "r.json").read_text())
    assert (node0 / "ckpt" / "reconstruction.ckpt").is_file() and not (node1 / "ckpt").exists()
    (node0 / "q.pt").unlink()
    for status, err in _two_machines([*argv, "--resume"], tmp_path):
        assert status == 0, err[-2000:]
    assert (node0 / "q.pt").read_bytes() == first[0]
    again = json.loads((node0 / "r.json").read_text())
    assert again["quant_top1_correct"] == first[1]["quant_top1_correct"]
    assert sorted(p.name for p in node1.iterdir()) == ["data"]


def test_warnings_are_written_once(tiny_root: Path, tmp_path: Path) -> None:
    """Every process logged each warning (here: a subset larger than the split), one copy per
    process; only process 0 does now."""
    argv = ["quantize", "--model", "test_vit", "--num-classes", "3", "--data", str(tiny_root), "--calib-size", "2",
            "--eval-subset", "100", "--threads", "1", "--workers", "0", "--quiet"]  # fmt: skip
    done = _run(argv, 2, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("a subset of 100 images was asked of a split of 15") == 1, done.stderr[-3000:]


def test_the_resume_hint_of_another_process_does_not_describe_its_own_folder(
    monkeypatch, tmp_path: Path
) -> None:
    """Process 0 alone writes the checkpoint; a process on another machine said its own empty
    folder "holds no checkpoint yet" when it was stopped."""
    from dopq import cli

    monkeypatch.setattr(distributed, "current", lambda: distributed.ProcessGroup(1, 2, "gloo"))
    hint = cli._resume_hint(tmp_path / "ckpt")
    assert "no checkpoint" not in hint and hint.endswith("resume with the same torchrun command and --resume")


def test_a_machine_with_another_torch_stops_with_one_line(tiny_root: Path, tmp_path: Path) -> None:
    """Process 1 runs "another torch" (a ``sitecustomize`` renames its version): its float kernels
    could round otherwise, and the run went on without a word."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import torch\ntorch.__version__ = '2.0.0+other'\n")
    argv = ["quantize", "--model", "test_vit", "--data", str(tiny_root), "--calib-size", "2", "--threads", "1",
            "--workers", "0", "--quiet"]  # fmt: skip
    port = _free_port()
    procs = [_spawn_rank(0, argv, port, tmp_path, local_rank=0),
             _spawn_rank(1, argv, port, tmp_path, local_rank=0, python_path=other)]  # fmt: skip
    for proc in procs:
        err = proc.communicate(timeout=120)[1]
        errors = [ln for ln in err.splitlines() if ln.startswith("dopq: error:")]
        assert proc.returncode == 2 and len(errors) == 1, err[-2000:]
        assert errors[0].startswith("dopq: error: process 1 differs from process 0 in its versions")
        assert "'2.0.0+other'" in errors[0] and errors[0].endswith(
            "install the same dopq and torch on every machine"
        )


@pytest.fixture(scope="module")
def saved_model(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``dopq quantize --save`` file of ``test_vit`` for ``tiny_root``'s three classes."""
    from dopq.cli import main

    path = tmp_path_factory.mktemp("saved") / "q.pt"
    argv = ["quantize", "--model", "test_vit", "--num-classes", "3", "--data", str(tiny_root), "--calib-size", "2",
            "--threads", "1", "--workers", "0", "--quiet", "--save", str(path)]  # fmt: skip
    assert main(argv) == 0
    return path


def test_a_shard_of_skipped_images_alone_gives_the_one_process_result(
    tiny_root: Path, saved_model: Path, tmp_path: Path
) -> None:
    """With --skip-bad-images, a process whose whole share of the images was left out stopped the
    run ("evaluation got no images") where one process evaluated the rest: its share now counts
    nothing and the gathered result is the one-process result."""
    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    (data / "test" / "c" / "0.jpg").write_bytes(b"")  # image 10: --eval-subset 3 takes 0, 5, 10
    argv = ["evaluate", "--quantized", str(saved_model), "--data", str(data), "--eval-subset", "3",
            "--skip-bad-images", "--threads", "1", "--workers", "0", "--quiet", "--output", "r.json"]  # fmt: skip
    results = []
    for nproc in (1, 2):
        (tmp_path / f"n{nproc}").mkdir()
        done = _run(argv, nproc, tmp_path / f"n{nproc}")
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads((tmp_path / f"n{nproc}" / "r.json").read_text()))
    one, two = results
    assert two["distributed"]["world_size"] == 2 and one["eval_images"] == two["eval_images"] == 2
    for key in ("quant_top1", "quant_top5", "quant_top1_correct", "data"):
        assert one[key] == two[key], key
    assert [s["index"] for s in two["data"]["skipped"]["evaluation"]["images"]] == [10]


def test_a_process_that_stops_before_joining_does_not_hold_the_others_for_long(
    saved_model: Path, tiny_root: Path, tmp_path: Path, monkeypatch
) -> None:
    """On several machines torchrun does not stop the processes of the others when one stops
    before it joins the group (an argument refused on its machine): process 0 waited out the
    10-minute timeout and then named store keys. The join now has its own short wait and a line
    that says what happened; a process working alone after the join for longer than that (a long
    run's calibration, its first batches) is still waited for."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import datetime, os, time\nimport dopq.distributed as d\n"
        "d.JOIN_TIMEOUT = datetime.timedelta(seconds=3)\n"
        "if os.environ.get('DOPQ_TEST_LATE') == os.environ.get('RANK'):\n"
        "    joined = d.init_from_environment\n"
        "    d.init_from_environment = lambda *a, **k: (joined(*a, **k), time.sleep(6))[0]\n"
    )
    argv = ["evaluate", "--quantized", str(saved_model), "--data", str(tiny_root), "--threads", "1",
            "--workers", "0", "--quiet"]  # fmt: skip

    def both(argv1: list[str]) -> list[tuple[int, str]]:
        port = _free_port()
        procs = [_spawn_rank(r, a, port, tmp_path, local_rank=0, python_path=site)
                 for r, a in ((0, argv), (1, argv1))]  # fmt: skip
        try:
            errs = [p.communicate(timeout=60)[1] for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a process hung: {[p.communicate()[1][-1000:] for p in procs]}")
        return [(p.returncode, err) for p, err in zip(procs, errs, strict=True)]

    (status0, err0), (status1, err1) = both([*argv, "--batch-size", "0"])
    assert (status1, err1) == (2, "dopq: error: --batch-size must be >= 1, got 0\n")
    errors = [ln for ln in err0.splitlines() if ln.startswith("dopq: error:")]
    assert status0 == 2 and len(errors) == 1, err0[-2000:]
    assert errors[0].startswith(
        "dopq: error: process 0 waited 3 s for the other processes of this run to join: one stopped "
        "before it joined (see its message, on its machine) or was not started"
    )
    monkeypatch.setenv("DOPQ_TEST_LATE", "1")  # process 1 works alone for 6 s after the join
    results = both(argv)
    assert [status for status, _ in results] == [0, 0], results


def test_evaluate_on_a_machine_with_fewer_images_than_processes_names_the_other_listing(
    saved_model: Path, tiny_root: Path, tmp_path: Path
) -> None:
    """``dopq evaluate`` sharded the images before comparing the processes' listings: a machine
    whose copy of the split held one image told its user to "use at most 1 processes" (process 0
    had 15) and process 0 only that another process failed. Both now name the listing."""

    def one_image_on_machine_1(folder: Path, rank: int) -> None:
        shutil.copytree(tiny_root, folder / "data")
        if rank == 1:
            for path in sorted((folder / "data" / "test").rglob("*.jpg"))[1:]:
                path.unlink()

    argv = ["evaluate", "--quantized", str(saved_model), "--data", "data", "--threads", "1", "--workers", "0",
            "--quiet", "--output", "r.json"]  # fmt: skip
    for status, err in _two_machines(argv, tmp_path, one_image_on_machine_1):
        errors = [ln for ln in err.splitlines() if ln.startswith("dopq: error:")]
        assert status == 2 and len(errors) == 1, err[-2000:]
        assert errors[0].startswith(
            "dopq: error: process 1 differs from process 0 in its listing of the 'test'"
        )
    assert not (tmp_path / "node0" / "r.json").exists()
